"""``amodal3r serve``: the reconstruction server the Blender extension talks to.

FastAPI on uvicorn, loopback by default, every request authorised with a bearer token. Routes and
payloads are defined in ``protocol.py``; jobs persist in ``job_store.py`` and run in ``worker.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image, UnidentifiedImageError

from amodal3r import __version__
from amodal3r.api.environment import TOKEN
from amodal3r.api.errors import CheckpointError, InputError
from amodal3r.api.files import write_atomically
from amodal3r.api.protocol import (
    API_PREFIX,
    LISTENING_PREFIX,
    MAX_IMAGE_PIXELS,
    MAX_UPLOAD_BYTES,
    MAX_VIEWS,
    PROTOCOL_VERSION,
    STATE_FILE,
    JobParams,
    ProtocolError,
    SegmentParams,
    SegmentReply,
    parse_view_field,
)
from amodal3r.weights.layout import PIPELINE_FILE, SAM_FOLDER, sam_checkpoints

from .job_store import JobStore, is_job_id
from .worker import ModelRuntime, Worker, load_job_views

TOKEN_FILE = "token"
LOCK_FILE = "server.lock"


@dataclass
class ServerConfig:
    model_dir: Path
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "auto"
    dtype: str | None = None
    idle_unload: float = 900.0
    sam_checkpoints: dict[str, Path] = field(default_factory=dict)  # kind -> file, beside the model folder's
    max_upload_bytes: int = MAX_UPLOAD_BYTES


class Server:
    """Everything the routes share: the job store, the worker, the models, the downloads."""

    def __init__(self, config: ServerConfig, token: str):
        import torch

        self.config, self.token = config, token
        self.store = JobStore(config.data_dir)
        self.runtime = ModelRuntime(
            config.model_dir, config.device, getattr(torch, config.dtype) if config.dtype else None, config.idle_unload
        )
        self.worker = Worker(self.store, self.runtime)
        self.images = config.data_dir / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self._segmenters: dict[str, object] = {}
        self._segment_lock = threading.Lock()
        self.downloads = Downloads(config.model_dir)

    def start(self) -> None:
        self.worker.start(self.store.recover())

    def sam_checkpoint(self, kind: str) -> Path:
        if kind in self.config.sam_checkpoints:
            return self.config.sam_checkpoints[kind]
        found = sam_checkpoints(self.config.model_dir, kind)
        if not found:
            raise HTTPException(
                409,
                f"no SAM {kind} checkpoint: download it (POST {API_PREFIX}/models/download "
                f"with sam_{kind}) or place sam_{kind}_*.pth in "
                f"{self.config.model_dir / SAM_FOLDER}",
            )
        return found[0]

    def segmenter(self, kind: str):
        from amodal3r.pipelines.segment import Segmenter

        with self._segment_lock:
            if kind not in self._segmenters:
                self._segmenters[kind] = Segmenter(kind, self.sam_checkpoint(kind), self.runtime.device_name)
            return self._segmenters[kind]

    def info(self) -> dict:
        import torch

        device = self.runtime.device
        memory = {"process_rss_bytes": _rss_bytes()}
        if torch.cuda.is_available():
            memory["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
            memory["cuda_reserved_bytes"] = torch.cuda.memory_reserved()
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "device": device,
            "dtype": self.config.dtype or "auto",
            "model_dir": str(self.config.model_dir),
            "models": {
                "present": self.downloads.present(),
                "loaded": self.runtime.loaded_models,
                "sam_loaded": sorted(k for k, s in self._segmenters.items() if s.loaded),
            },
            "memory": memory,
            "queue_length": self.worker.queue_length,
            "running_job": self.worker.current,
        }


class Downloads:
    """The model download running in the background, one at a time, and its progress."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.status: dict = {"state": "idle", "components": [], "error": ""}
        self._lock = threading.Lock()

    def present(self) -> list[str]:
        from amodal3r.weights.downloads import inventory

        return [c.name for c in inventory(self.model_dir) if c.present]

    def components(self) -> list[dict]:
        from dataclasses import asdict

        from amodal3r.weights.downloads import inventory

        return [asdict(c) for c in inventory(self.model_dir)]

    def start(self, components: list[str]) -> dict:
        with self._lock:
            if self.status["state"] == "running":
                raise HTTPException(
                    409,
                    "a download is already running; wait for it or watch its progress "
                    f"at GET {API_PREFIX}/models/download",
                )
            self.status = {"state": "running", "components": components, "error": "", "progress": None}
        threading.Thread(target=self._run, args=(components,), name="amodal3r-download", daemon=True).start()
        return dict(self.status)

    def _run(self, components: list[str]) -> None:
        from dataclasses import asdict

        from amodal3r.weights.downloads import download

        def progress(update) -> None:
            self.status["progress"] = asdict(update)

        try:
            download(self.model_dir, components, progress)
        except Exception as error:  # noqa: BLE001 - reported through the protocol
            self.status.update(state="failed", error=str(error))
        else:
            self.status.update(state="done")


def _rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class Guard:
    """ASGI middleware: the bearer token on every request, and the request size limit."""

    def __init__(self, app, token: str, max_bytes: int):
        self.app, self.token, self.max_bytes = app, token.encode(), max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = self._refusal(headers)
        if refusal is not None:
            await self._drain(receive)
            return await refusal(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._drain(receive)
            await _too_large(self.max_bytes)(scope, receive, send)

    async def _drain(self, receive) -> None:
        """Read what the client still sends before refusing: a reply sent mid-upload reaches the client
        as a connection reset instead of the reason. A client sending far past the limit is cut off."""
        budget = DRAIN_FACTOR * self.max_bytes
        while budget > 0:
            message = await receive()
            budget -= len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    def _refusal(self, headers: dict[bytes, bytes]) -> JSONResponse | None:
        auth = headers.get(b"authorization", b"")
        if not auth.startswith(b"Bearer "):
            return JSONResponse(
                {
                    "detail": f"missing token: send 'Authorization: Bearer <token>' (the token is in "
                    f"{TOKEN} or the server's token file)"
                },
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(auth[7:].strip(), self.token):
            return JSONResponse({"detail": "wrong token: use the token this server was started with"}, 403)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return _too_large(self.max_bytes)
        return None


DRAIN_FACTOR = 4


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(
        {
            "detail": f"request too large: at most {limit // (1024 * 1024)} MiB. Downscale the "
            "images (the model sees 518 pixels) or send fewer views"
        },
        413,
    )


def _check_image(name: str, data: bytes) -> None:
    """Refuse what is not a readable image before it is stored."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ProtocolError(
                    f"{name}: {image.width}x{image.height} exceeds {MAX_IMAGE_PIXELS:,} pixels; downscale it"
                )
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, ProtocolError):
            raise
        raise ProtocolError(f"{name}: not a readable image ({error}); send a PNG or JPEG") from None


async def _form(request: Request):
    try:
        return await request.form(max_files=4 * MAX_VIEWS + 1, max_fields=8)
    except HTTPException:
        raise
    except Exception as error:  # noqa: BLE001 - any parse failure is the client's malformed body
        raise HTTPException(400, f"malformed multipart body: {error}") from None


async def _views_from_form(form) -> list[dict[str, tuple[str, bytes]]]:
    views: dict[int, dict[str, tuple[str, bytes]]] = {}
    for key, value in form.multi_items():
        if key == "params":
            continue
        index, kind = parse_view_field(key)
        if isinstance(value, str):
            raise ProtocolError(f"{key} must be a file upload")
        if index >= MAX_VIEWS:
            raise ProtocolError(f"at most {MAX_VIEWS} views per job")
        if kind in views.setdefault(index, {}):
            raise ProtocolError(f"{key} given twice")
        data = await value.read()
        _check_image(f"{key} ({value.filename})", data)
        views[index][kind] = (Path(value.filename or key).name, data)
    if not views:
        raise ProtocolError("no views: upload view0_image with view0_target_mask (or view0_mask)")
    if sorted(views) != list(range(len(views))):
        raise ProtocolError(f"views must be numbered 0..{len(views) - 1} without gaps, got {sorted(views)}")
    for index, view in views.items():
        if "image" not in view:
            raise ProtocolError(f"view {index} has masks but no view{index}_image")
    return [views[i] for i in range(len(views))]


def create_app(server: Server) -> FastAPI:
    app = FastAPI(
        title="Amodal3R reconstruction server",
        version=__version__,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(InputError)
    @app.exception_handler(CheckpointError)
    async def input_error(_request: Request, error: InputError | CheckpointError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, 422)

    @app.exception_handler(Exception)
    async def server_bug(_request: Request, error: Exception) -> JSONResponse:
        """A bug, not the request: name it so that the user's report says what broke (the log has the trace)."""
        return JSONResponse(
            {
                "detail": f"server error ({type(error).__name__}: {error}); the server log has "
                "the details: please report it"
            },
            500,
        )

    @app.get(f"{API_PREFIX}/health")
    def health() -> dict:
        return {"status": "ok", "protocol": PROTOCOL_VERSION, "version": __version__}

    @app.get(f"{API_PREFIX}/info")
    def info() -> dict:
        return server.info()

    @app.post(f"{API_PREFIX}/jobs", status_code=202)
    async def submit(request: Request) -> dict:
        form = await _form(request)
        if "params" not in form or not isinstance(form["params"], str):
            raise ProtocolError("missing the params field (JSON job settings; {} for the defaults)")
        params = JobParams.from_json(form["params"])
        views = await _views_from_form(form)
        status = await run_in_threadpool(server.store.create, params, views)
        try:
            await run_in_threadpool(load_job_views, server.store, status.id)
        except InputError:
            server.store.discard(status.id)
            raise
        server.worker.submit(status.id)
        return status.to_dict()

    @app.get(f"{API_PREFIX}/jobs")
    def jobs(limit: int = 50) -> dict:
        return {"jobs": [s.to_dict() for s in server.store.list(max(1, min(limit, 500)))]}

    def job_or_404(job_id: str):
        status = server.store.get(job_id) if is_job_id(job_id) else None
        if status is None:
            raise HTTPException(404, f"no job {job_id!r}: list jobs at GET {API_PREFIX}/jobs")
        return status

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}")
    def job(job_id: str) -> dict:
        return job_or_404(job_id).to_dict()

    @app.post(f"{API_PREFIX}/jobs/{{job_id}}/cancel")
    def cancel(job_id: str) -> dict:
        job_or_404(job_id)
        server.worker.cancel(job_id)
        return job_or_404(job_id).to_dict()

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}/results/{{name}}")
    def result(job_id: str, name: str) -> FileResponse:
        status = job_or_404(job_id)
        path = server.store.result_path(job_id, name)
        if path is None:
            raise HTTPException(
                404,
                f"job {job_id} has no result {name!r}; it has: "
                f"{', '.join(status.results) or 'none yet'} (state {status.state})",
            )
        return FileResponse(path, filename=name)

    @app.post(f"{API_PREFIX}/images")
    async def upload_image(request: Request) -> dict:
        form = await _form(request)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ProtocolError("upload the image as the multipart file field 'image'")
        return {"image_id": await run_in_threadpool(_store_image, server, await upload.read())}

    @app.post(f"{API_PREFIX}/segment")
    async def segment(request: Request) -> dict:
        form = await _form(request)
        if not isinstance(form.get("params"), str):
            raise ProtocolError("missing the params field (JSON: points, labels, box, image_id, model)")
        params = SegmentParams.from_json(form["params"])
        upload = form.get("image")
        if upload is not None and not isinstance(upload, str):
            params.image_id = await run_in_threadpool(_store_image, server, await upload.read())
        if params.image_id is None:
            raise ProtocolError("send the image (file field 'image') or the image_id of an earlier upload")
        return await run_in_threadpool(_segment, server, params)

    @app.get(f"{API_PREFIX}/models")
    def models() -> dict:
        return {"model_dir": str(server.config.model_dir), "components": server.downloads.components()}

    @app.post(f"{API_PREFIX}/models/download")
    async def download_models(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as error:
            raise ProtocolError(f"body is not valid JSON: {error}") from None
        components = body.get("components") if isinstance(body, dict) else None
        known = [c["name"] for c in server.downloads.components()]
        if not isinstance(components, list) or not components or any(c not in known for c in components):
            raise ProtocolError(f"components must be a non-empty list from: {', '.join(known)}")
        return server.downloads.start(components)

    @app.get(f"{API_PREFIX}/models/download")
    def download_status() -> dict:
        return dict(server.downloads.status)

    return app


def _store_image(server: Server, data: bytes) -> str:
    """Content-addressed: the same image uploaded twice is one file and one cached embedding."""
    _check_image("image", data)
    image_id = hashlib.sha256(data).hexdigest()
    path = server.images / f"{image_id}.bin"
    if not path.exists():
        write_atomically(path, data)
    return image_id


def _segment(server: Server, params: SegmentParams) -> dict:
    path = server.images / f"{params.image_id}.bin"
    if not path.is_file():
        raise HTTPException(404, f"no image {params.image_id}: upload it again (POST {API_PREFIX}/images)")
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    result = server.segmenter(params.model).segment(
        rgb,
        [tuple(p) for p in params.points],
        params.labels,
        tuple(params.box) if params.box is not None else None,
        image_key=params.image_id,
    )
    png = io.BytesIO()
    Image.fromarray(result.mask.astype(np.uint8) * 255).save(png, format="PNG")
    return SegmentReply(
        base64.b64encode(png.getvalue()).decode(),
        float(result.score),
        params.image_id,
        bool(result.embedding_cached),
        round(result.seconds, 4),
    ).to_dict()


def load_token(data_dir: Path) -> str:
    """``AMODAL3R_TOKEN`` when the parent gives one, else a token kept in a file only the user reads."""
    if os.environ.get(TOKEN):
        return os.environ[TOKEN]
    path = data_dir / TOKEN_FILE
    if path.is_file():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def lock_data_dir(data_dir: Path):
    """One server per data folder; the OS drops the lock when the process dies, however it dies."""
    handle = open(data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the life of the process
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"another amodal3r server is using {data_dir}; stop it or pass another --data-dir") from None
    return handle


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        raise SystemExit(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port or 0") from None
    sock.listen(128)
    return sock


def serve(config: ServerConfig) -> int:
    import uvicorn

    config.data_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_data_dir(config.data_dir)
    if not (config.model_dir / PIPELINE_FILE).is_file():
        print(
            f"warning: {config.model_dir} has no {PIPELINE_FILE} yet: jobs fail until the models are "
            f"downloaded (POST {API_PREFIX}/models/download)",
            file=sys.stderr,
        )
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {config.host}, reachable from other machines; every request still needs "
            "the token, but traffic is not encrypted",
            file=sys.stderr,
        )
    token = load_token(config.data_dir)
    server = Server(config, token)
    server.start()
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    state = {
        "url": url,
        "pid": os.getpid(),
        "protocol": PROTOCOL_VERSION,
        "version": __version__,
        "started": time.time(),
    }
    write_atomically(config.data_dir / STATE_FILE, json.dumps(state).encode())
    print(f"{LISTENING_PREFIX}{url}", flush=True)
    app = Guard(create_app(server), token, config.max_upload_bytes)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        server.worker.stop()
        (config.data_dir / STATE_FILE).unlink(missing_ok=True)
        lock.close()
    return 0

"""``amodal3r serve``: the reconstruction server the Blender extension talks to.

FastAPI on uvicorn, loopback by default, every request checked by ``guard.py`` (Host, token,
size, stalls). Routes and payloads are defined in ``api/protocol.py`` and described to OpenAPI by
``openapi.py``; uploads are checked in ``uploads.py``, jobs persist in ``job_store.py`` and run in
``worker.py``, click-to-mask images live in ``images.py``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image

from amodal3r import __version__
from amodal3r.api.environment import TOKEN
from amodal3r.api.errors import CheckpointError, InputError, StorageError
from amodal3r.api.files import write_atomically
from amodal3r.api.protocol import (
    API_PREFIX,
    BODY_IDLE_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    LISTENING_PREFIX,
    MAX_UPLOAD_BYTES,
    PROTOCOL_VERSION,
    STATE_FILE,
    JobParams,
    PlaceParams,
    ProtocolError,
    SegmentParams,
    SegmentReply,
)
from amodal3r.weights.layout import PIPELINE_FILE, SAM_FOLDER, sam_checkpoints

from . import openapi as doc
from .guard import LOOPBACK_NAMES, Guard, HeaderDeadline
from .images import ImageStore
from .job_store import JobStore, is_job_id
from .uploads import (
    PLACE_FIELDS,
    PLACE_SLOTS,
    check_image,
    decode_rgb,
    mesh_upload,
    place,
    read_form,
    store_job,
    view_uploads,
)
from .worker import ModelRuntime, Worker

TOKEN_FILE = "token"
LOCK_FILE = "server.lock"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
log = logging.getLogger("amodal3r")


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
    allow_hosts: list[str] = field(default_factory=list)  # Host names besides its own address; "*" any
    header_timeout: float = HEADER_TIMEOUT_S
    body_timeout: float = BODY_IDLE_TIMEOUT_S


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
        self.images = ImageStore(config.data_dir / "images")
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
            "worker": "alive" if self.worker.alive else "stopped",
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


def create_app(server: Server) -> FastAPI:
    app = FastAPI(
        title="Amodal3R reconstruction server",
        version=__version__,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    _add_error_handlers(app)
    _add_openapi(app)

    def worker_running() -> None:
        if not server.worker.alive:
            raise HTTPException(503, "the job worker has stopped: restart the server (queued jobs are kept)")

    @app.get(f"{API_PREFIX}/health", **doc.route(doc.HEALTH, 503))
    def health() -> dict:
        worker_running()
        return {"status": "ok", "worker": "alive", "protocol": PROTOCOL_VERSION, "version": __version__}

    @app.get(f"{API_PREFIX}/info", **doc.route(doc.OBJECT))
    def info() -> dict:
        return server.info()

    @app.post(f"{API_PREFIX}/jobs", **doc.route(doc.job_status(), 422, 503, 507, status=202, body=doc.job_body()))
    async def submit(request: Request) -> dict:
        form = await read_form(request)
        if "params" not in form or not isinstance(form["params"], str):
            raise ProtocolError("missing the params field (JSON job settings; {} for the defaults)")
        params = JobParams.from_json(form["params"])
        uploads = await view_uploads(form)
        worker_running()
        status = await run_in_threadpool(store_job, server.store, params, uploads)
        server.worker.submit(status.id)
        return status.to_dict()

    placing = asyncio.Semaphore(PLACE_SLOTS)  # waiting requests wait here, not in the thread pool

    @app.post(f"{API_PREFIX}/place", **doc.route(doc.POSE, 422, body=doc.place_body()))
    async def place_mesh(request: Request) -> dict:
        form = await read_form(request)
        if not isinstance(form.get("params"), str):
            raise ProtocolError("missing the params field (JSON: camera, fov; {} to use the photo's EXIF)")
        params = PlaceParams.from_json(form["params"])
        mesh = await mesh_upload(form)
        uploads = await view_uploads(form, PLACE_FIELDS)
        async with placing:
            return await run_in_threadpool(place, params, mesh, uploads)

    @app.get(f"{API_PREFIX}/jobs", **doc.route(doc.JOB_LIST, 422))
    def jobs(limit: int = 50) -> dict:
        return {"jobs": [s.to_dict() for s in server.store.list(max(1, min(limit, 500)))]}

    def job_or_404(job_id: str):
        status = server.store.get(job_id) if is_job_id(job_id) else None
        if status is None:
            raise HTTPException(404, f"no job {job_id!r}: list jobs at GET {API_PREFIX}/jobs")
        return status

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}", **doc.route(doc.job_status(), 404))
    def job(job_id: str) -> dict:
        return job_or_404(job_id).to_dict()

    @app.post(f"{API_PREFIX}/jobs/{{job_id}}/cancel", **doc.route(doc.job_status(), 404, 507))
    def cancel(job_id: str) -> dict:
        job_or_404(job_id)
        server.worker.cancel(job_id)
        return job_or_404(job_id).to_dict()

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}/results/{{name}}", **doc.route(None, 404, media=doc.result_media()))
    def result(job_id: str, name: str) -> FileResponse:
        status = job_or_404(job_id)
        path = server.store.result_path(job_id, name)
        if path is None:
            raise HTTPException(
                404,
                f"job {job_id} has no result {name!r}; it has: "
                f"{', '.join(status.results) or 'none yet'} (state {status.state})",
            )
        return FileResponse(path, filename=name, media_type=doc.RESULT_TYPES[path.suffix])

    @app.post(f"{API_PREFIX}/images", **doc.route(doc.IMAGE_ID, 422, 507, body=doc.image_body()))
    async def upload_image(request: Request) -> dict:
        form = await read_form(request)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ProtocolError("upload the image as the multipart file field 'image'")
        return {"image_id": await _store_image(server, await upload.read())}

    @app.post(f"{API_PREFIX}/segment", **doc.route(doc.segment_reply(), 404, 409, 422, 507, body=doc.segment_body()))
    async def segment(request: Request) -> dict:
        form = await read_form(request)
        if not isinstance(form.get("params"), str):
            raise ProtocolError("missing the params field (JSON: points, labels, box, image_id, model)")
        params = SegmentParams.from_json(form["params"])
        upload = form.get("image")
        if upload is not None and not isinstance(upload, str):
            params.image_id = await _store_image(server, await upload.read())
        if params.image_id is None:
            raise ProtocolError("send the image (file field 'image') or the image_id of an earlier upload")
        return await run_in_threadpool(_segment, server, params)

    @app.get(f"{API_PREFIX}/models", **doc.route(doc.OBJECT))
    def models() -> dict:
        return {"model_dir": str(server.config.model_dir), "components": server.downloads.components()}

    @app.post(
        f"{API_PREFIX}/models/download", **doc.route(doc.OBJECT, 409, 422, body=doc.download_body(_component_names()))
    )
    async def download_models(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"{}")
        except (ValueError, RecursionError) as error:
            raise ProtocolError(f"body is not valid JSON: {error or 'nested too deeply'}") from None
        components = body.get("components") if isinstance(body, dict) else None
        known = _component_names()
        if not isinstance(components, list) or not components or any(c not in known for c in components):
            raise ProtocolError(f"components must be a non-empty list from: {', '.join(known)}")
        return server.downloads.start(components)

    @app.get(f"{API_PREFIX}/models/download", **doc.route(doc.OBJECT))
    def download_status() -> dict:
        return dict(server.downloads.status)

    return app


def _component_names() -> list[str]:
    from amodal3r.weights.downloads import CATALOG

    return list(CATALOG)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    @app.exception_handler(CheckpointError)
    async def input_error(_request: Request, error: InputError | CheckpointError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, 422)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(_request: Request, error: RequestValidationError) -> JSONResponse:
        """FastAPI's own checks (query parameters) in the protocol's one-string form."""
        reasons = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in error.errors()]
        return JSONResponse({"detail": "; ".join(reasons) or "invalid request"}, 422)

    @app.exception_handler(StorageError)
    async def disk_full(_request: Request, error: StorageError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, 507)

    @app.exception_handler(Exception)
    async def server_bug(_request: Request, error: Exception) -> JSONResponse:
        """A bug, not the request: name it so that the user's report says what broke (the log has the trace)."""
        log.error("server error", exc_info=error)
        return JSONResponse(
            {
                "detail": f"server error ({type(error).__name__}: {error}); the server log has "
                "the details: please report it"
            },
            500,
        )


def _add_openapi(app: FastAPI) -> None:
    build = app.openapi

    def document() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = doc.finish(build())
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


async def _store_image(server: Server, data: bytes) -> str:
    """Checked off the event loop, stored content-addressed (one file and one embedding per image)."""
    await run_in_threadpool(check_image, data)
    return await run_in_threadpool(server.images.put, data)


def _segment(server: Server, params: SegmentParams) -> dict:
    path = server.images.path(params.image_id) if params.image_id else None
    if path is None:
        raise HTTPException(404, f"no image {params.image_id}: upload it again (POST {API_PREFIX}/images)")
    rgb = decode_rgb(path)
    result = server.segmenter(params.model).segment(
        rgb,
        [tuple(p) for p in params.points],
        params.labels,
        tuple(params.box) if params.box is not None else None,
        image_key=params.image_id,
    )
    if not math.isfinite(result.score):
        raise InputError("these clicks give no usable mask: click on the object inside the image")
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
    """The listening socket, first of all: a wrong address fails in one line before anything starts."""
    if not 0 <= port <= 65535:
        raise SystemExit(f"--port {port} is not a port: give 1..65535, or 0 for a free one")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        reason = error.strerror or str(error)
        raise SystemExit(f"cannot listen on {host}:{port} ({reason}); pick another --host or --port (0: any)") from None
    sock.listen(128)
    return sock


def allowed_hosts(config: ServerConfig, bound: str) -> frozenset[str] | None:
    """The Host header names requests may carry: loopback, the bound address, ``--allow-host`` (None: any)."""
    if "*" in config.allow_hosts:
        return None
    names = set(LOOPBACK_NAMES) | {name.lower() for name in config.allow_hosts}
    for host in (config.host, bound):
        if host not in WILDCARD_HOSTS:
            names.add(host.strip("[]").lower())
    if config.host in WILDCARD_HOSTS:
        names.add(socket.gethostname().lower())
    return frozenset(names)


def _stop(signum: int, _frame) -> None:
    """SIGTERM and SIGINT end the server like a clean exit: the finally blocks remove ``server.json``."""
    raise SystemExit(0)


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("amodal3r: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def guarded_app(server: Server, bound_host: str) -> Guard:
    """The routes behind the request guard, as the server answers on ``bound_host``."""
    config = server.config
    hosts = allowed_hosts(config, bound_host)
    return Guard(create_app(server), server.token, config.max_upload_bytes, hosts, config.body_timeout)


def http_server(app: Guard, header_timeout: float):
    """uvicorn on HTTP/1.1 (h11, on every install), with the deadline for request headers."""
    import uvicorn

    protocol = functools.partial(HeaderDeadline, header_timeout=header_timeout)
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, http=protocol))


def serve(config: ServerConfig) -> int:
    sock = bind(config.host, config.port)
    _log_to_stderr()
    os.umask(0o077)  # uploads, results, token and state: readable by the user only
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
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
            "the token, but traffic is not encrypted. Other machines must use this machine's name or an "
            "address given with --allow-host",
            file=sys.stderr,
        )
    state_file = config.data_dir / STATE_FILE
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    server = None
    try:
        token = load_token(config.data_dir)
        server = Server(config, token)
        server.start()
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        state = {"url": url, "pid": os.getpid(), "protocol": PROTOCOL_VERSION, "version": __version__}
        write_atomically(state_file, json.dumps({**state, "started": time.time()}).encode())
        print(f"{LISTENING_PREFIX}{url}", flush=True)
        http_server(guarded_app(server, host), config.header_timeout).run(sockets=[sock])
    finally:
        if server is not None:
            server.worker.stop()
        state_file.unlink(missing_ok=True)
        lock.close()
        sock.close()
    return 0

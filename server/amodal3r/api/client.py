"""A client of the reconstruction server in the standard library only (Blender's Python has no
requests). Blocking calls: the Blender side runs them off its main thread."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .environment import TOKEN
from .protocol import (
    API_PREFIX,
    LISTENING_PREFIX,
    PROTOCOL_VERSION,
    JobParams,
    JobStatus,
    PlaceParams,
    SegmentParams,
    SegmentReply,
    view_field,
)

GLB_TYPE = "model/gltf-binary"


class ServerError(RuntimeError):
    """The server answered with an error; ``detail`` is its message for people."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"server error {status}: {detail}")
        self.status = status
        self.detail = detail


class ServerUnavailable(ConnectionError):
    """Nothing answers at the server's address: not started, crashed, or a wrong URL."""


@dataclass
class Upload:
    """One file of a multipart body."""

    field: str
    filename: str
    data: bytes
    content_type: str = "image/png"


def encode_multipart(fields: dict[str, str], files: list[Upload]) -> tuple[bytes, str]:
    """``(body, content type)`` of a multipart/form-data request."""
    boundary = f"amodal3r-{secrets.token_hex(12)}"
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        parts.append(value.encode() + b"\r\n")
    for upload in files:
        safe_name = upload.filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{upload.field}"; '
            f'filename="{safe_name}"\r\nContent-Type: {upload.content_type}\r\n\r\n'.encode()
        )
        parts.append(upload.data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def view_uploads(views: list[dict[str, str | Path]]) -> list[Upload]:
    """Files of a job from ``[{"image": path, "target_mask": path, ...}, ...]``."""
    uploads = []
    for index, view in enumerate(views):
        for kind, path in view.items():
            path = Path(path)
            uploads.append(Upload(view_field(index, kind), path.name, path.read_bytes()))
    return uploads


class Client:
    def __init__(self, url: str, token: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> tuple[bytes, str]:
        """``(body, content type)`` of a successful reply; errors raise ServerError/ServerUnavailable."""
        headers = {"Authorization": f"Bearer {self.token}"}
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(f"{self.url}{API_PREFIX}{path}", data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as reply:
                return reply.read(), reply.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            raise ServerError(error.code, _detail(error)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise ServerUnavailable(f"no reconstruction server answers at {self.url} ({reason})") from None

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path)[0])

    def post_json(self, path: str, payload: Any = None) -> Any:
        body = json.dumps(payload if payload is not None else {}).encode()
        return json.loads(self.request("POST", path, body, "application/json")[0])

    def post_multipart(self, path: str, fields: dict[str, str], files: list[Upload]) -> Any:
        body, content_type = encode_multipart(fields, files)
        return json.loads(self.request("POST", path, body, content_type, timeout=max(self.timeout, 120))[0])

    def health(self) -> dict:
        reply = self.get_json("/health")
        if reply.get("protocol") != PROTOCOL_VERSION:
            raise ServerError(
                0,
                f"the server speaks protocol {reply.get('protocol')}, this client "
                f"{PROTOCOL_VERSION}: update the server (Set up backend) or the extension",
            )
        return reply

    def info(self) -> dict:
        return self.get_json("/info")

    def submit(self, views: list[dict[str, str | Path]] | list[Upload], params: JobParams) -> JobStatus:
        """Start a job; ``views`` are paths per view or ready ``Upload``s."""
        uploads = views if views and isinstance(views[0], Upload) else view_uploads(views)  # type: ignore[arg-type]
        reply = self.post_multipart("/jobs", {"params": params.validate().to_json()}, uploads)  # type: ignore[arg-type]
        return JobStatus.from_dict(reply)

    def job(self, job_id: str) -> JobStatus:
        return JobStatus.from_dict(self.get_json(f"/jobs/{job_id}"))

    def jobs(self) -> list[JobStatus]:
        return [JobStatus.from_dict(j) for j in self.get_json("/jobs")["jobs"]]

    def cancel(self, job_id: str) -> JobStatus:
        return JobStatus.from_dict(self.post_json(f"/jobs/{job_id}/cancel"))

    def download_result(self, job_id: str, name: str, destination: str | Path) -> Path:
        """Save one result file; it appears at ``destination`` only when complete."""
        data, _ = self.request("GET", f"/jobs/{job_id}/results/{name}", timeout=max(self.timeout, 120))
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.part")
        partial.write_bytes(data)
        os.replace(partial, destination)
        return destination

    def place(
        self,
        mesh: str | Path | bytes,
        view: dict[str, str | Path] | list[Upload],
        params: PlaceParams | None = None,
    ) -> dict:
        """The ``pose.json`` object (``api.camera.Pose``) of a GLB (a path or its bytes) fitted to one
        view of its photo: ``{"image": path, "target_mask": path, ...}`` or ready ``Upload``s."""
        if isinstance(mesh, bytes):
            glb = Upload("mesh", "mesh.glb", mesh, GLB_TYPE)
        else:
            glb = Upload("mesh", Path(mesh).name, Path(mesh).read_bytes(), GLB_TYPE)
        files = view if isinstance(view, list) else view_uploads([view])
        fields = {"params": (params or PlaceParams()).validate().to_json()}
        return self.post_multipart("/place", fields, [glb, *files])

    def upload_image(self, data: bytes, filename: str = "image.png") -> str:
        return self.post_multipart("/images", {}, [Upload("image", filename, data)])["image_id"]

    def segment(self, params: SegmentParams, image: bytes | None = None) -> tuple[bytes, SegmentReply]:
        """``(mask PNG bytes, reply)``; send the image once, then its ``image_id``."""
        files = [Upload("image", "image.png", image)] if image is not None else []
        reply = SegmentReply.from_dict(self.post_multipart("/segment", {"params": params.validate().to_json()}, files))
        return base64.b64decode(reply.mask_png), reply

    def models(self) -> dict:
        return self.get_json("/models")

    def download_models(self, components: list[str]) -> dict:
        return self.post_json("/models/download", {"components": components})

    def download_status(self) -> dict:
        return self.get_json("/models/download")


def _detail(error: urllib.error.HTTPError) -> str:
    """The server's ``detail`` message, or the raw reply when it is not ours."""
    raw = error.read()
    try:
        detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")[:500] or error.reason
    if isinstance(detail, list):  # FastAPI's validation errors
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg', '')}" for d in detail)
    return str(detail)


@dataclass
class LocalServer:
    """A server child process and how to reach it."""

    process: subprocess.Popen
    url: str
    token: str
    output: list[str]  # its stdout and stderr lines so far, for error messages

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.url, self.token, timeout)

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.output[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def launch_server(
    python: str | Path,
    model_dir: str | Path,
    data_dir: str | Path,
    *,
    token: str | None = None,
    extra_args: list[str] | None = None,
    startup_timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> LocalServer:
    """Start ``python -m amodal3r.cli serve`` on a free loopback port and wait until it listens.

    Raises ``ServerUnavailable`` with the server's own last lines when it exits or stays silent.
    """
    token = token or secrets.token_urlsafe(32)
    command = [
        str(python),
        "-u",
        "-m",
        "amodal3r.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        *(extra_args or []),
    ]
    child_env = {**os.environ, **(env or {}), TOKEN: token}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=child_env,
        text=True,
        errors="replace",
    )
    output: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            output.append(line.rstrip())
            if line.startswith(LISTENING_PREFIX) and not url:
                url.append(line[len(LISTENING_PREFIX) :].strip())
                ready.set()
        ready.set()

    threading.Thread(target=read, name="amodal3r-server-output", daemon=True).start()
    deadline = time.monotonic() + startup_timeout
    while not ready.wait(0.1) and time.monotonic() < deadline:
        pass
    if not url:
        server = LocalServer(process, "", token, output)
        server.stop()
        raise ServerUnavailable(f"the reconstruction server did not start ({' '.join(command)}):\n{server.tail()}")
    return LocalServer(process, url[0], token, output)

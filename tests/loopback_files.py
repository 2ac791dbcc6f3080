"""In-memory files behind an HTTP server on loopback, answering as download sites and the Hugging Face Hub do
(HEAD, Range requests, ETag and X-Repo-Commit headers), and recording the requests it saw."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HF_COMMIT = "0" * 40


@dataclass
class Served:
    """In-memory files behind a loopback server, and the requests it saw (path, Range header)."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    honour_range: bool = True


def _handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # huggingface_hub asks for the metadata first
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            data = served.files.get(self.path)
            served.requests.append((self.path, self.headers.get("Range")))
            if data is None:
                self.send_error(404)
                return
            start = (
                int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1))
                if self.headers.get("Range") and served.honour_range
                else 0
            )
            if start >= len(data) > 0:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", HF_COMMIT)
            self.end_headers()
            if body:
                self.wfile.write(data[start:])

        def log_message(self, *args: object) -> None:
            """Quiet: pytest shows failures, not access logs."""

    return Handler


@contextmanager
def serve_files() -> Iterator[Served]:
    state = Served()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

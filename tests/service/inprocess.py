"""The reconstruction server in this process, on a loopback port, through the same app and uvicorn
set-up as ``amodal3r serve``: tests can patch its parts (a full disk, a dead worker)."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amodal3r.api.client import Client
from amodal3r.service.app import Server, ServerConfig, bind, guarded_app, http_server

TOKEN = "test-token"


@dataclass
class Running:
    url: str
    port: int
    server: Server

    def client(self) -> Client:
        return Client(self.url, TOKEN, timeout=60)

    def request(
        self, method: str, path: str, headers: list[tuple[str, str]] | None = None, body: Any = None, **kwargs: Any
    ) -> tuple[int, bytes]:
        """``(status, body)`` of one raw request; ``headers`` may repeat a name. The token is sent
        unless ``headers`` holds an Authorization header."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            given = headers or []
            own_host = any(name.lower() == "host" for name, _ in given)
            connection.putrequest(method, path, skip_host=own_host, skip_accept_encoding=True)
            if not any(name.lower() == "authorization" for name, _ in given):
                given = [*given, ("Authorization", f"Bearer {TOKEN}")]
            for name, value in given:
                connection.putheader(name, value)
            chunked = kwargs.get("chunked", False)
            if chunked:
                connection.putheader("Transfer-Encoding", "chunked")
            elif body is not None:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders()
            if chunked:
                for piece in body:
                    connection.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                connection.send(b"0\r\n\r\n")
            elif body is not None:
                connection.send(body)
            reply = connection.getresponse()
            return reply.status, reply.read()
        finally:
            connection.close()


@contextmanager
def serving(model_dir: Path, data_dir: Path, **settings: Any) -> Iterator[Running]:
    """A started server (``settings`` are ``ServerConfig`` fields) until the block ends."""
    config = ServerConfig(model_dir=model_dir, data_dir=data_dir, device="cpu", **settings)
    server = Server(config, TOKEN)
    server.start()
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    http = http_server(guarded_app(server, "127.0.0.1"), config.header_timeout)
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, name="test-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert http.started, "the in-process server did not start"
    try:
        yield Running(f"http://127.0.0.1:{port}", port, server)
    finally:
        http.should_exit = True
        thread.join(15)
        server.worker.stop()
        sock.close()

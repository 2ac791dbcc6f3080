"""The request guard in front of every route, and the connection-level header deadline.

``Guard`` (ASGI middleware) refuses, before any route runs: a ``Host`` header that names another
server (DNS rebinding: a web page's script reaching the loopback server under its own domain), two
``Authorization`` headers, a missing or wrong bearer token (the scheme in any case), and a body over
the upload limit, declared or streamed. A body that stalls for ``body_timeout`` seconds is answered
408. ``HeaderDeadline`` is uvicorn's HTTP/1.1 protocol with a deadline for the request headers: a
client that connects and sends nothing, or its headers a byte at a time, is disconnected.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from amodal3r.api.environment import TOKEN

DRAIN_FACTOR = 4  # a refused body is read up to this many times the limit, so the reply arrives
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

Receive = Callable[[], Awaitable[dict[str, Any]]]


def host_name(header: bytes) -> str:
    """The host part of a ``Host`` header, lower case, without its port (IPv6 without brackets)."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    name, colon, port = text.rpartition(":")
    return name if colon and port.isdigit() else text


def too_large(limit: int) -> str:
    return (
        f"request too large: at most {limit // (1024 * 1024)} MiB. Downscale the images (the model sees "
        "518 pixels) or send fewer views"
    )


class Guard:
    """ASGI middleware: the Host header, exactly one bearer token, the size limit, a body that keeps coming."""

    def __init__(self, app, token: str, max_bytes: int, hosts: frozenset[str] | None, body_timeout: float):
        self.app, self.token, self.max_bytes = app, token.encode(), max_bytes
        self.hosts, self.body_timeout = hosts, body_timeout  # hosts None: any Host header

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope["headers"])
        if refusal is not None:
            await self._drain(receive)
            return await refusal(scope, receive, send)
        return await self.app(scope, self._guarded(receive), send)

    def _guarded(self, receive: Receive) -> Receive:
        """``receive`` with the size limit and the stall deadline while the body comes in."""
        received, finished = 0, False

        async def guarded() -> dict[str, Any]:
            nonlocal received, finished
            if finished:  # after the body: waiting for a disconnect is not a stalled upload
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                raise HTTPException(
                    408, f"the request body stalled: nothing arrived for {self.body_timeout:g} s; send it again"
                ) from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await self._drain(receive)
                raise HTTPException(413, too_large(self.max_bytes))
            finished = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return guarded

    async def _drain(self, receive: Receive) -> None:
        """Read what the client still sends before refusing: a reply sent mid-upload reaches the client
        as a connection reset instead of the reason. A client sending far past the limit is cut off."""
        budget = DRAIN_FACTOR * self.max_bytes
        while budget > 0:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                return
            budget -= len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    def _refusal(self, headers: list[tuple[bytes, bytes]]) -> JSONResponse | None:
        hosts = [value for key, value in headers if key == b"host"]
        if self.hosts is not None and (len(hosts) != 1 or host_name(hosts[0]) not in self.hosts):
            named = host_name(hosts[0]) if hosts else ""
            return _refuse(
                400,
                f"Host {named!r} is not this server (it answers to {', '.join(sorted(self.hosts))}): connect "
                f"to its own address, or start it with --allow-host {named or 'NAME'}",
            )
        auth = [value for key, value in headers if key == b"authorization"]
        if len(auth) > 1:
            return _refuse(400, f"{len(auth)} Authorization headers: send exactly one")
        scheme, _, token = auth[0].strip().partition(b" ") if auth else (b"", b"", b"")
        if scheme.lower() != b"bearer":
            return _refuse(
                401,
                f"missing token: send 'Authorization: Bearer <token>' (the token is in {TOKEN} or the server's "
                "token file)",
                {"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.strip(), self.token):
            return _refuse(403, "wrong token: use the token this server was started with")
        length = dict(headers).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return _refuse(413, too_large(self.max_bytes))
        return None


def _refuse(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status, headers=headers)


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, disconnecting a client whose request headers are not complete
    ``header_timeout`` seconds after it connected or after the previous reply."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self._waiting_for_headers():
            return
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_headers():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

"""What keeps the server safe to run: loopback by default, a bearer token, bounded bodies and a bounded queue.

The guard is plain ASGI middleware so it acts before anything reads the body: a request without the
token, or with a body over the limit, is answered without being parsed, and nothing it asked for
happens.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
from typing import Any, Awaitable, Callable, Iterable, Optional

from starlette.exceptions import HTTPException

from langchain_adaptquant.errors import AdaptQuantError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class InsecureBindError(AdaptQuantError):
    """Serving on a non-loopback address without a token would expose model control to the network."""


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1; anything else (0.0.0.0, a LAN address, a name) is not."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: Optional[str]) -> None:
    """Refuse to expose the server beyond this machine unless requests must carry a token."""
    if not is_loopback(host) and not token:
        raise InsecureBindError(
            f"refusing to bind {host!r} without a token: a non-loopback address exposes chat and cache/clear "
            "to the network; pass --token (or ADAPTQUANT_TOKEN), or bind 127.0.0.1"
        )


def token_matches(header: Optional[str], token: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


async def send_error(send: Send, status: int, message: str, kind: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """An OpenAI-style JSON error, written straight to ASGI (the app never saw the request)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body without Content-Length grows past the limit.

    An HTTPException, because FastAPI re-raises those from body parsing (others become a 400).
    """

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class GuardMiddleware:
    """Token check on ``protected`` paths, then a body-size limit on every request."""

    def __init__(self, app: Any, token: Optional[str], protected: Iterable[str], max_body_bytes: int) -> None:
        self.app = app
        self.token = token
        self.protected = frozenset(protected)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}
        if self.token and scope.get("path") in self.protected:
            if not token_matches(headers.get("authorization"), self.token):
                reason = "missing" if not headers.get("authorization") else "invalid"
                await send_error(
                    send, 401, f"{reason} bearer token: this endpoint needs 'Authorization: Bearer <token>'",
                    "authentication_error", [(b"www-authenticate", b"Bearer")],
                )
                return
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_error(send, 400, f"invalid Content-Length header: {declared!r}", "invalid_request_error")
                return
            if int(declared) > self.max_body_bytes:
                await send_error(send, 413, self._too_large(int(declared)), "request_too_large")
                return
            await self.app(scope, receive, send)
            return
        await self._counted(scope, receive, send)

    def _too_large(self, size: Optional[int]) -> str:
        got = f"{size} bytes" if size is not None else "more"
        return f"request body is {got}; this server accepts at most {self.max_body_bytes} bytes (max_body_bytes)"

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A chunked body: count bytes as they arrive and stop at the limit."""
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self._too_large(None))
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await send_error(send, 413, self._too_large(None), "request_too_large")


class InFlightLimiter:
    """At most ``limit`` chat requests at once (running or waiting); more are refused, not queued forever.

    Like Ollama's OLLAMA_MAX_QUEUE: a client learns at once that the server is full (503) instead of
    piling up threads and memory.
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"invalid max_queue: {limit!r}; allowed: an integer >= 1")
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._count = max(self._count - 1, 0)

    @property
    def in_flight(self) -> int:
        return self._count

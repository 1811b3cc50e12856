"""What every lean HTTP handler needs: read a bounded body, answer, answer an error.

Raw ASGI and orjson, nothing else on the path. Every error leaves as ``{"error": "..."}``
with its status and headers (``Retry-After`` on 503s).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..core.errors import PayloadTooLarge, ServingError
from ..core.protocol import dumps

__all__ = [
    "CLIENT_GONE",
    "JSON",
    "Receive",
    "Send",
    "Scope",
    "ClientGone",
    "declared_length",
    "read_body",
    "respond",
    "respond_error",
]

JSON = {"content-type": "application/json"}

#: the ASGI scope extension through which slimserve's own HTTP protocol tells a request's
#: handler whether its client hung up (a zero-argument call; service/server/connections.py)
CLIENT_GONE = "slimserve.client_gone"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ClientGone(Exception):
    """The client hung up before its request was read or answered: nothing to send."""


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | bytearray:
    """The request body, at most ``limit`` bytes: :class:`PayloadTooLarge` (413) past it,
    decided from ``Content-Length`` before reading when the client declares one. A body in
    several chunks is gathered into one buffer of its declared size (no second copy)."""
    declared = declared_length(scope["headers"])
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit}")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone()
    first: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(first) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        return first
    body = bytearray(first)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        body += message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        if not message.get("more_body", False):
            return body


async def respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def respond_error(send: Send, exc: ServingError) -> None:
    """``{"error": ...}`` with the error's status and headers (``Retry-After`` for 503s)."""
    await respond(send, exc.status_code, dumps({"error": exc.message}), {**JSON, **exc.headers})

"""An HTTP request as it travels from the router to a group's replica, and back.

The router reads the request once (bounded by ``SLIMSERVE_MAX_BODY_BYTES``) and hands it to a
replica through a Ray Serve handle as a :class:`Forwarded`; the replica runs it through the same
ASGI app a worker serves (:class:`service.http.app.HttpApp`) and returns an :class:`Answered`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..http.asgi import Receive, Scope, Send, read_body

__all__ = ["Forwarded", "Answered", "read_request", "call_asgi", "send_answer"]


@dataclass(frozen=True)
class Forwarded:
    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


@dataclass(frozen=True)
class Answered:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def read_request(scope: Scope, receive: Receive, limit: int) -> Forwarded:
    """The whole request: :class:`service.core.errors.PayloadTooLarge` past ``limit`` bytes."""
    body = await read_body(scope, receive, limit) if scope["method"] != "GET" else b""
    return Forwarded(
        scope["method"],
        scope["path"],
        scope.get("query_string", b""),
        [(bytes(k), bytes(v)) for k, v in scope["headers"]],
        bytes(body),
    )


async def call_asgi(app: Any, request: Forwarded) -> Answered:
    """``request`` through the ASGI ``app`` in this process; its answer gathered whole."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": None,
        "server": None,
        "extensions": {},
    }
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.Future()  # the client stays connected until the answer is back
        raise AssertionError("unreachable")

    status = 500
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))

    await app(scope, receive, send)
    return Answered(status, headers, b"".join(chunks))


async def send_answer(send: Send, answer: Answered) -> None:
    await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
    await send({"type": "http.response.body", "body": answer.body})

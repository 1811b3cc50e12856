"""The Open Inference Protocol v2 REST API as a lean ASGI app: a thin codec over the dataplane.

It routes, reads the body, decodes it (:mod:`service.core.protocol`) and encodes the answer;
resolution, validation, batching, onnxruntime and metrics are :mod:`service.serving.dataplane`'s.
Nothing else sits on the path: a raw ASGI callable and orjson. Every error leaves as
``{"error": "..."}`` with its status; a client's mistake is logged as one line.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..core.errors import ModelNotFound, PayloadTooLarge, ServingError
from ..core.protocol import HEADER_LENGTH, InferRequest, decode_request, dumps, encode_response
from ..serving.dataplane import DataPlane, Inference
from ..serving.store import LoadedModel

__all__ = ["V2App", "respond_error"]

log = logging.getLogger("slimserve.v2")

_JSON = {"content-type": "application/json"}

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _ClientGone(Exception):
    pass


class V2App:
    """Serves ``/v2/...``: routes, reads bodies and writes answers; the dataplane does the rest."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.settings = dataplane.settings
        self.server_metadata = dumps(dataplane.server_metadata())

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        try:
            await self._route(method, path, scope, receive, send)
        except _ClientGone:
            return
        except ServingError as exc:
            log.warning("%d %s %s: %s", exc.status_code, method, path, exc.message)
            await respond_error(send, exc)
        except Exception:
            log.exception("500 %s %s", method, path)
            await _respond(send, 500, dumps({"error": "internal server error"}), _JSON)

    async def _route(
        self, method: str, path: str, scope: dict[str, Any], receive: Receive, send: Send
    ) -> None:
        parts = path.strip("/").split("/")
        if parts[0] != "v2":
            raise ModelNotFound(f"no route for {path}")
        rest = parts[1:]
        if method == "GET" and not rest:
            return await _respond(send, 200, self.server_metadata, _JSON)
        if rest[:1] == ["health"] and len(rest) == 2 and method == "GET":
            return await self._health(rest[1], send)
        if rest == ["repository", "index"] and method == "POST":
            return await _respond(send, 200, dumps(self.dataplane.repository_index()), _JSON)
        if len(rest) >= 2 and rest[0] == "models":
            name, tail = rest[1], rest[2:]
            version = None
            if tail[:1] == ["versions"] and len(tail) >= 2:
                version, tail = tail[1], tail[2:]
            if method == "POST" and tail == ["infer"]:
                return await self._infer(name, version, scope, receive, send)
            if method == "GET" and tail == []:
                body = dumps(self.dataplane.model_metadata(name, version))
                return await _respond(send, 200, body, _JSON)
            if method == "GET" and tail == ["ready"]:
                ready = self.dataplane.model_ready(name, version)
                return await _respond(send, 200, dumps({"name": name, "ready": ready}), _JSON)
        raise ModelNotFound(f"no route for {method} {path}")

    async def _health(self, which: str, send: Send) -> None:
        if which == "live":
            return await _respond(send, 200, dumps({"live": True}), _JSON)
        if which != "ready":
            raise ModelNotFound(f"no health endpoint '{which}'; expected live or ready")
        ready = self.dataplane.server_ready()
        body = {"ready": ready, "not_ready_models": self.dataplane.not_ready()}
        status = 200 if ready else 503
        headers = _JSON if ready else {**_JSON, "Retry-After": str(self.settings.retry_after_s)}
        return await _respond(send, status, dumps(body), headers)

    async def _infer(
        self, name: str, version: str | None, scope: dict[str, Any], receive: Receive, send: Send
    ) -> None:
        headers = dict(scope["headers"])

        async def decode(model: LoadedModel) -> InferRequest:
            body = await _read_body(headers, receive, self.settings.max_body_bytes)
            header_length = headers.get(HEADER_LENGTH.encode())
            return decode_request(body, header_length.decode() if header_length else None)

        def encode(done: Inference) -> tuple[bytes, dict[str, str]]:
            model = done.model
            return encode_response(
                model.name,
                str(model.version),
                done.request,
                done.outputs,
                done.values,
                {"variant": model.variant},
            )

        body, extra = await self.dataplane.infer(name, version, decode, encode)
        await _respond(send, 200, body, extra)


async def _read_body(headers: dict[bytes, bytes], receive: Receive, limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def respond_error(send: Send, exc: ServingError) -> None:
    """``{"error": ...}`` with the error's status and headers (``Retry-After`` for 503s)."""
    await _respond(send, exc.status_code, dumps({"error": exc.message}), {**_JSON, **exc.headers})


async def _respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})

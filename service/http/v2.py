"""The Open Inference Protocol v2 REST API: routes and the wire codec over the dataplane.

It routes, reads the body, decodes it (:mod:`service.core.protocol`, checked against the
resolved model before its data is converted) and encodes the answer; resolution, validation,
batching, onnxruntime and metrics are :mod:`service.serving.dataplane`'s. Errors are raised
as :class:`ServingError` for :class:`service.http.app.HttpApp` to answer.
"""

from __future__ import annotations

from ..core.errors import MethodNotAllowed, ModelNotFound
from ..core.logs import clip
from ..core.protocol import HEADER_LENGTH, InferRequest, decode_request, dumps, encode_response
from ..serving.dataplane import DataPlane, Inference
from ..serving.store import LoadedModel
from ..serving.tracing import TRACE_ID_HEADER, Call
from .asgi import JSON, Receive, Scope, Send, read_body, respond

__all__ = ["V2App"]

_HEADER_LENGTH = HEADER_LENGTH.encode()


class V2App:
    """Serves ``/v2/...``: routes, reads bodies and writes answers; the dataplane does the rest."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.settings = dataplane.settings
        self.server_metadata = dumps(dataplane.server_metadata())

    async def __call__(self, scope: Scope, receive: Receive, send: Send, call: Call) -> None:
        method, path = scope["method"], scope["path"]
        rest = path.strip("/").split("/")[1:]
        route, name, version = _route(rest)
        if route is None:
            raise ModelNotFound(f"no route for {method} {clip(path, 100)}")
        allowed = "POST" if route in ("infer", "index") else "GET"
        if method != allowed:
            raise MethodNotAllowed(
                f"{clip(path, 100)} takes {allowed}, got {clip(method, 16)}", allowed
            )
        if route == "infer":
            return await self._infer(name, version, scope, receive, send, call)
        if route == "metadata":
            body = dumps(self.dataplane.model_metadata(name, version))
        elif route == "ready":
            ready = self.dataplane.model_ready(name, version)
            body = dumps({"name": name, "ready": ready})
        elif route == "server":
            body = self.server_metadata
        elif route == "index":
            body = dumps(self.dataplane.repository_index())
        else:
            return await self._health(route.removeprefix("health-"), send)
        await respond(send, 200, body, JSON)

    async def _health(self, which: str, send: Send) -> None:
        if which == "live":
            return await respond(send, 200, dumps({"live": True}), JSON)
        ready = self.dataplane.server_ready()
        body = {"ready": ready, "not_ready_models": self.dataplane.not_ready()}
        status = 200 if ready else 503
        headers = JSON if ready else {**JSON, "Retry-After": str(self.settings.retry_after_s)}
        return await respond(send, status, dumps(body), headers)

    async def _infer(
        self,
        name: str,
        version: str | None,
        scope: Scope,
        receive: Receive,
        send: Send,
        call: Call,
    ) -> None:
        async def decode(model: LoadedModel) -> InferRequest:
            body = await read_body(scope, receive, self.settings.max_body_bytes)
            header_length = None
            for key, value in scope["headers"]:
                if key == _HEADER_LENGTH:
                    header_length = value.decode("latin-1")
            return decode_request(body, header_length, model.expected)

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

        body, extra = await self.dataplane.infer(name, version, decode, encode, call)
        if call.trace_id is not None:
            extra[TRACE_ID_HEADER] = call.trace_id
        await respond(send, 200, body, extra)


def _route(rest: list[str]) -> tuple[str | None, str, str | None]:
    """``(route, model, version)`` of the path below ``/v2``; route None when there is none.
    Routes: server, health-live, health-ready, index, metadata, ready, infer."""
    if not rest:
        return "server", "", None
    if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
        return f"health-{rest[1]}", "", None
    if rest == ["repository", "index"]:
        return "index", "", None
    if len(rest) >= 2 and rest[0] == "models" and rest[1]:
        name, tail = rest[1], rest[2:]
        version = None
        if tail[:1] == ["versions"] and len(tail) >= 2:
            version, tail = tail[1], tail[2:]
        if not tail:
            return "metadata", name, version
        if tail in (["ready"], ["infer"]):
            return tail[0], name, version
    return None, "", None

"""The Open Inference Protocol v2 REST API: routes and the wire codec over the dataplane.

It routes, reads the body, decodes it (:mod:`service.core.protocol`, checked against the
resolved model before its data is converted) and encodes the answer; resolution, validation,
batching, onnxruntime and metrics are :mod:`service.serving.dataplane`'s. Errors are raised
as :class:`ServingError` for :class:`service.http.app.HttpApp` to answer.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

from ..core.errors import InvalidInput, MethodNotAllowed, ModelNotFound, PayloadTooLarge
from ..core.logs import clip
from ..core.policies import Traffic
from ..core.protocol import HEADER_LENGTH, InferRequest, decode_request, dumps, encode_response
from ..serving.dataplane import DataPlane, Inference
from ..serving.store import LoadedModel
from ..serving.tracing import TRACE_ID_HEADER, Call
from .asgi import JSON, Receive, Scope, Send, read_body, respond

__all__ = ["V2App"]

_HEADER_LENGTH = HEADER_LENGTH.encode()
#: the methods of routes that are not GET
_METHODS = {
    "infer": "POST",
    "index": "POST",
    "load": "POST",
    "unload": "POST",
    "traffic": "GET, POST",
}


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
        allowed = _METHODS.get(route, "GET")
        if method not in allowed.split(", "):
            raise MethodNotAllowed(
                f"{clip(path, 100)} takes {allowed}, got {clip(method, 16)}", allowed
            )
        if route == "infer":
            return await self._infer(name, version, scope, receive, send, call)
        if route in ("load", "unload", "traffic", "index"):
            body = await self._repository(route, name, method, scope, receive)
            return await respond(send, 200, body, JSON)
        if route == "metadata":
            body = dumps(self.dataplane.model_metadata(name, version))
        elif route == "ready":
            ready = self.dataplane.model_ready(name, version)
            body = dumps({"name": name, "ready": ready})
        elif route == "server":
            body = self.server_metadata
        else:
            return await self._health(route.removeprefix("health-"), send)
        await respond(send, 200, body, JSON)

    async def _repository(
        self, route: str, name: str, method: str, scope: Scope, receive: Receive
    ) -> bytes:
        """The repository extension (Triton's): index, load, unload; and slimserve's traffic
        policy of a model (GET it, POST a new one, POST null to go back to the manifest's)."""
        lifecycle = self.dataplane.lifecycle
        raw = await read_body(scope, receive, 1 << 20) if method == "POST" else b""
        doc = _json_object(raw, f"{route} request") if raw.strip() else {}
        if route == "traffic" and method == "POST":
            await lifecycle.api_traffic(name, _traffic(doc))
        elif doc is None:
            raise InvalidInput(f"{route} request: expected a JSON object, got null")
        if route == "index" and doc is not None:
            ready = doc.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidInput("index request 'ready': expected a boolean")
            return dumps(self.dataplane.repository_index(ready))
        if route == "load":
            await lifecycle.api_load(name)
        elif route == "unload":
            await lifecycle.api_unload(name)
        entry = self.dataplane.store.entries.get(name)
        if route == "traffic":
            if entry is None:
                raise ModelNotFound(f"model {clip(name, 64)!r} is not in the repository")
            return dumps(entry.traffic.model_dump() if entry.traffic else None)
        return b"{}"

    async def _health(self, which: str, send: Send) -> None:
        if which == "live":
            return await respond(send, 200, dumps({"live": True}), JSON)
        ready = self.dataplane.server_ready()
        body = {
            "ready": ready,
            "not_ready_models": self.dataplane.not_ready(),
            "listeners": {"http": True, **self.dataplane.listeners_ready()},
        }
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

        body, extra = await self.dataplane.infer(name, version, decode, encode_answer, call)
        if call.trace_id is not None:
            extra[TRACE_ID_HEADER] = call.trace_id
        await respond(send, 200, body, extra)

    async def infer_body(
        self,
        name: str,
        version: str | None,
        body: bytes | bytearray | None,
        header_length: str | None,
        call: Call,
    ) -> tuple[bytes, dict[str, str]]:
        """The same, for a body already read (slimserve's protocol reads it before calling);
        None for one that was over the limit (a 413 once the model is known, as above)."""

        async def decode(model: LoadedModel) -> InferRequest:
            if body is None:
                limit = self.settings.max_body_bytes
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            return decode_request(body, header_length, model.expected)

        return await self.dataplane.infer(name, version, decode, encode_answer, call)


def encode_answer(done: Inference) -> tuple[bytes, dict[str, str]]:
    """The v2 answer, with the version and variant that gave it in headers too (a canary may
    have): ``X-Model-Version``, ``X-Model-Variant``."""
    model = done.model
    body, headers = encode_response(
        model.name,
        str(model.version),
        done.request,
        done.outputs,
        done.values,
        {"variant": model.variant},
    )
    headers["x-model-version"] = str(model.version)
    headers["x-model-variant"] = model.variant
    return body, headers


def _route(rest: list[str]) -> tuple[str | None, str, str | None]:
    """``(route, model, version)`` of the path below ``/v2``; route None when there is none.
    Routes: server, health-live, health-ready, index, load, unload, traffic (the repository
    extension), metadata, ready, infer."""
    if not rest:
        return "server", "", None
    if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
        return f"health-{rest[1]}", "", None
    if rest == ["repository", "index"]:
        return "index", "", None
    repository = len(rest) == 4 and rest[:2] == ["repository", "models"] and rest[2]
    if repository and rest[3] in ("load", "unload", "traffic"):
        return rest[3], rest[2], None
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


def _json_object(raw: bytes | bytearray, what: str) -> dict[str, Any] | None:
    """A request body that is a JSON object, or ``null`` (None)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what}: not valid JSON: {exc}") from None
    if doc is not None and not isinstance(doc, dict):
        raise InvalidInput(f"{what}: expected a JSON object")
    return doc


def _traffic(doc: dict[str, Any] | None) -> Traffic | None:
    """A traffic policy from a request body; ``null`` clears it."""
    if doc is None:
        return None
    try:
        return Traffic.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'traffic'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidInput(f"traffic policy: {clip(problems, 300)}") from None

"""The Open Inference Protocol v2 REST API as a lean ASGI app.

request -> validate -> batch -> onnxruntime -> encode -> response, with nothing else on the
path: a raw ASGI callable, orjson, and the model's batcher. Every error leaves as
``{"error": "..."}`` with its status; a client's mistake is logged as one line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any

from ..core.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    ServingError,
)
from ..core.protocol import (
    HEADER_LENGTH,
    decode_request,
    dumps,
    encode_response,
    select_outputs,
)
from ..serving.metrics import UNKNOWN_MODEL, metrics
from ..serving.store import VARIANT_SEPARATOR, LoadedModel, ModelStore

__all__ = ["V2App", "PLATFORM", "EXTENSIONS", "respond_error"]

log = logging.getLogger("slimserve.v2")

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
_OUTCOMES: list[tuple[type[ServingError], str]] = [
    (InvalidInput, "invalid_input"),
    (ModelNotFound, "not_found"),
    (PayloadTooLarge, "too_large"),
    (ModelNotReady, "not_ready"),
    (Overloaded, "overloaded"),
    (DeadlineExceeded, "overloaded"),
]
_JSON = {"content-type": "application/json"}

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _ClientGone(Exception):
    pass


def _version() -> str:
    try:
        return metadata.version("slimserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class V2App:
    """Serves ``/v2/...``; ``store`` holds the loaded models."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.settings = store.settings
        self.server_metadata = dumps(
            {"name": "slimserve", "version": _version(), "extensions": EXTENSIONS}
        )

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
            await _respond(
                send, exc.status_code, dumps({"error": exc.message}), {**_JSON, **exc.headers}
            )
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
            return await _respond(send, 200, dumps(self._index()), _JSON)
        if len(rest) >= 2 and rest[0] == "models":
            name, tail = rest[1], rest[2:]
            version = None
            if tail[:1] == ["versions"] and len(tail) >= 2:
                version, tail = tail[1], tail[2:]
            if method == "POST" and tail == ["infer"]:
                return await self._infer(name, version, scope, receive, send)
            if method == "GET" and tail == []:
                return await self._metadata(name, version, send)
            if method == "GET" and tail == ["ready"]:
                model = self.store.ready_model(name, version)
                return await _respond(send, 200, dumps({"name": name, "ready": model.ready}), _JSON)
        raise ModelNotFound(f"no route for {method} {path}")

    async def _health(self, which: str, send: Send) -> None:
        if which == "live":
            return await _respond(send, 200, dumps({"live": True}), _JSON)
        if which != "ready":
            raise ModelNotFound(f"no health endpoint '{which}'; expected live or ready")
        not_ready = {n: m.error for n, m in self.store.models.items() if not m.ready}
        ready = len(not_ready) < len(self.store.models)
        body = {"ready": ready, "not_ready_models": not_ready}
        status = 200 if ready else 503
        headers = _JSON if ready else {**_JSON, "Retry-After": str(self.settings.retry_after_s)}
        return await _respond(send, status, dumps(body), headers)

    def _index(self) -> list[dict[str, Any]]:
        return [
            {
                "name": m.name,
                "version": str(m.version),
                "state": "READY" if m.ready else "UNAVAILABLE",
                "reason": m.error or "",
            }
            for m in self.store.models.values()
        ]

    async def _metadata(self, name: str, version: str | None, send: Send) -> None:
        model = self.store.ready_model(name, version)
        await _respond(send, 200, dumps(model_metadata(model)), _JSON)

    async def _infer(
        self, name: str, version: str | None, scope: dict[str, Any], receive: Receive, send: Send
    ) -> None:
        start = time.perf_counter()
        m = metrics()
        model: LoadedModel | None = None
        labels: tuple[str, str, str] = (UNKNOWN_MODEL, "", "")
        try:
            model = self.store.find(name, version)
            labels = model.labels
            in_flight = m.in_flight.labels(*labels)
            in_flight.inc()
            try:
                model, body, status, headers = await self._serve(model, name, scope, receive)
                labels = model.labels
            finally:
                in_flight.dec()
        except ServingError as exc:
            outcome = next((o for t, o in _OUTCOMES if isinstance(exc, t)), "error")
            m.requests.labels(*labels, outcome).inc()
            raise
        m.requests.labels(*labels, "success").inc()
        await _respond(send, status, body, headers)
        m.request_duration.labels(*labels).observe(time.perf_counter() - start)

    async def _serve(
        self, model: LoadedModel, url_name: str, scope: dict[str, Any], receive: Receive
    ) -> tuple[LoadedModel, bytes, int, dict[str, str]]:
        self.store.require_ready(model)
        headers = dict(scope["headers"])
        body = await _read_body(headers, receive, self.settings.max_body_bytes)
        header_length = headers.get(HEADER_LENGTH.encode())
        request = decode_request(body, header_length.decode() if header_length else None)
        model = self._variant(model, url_name, request.parameters.get("variant"))
        assert model.session is not None
        name = model.name
        wanted = select_outputs(request, model.session.output_names, name)
        values = await self.store.infer(model, request)
        payload, extra = encode_response(
            name, str(model.version), request, wanted, values, {"variant": model.variant}
        )
        return model, payload, 200, extra

    def _variant(self, model: LoadedModel, url_name: str, asked: Any) -> LoadedModel:
        """The variant named by the request's ``parameters.variant`` (the URL's otherwise)."""
        if asked is None:
            return model
        if not isinstance(asked, str) or not asked:
            raise InvalidInput(
                f"request parameter 'variant' for model '{model.name}': expected a variant "
                f"name (string), got {asked!r}"
            )
        if VARIANT_SEPARATOR in url_name and asked != model.variant:
            raise InvalidInput(
                f"model '{model.name}': the URL names variant '{model.variant}', the request "
                f"parameter 'variant' names '{asked}'; name one"
            )
        return self.store.variant(model, asked)


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    """v2 model metadata, plus which variant this is, the others, and the compression card."""
    assert model.session is not None and model.manifest is not None
    manifest = model.manifest
    variants = {}
    for name, entry in manifest.variants.items():
        measured = entry.details.get("measurement") or {}
        variants[name] = {
            "served": name in model.siblings,
            "reason": model.unservable.get(name),
            "metrics": measured.get("metrics"),
            "speedup": measured.get("speedup"),
            "size_bytes": measured.get("size_bytes"),
            "parameters": measured.get("parameters"),
        }
    return {
        "name": model.name,
        "versions": [str(model.version)],
        "platform": PLATFORM,
        "inputs": [t.to_dict() for t in model.session.inputs],
        "outputs": [t.to_dict() for t in model.session.outputs],
        "parameters": {
            "variant": model.variant,
            "default_variant": manifest.default_variant,
            "provider": model.session.provider,
            "variants": variants,
            "selection": manifest.selection.get("reason"),
            "card": model.card,
        },
    }


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

"""Everything served in front of BentoML's stack, and the one place its errors are answered.

``/v2/...`` (:mod:`service.http.v2`), the friendly endpoints (:mod:`service.http.friendly`),
the OpenAPI document (:mod:`service.http.openapi`) and a 404 for every path nobody serves.
Every error leaves as ``{"error": "..."}`` with its status: a client's mistake is one DEBUG
line and part of a WARNING summary at most every 10 s (:class:`service.core.logs.RejectionLog`),
never a traceback; a genuine fault is a 500 with its traceback in the log and a count in
``slimserve_http_errors_total``. A request whose client hung up gets no answer at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..core.errors import ClientClosedRequest, ModelNotFound, ServingError
from ..core.logs import RejectionLog, clip
from ..core.protocol import dumps
from ..serving.dataplane import DataPlane
from ..serving.metrics import metrics
from ..serving.tracing import TRACE_ID_HEADER, Call
from . import friendly
from .asgi import CLIENT_GONE, JSON, ClientGone, Receive, Scope, Send, respond
from .openapi import examples_from, openapi_document
from .v2 import V2App

__all__ = ["HttpApp", "LEAN_PATHS", "client_gone"]

log = logging.getLogger("slimserve.http")

#: the paths (besides /v2/...) served here rather than by BentoML
LEAN_PATHS = frozenset([*friendly.ROUTES, "/docs.json"])


def client_gone(scope: Scope) -> Callable[[], bool] | None:
    """Whether the request's client hung up, where the server can tell (slimserve's own
    worker sets a scope extension for it); None elsewhere."""
    extensions = scope.get("extensions")
    return extensions.get(CLIENT_GONE) if extensions else None


class HttpApp:
    def __init__(self, dataplane: DataPlane, bentoml_spec: Callable[[], dict[str, Any]]) -> None:
        self.dataplane = dataplane
        self.v2 = V2App(dataplane)
        self.friendly = friendly.FriendlyApp(dataplane)
        self._bentoml_spec = bentoml_spec
        self._openapi: bytes | None = None
        self.rejections = RejectionLog(log)
        self.traced = dataplane.tracer is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        call = self._call(scope)
        try:
            if path.startswith("/v2/") or path == "/v2":
                await self.v2(scope, receive, send, call)
            elif path in friendly.ROUTES:
                await self.friendly(scope, receive, send, call)
            elif path == "/docs.json" and scope["method"] in ("GET", "HEAD"):
                await respond(send, 200, self.openapi(), JSON)
            else:
                raise ModelNotFound(f"no route for {scope['method']} {clip(path, 100)}")
        except ClientGone:
            return
        except Exception as exc:
            answer = self.error_answer(exc, scope["method"], path, call)
            if answer is not None:
                await respond(send, *answer)

    def error_answer(
        self, exc: Exception, method: str, path: str, call: Call
    ) -> tuple[int, bytes, dict[str, str]] | None:
        """What a failed request gets: ``(status, {"error"} body, headers)``, logged and
        counted; None when its client hung up (nothing to send)."""
        if not isinstance(exc, ServingError):
            log.error("500 %s %s", method, clip(path), exc_info=exc)
            metrics().http_errors.labels(_endpoint(path), "500").inc()
            return 500, dumps({"error": "internal server error"}), JSON
        where = f"{method} {path}"
        if call.trace_id is not None:
            where = f"{where} trace_id={call.trace_id}"
        self.rejections.rejected(exc.status_code, where, exc.message)
        metrics().http_errors.labels(_endpoint(path), str(exc.status_code)).inc()
        if isinstance(exc, ClientClosedRequest):  # nobody is listening for that one
            return None
        headers = {**JSON, **exc.headers}
        if call.trace_id is not None:
            headers[TRACE_ID_HEADER] = call.trace_id
        return exc.status_code, dumps({"error": exc.message}), headers

    async def infer_now(
        self,
        path: str,
        name: str,
        version: str | None,
        body: bytes | bytearray | None,
        header_length: str | None,
        gone: Callable[[], bool],
        traceparent: str | None,
    ) -> tuple[int, bytes, dict[str, str]] | None:
        """``POST /v2/models/{name}[/versions/{version}]/infer`` for slimserve's own protocol,
        which reads the request itself (no ASGI round trip): the answer to write, or None when
        the client hung up."""
        call = Call(gone, traceparent if self.traced else None)
        try:
            answer, headers = await self.v2.infer_body(name, version, body, header_length, call)
        except Exception as exc:
            return self.error_answer(exc, "POST", path, call)
        if call.trace_id is not None:
            headers[TRACE_ID_HEADER] = call.trace_id
        return 200, answer, headers

    def openapi(self) -> bytes:
        """The published document, built on first use (BentoML's part, /v2, examples)."""
        if self._openapi is None:
            models = [m for m in self.dataplane.store.models.values()]
            schemas = {path: schema for path, (schema, _) in friendly.ROUTES.items()}
            self._openapi = openapi_document(self._bentoml_spec(), schemas, examples_from(models))
        return self._openapi

    def _call(self, scope: Scope) -> Call:
        if not self.traced:
            return Call(client_gone(scope))
        traceparent = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                traceparent = value.decode("latin-1")
        return Call(client_gone(scope), traceparent)


def _endpoint(path: str) -> str:
    """A bounded label for a path: the route it belongs to, or ``other``."""
    if path.startswith("/v2"):
        return "v2"
    return path.lstrip("/") if path in LEAN_PATHS else "other"

"""HTTP connections with the limits uvicorn lacks: a cap, header and body timeouts.

uvicorn closes a keep-alive connection that stays idle after a response, and nothing else: a
connection that never sends a request, one that trickles its headers (slowloris) or stalls in
its body is kept forever, and connections are limited only by file descriptors, so enough idle
sockets stop the server answering anyone. :class:`GuardedHttpProtocol` is uvicorn's httptools
protocol with

- a cap: past ``max_connections`` open connections a new one gets ``503`` with
  ``Retry-After`` and is closed at once (counted, and logged at most once per interval);
- a header timeout: a request's headers must be complete ``header_timeout_s`` after the
  connection opened or the request's first byte arrived, else ``408`` and close;
- a body timeout: its body must be complete ``body_timeout_s`` after its headers;
- for the request handlers, the scope extension ``slimserve.client_gone``: whether the client
  of a request hung up, so queued work for it can be dropped before it reaches onnxruntime;
- the inference route read and answered by the protocol itself, without the ASGI round trip
  (:mod:`service.server.fastpath`).

The timeouts cost two timestamps per request; one sweep a second per worker closes what is
late. Tested in ``tests/e2e/test_connections.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..core.logs import RejectionLog
from ..http.asgi import CLIENT_GONE
from .fastpath import FastRequest, match, response_bytes

__all__ = ["ConnectionLimits", "GuardedHttpProtocol", "guarded_protocol"]

log = logging.getLogger("slimserve.connections")

# connection phases the sweep looks at
_IDLE, _HEADERS, _BODY, _BUSY = 0, 1, 2, 3
_SWEEP_S = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 4096
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    retry_after_s: int = 1


def _raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = orjson.dumps({"error": message})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode("ascii") + body


_on_message_begin = HttpToolsProtocol.on_message_begin
_on_headers_complete = HttpToolsProtocol.on_headers_complete
_on_message_complete = HttpToolsProtocol.on_message_complete
_on_response_complete = HttpToolsProtocol.on_response_complete
_on_body = HttpToolsProtocol.on_body
_on_url = HttpToolsProtocol.on_url
_on_header = HttpToolsProtocol.on_header
_shutdown = HttpToolsProtocol.shutdown


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under :class:`ConnectionLimits` (see the module's doc)."""

    limits = ConnectionLimits()
    refusals = RejectionLog(log)
    #: called with the number of refused connections (a metric, set by the worker)
    on_refused: Callable[[], None] = staticmethod(lambda: None)
    _sweeps: dict[int, asyncio.Task[None]] = {}
    #: the lean app that answers the inference route here (None: every request goes by ASGI)
    fast_app: Callable[[], Any] = staticmethod(lambda: None)
    max_body_bytes = 64 * 1024 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._phase, self._since, self._refused = _HEADERS, self.loop.time(), False
        self._fast: FastRequest | None = None
        self._discard = False  # pipelined after a fast request: the connection closes
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            transport.write(self._refusal())
            transport.close()
            self.on_refused()
            return
        super().connection_made(transport)
        self._ensure_sweep()

    def _refusal(self) -> bytes:
        message = (
            f"the server has {len(self.connections)} open connections, its limit "
            f"(SLIMSERVE_MAX_CONNECTIONS); retry later"
        )
        self.refusals.rejected(503, "new connection", message)
        retry = f"retry-after: {self.limits.retry_after_s}\r\n"
        return _raw_response(503, "Service Unavailable", message, retry)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        if self._fast is not None:
            self._fast.disconnected = True
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._fast is not None:  # answer the request being served, then close
            self._fast.keep_alive = False
            return
        _shutdown(self)

    # the parser's callbacks, once per request: two timestamps, the parent called directly

    def on_message_begin(self) -> None:
        if self._fast is not None:  # pipelined behind a request served here: close after it
            self._fast.keep_alive = False
            self._discard = True
        if self._discard:
            return
        _on_message_begin(self)
        self._phase, self._since = _HEADERS, self.loop.time()

    def on_url(self, url: bytes) -> None:
        if not self._discard:
            _on_url(self, url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._discard:
            _on_header(self, name, value)

    def on_headers_complete(self) -> None:
        if self._discard:
            return
        self._phase, self._since = _BODY, self.loop.time()
        if self._fast_route():
            return
        _on_headers_complete(self)
        cycle = self.cycle
        self.scope["extensions"] = {CLIENT_GONE: lambda: cycle.disconnected}  # type: ignore[dict-item]

    def _fast_route(self) -> bool:
        """Take the request on the fast path when it is the inference route."""
        if self.expect_100_continue or self.parser.should_upgrade() or self.fast_app() is None:
            return False
        found = match(self.parser.get_method(), self.url)
        if found is None:
            return False
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        fast = FastRequest(*found, limit=self.max_body_bytes, keep_alive=keep_alive)
        for name, value in self.headers:
            if name == b"inference-header-content-length":
                fast.header_length = value.decode("latin-1")
            elif name == b"traceparent":
                fast.traceparent = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit() and int(value) > fast.limit:
                fast.too_large = True
        self._fast = fast
        return True

    def on_body(self, body: bytes) -> None:
        if self._discard:
            return
        if self._fast is not None:
            self._fast.add(body)
            return
        _on_body(self, body)

    def on_message_complete(self) -> None:
        if self._discard:
            return
        self._phase = _BUSY
        fast = self._fast
        if fast is None:
            _on_message_complete(self)
            return
        task = self.loop.create_task(self._serve_fast(fast))
        self.tasks.add(task)  # uvicorn's graceful shutdown waits for it
        task.add_done_callback(self.tasks.discard)

    async def _serve_fast(self, fast: FastRequest) -> None:
        answer = await self.fast_app().infer_now(
            fast.path,
            fast.name,
            fast.version,
            None if fast.too_large else fast.body,  # None: over the limit, a 413 (or a 404)
            fast.header_length,
            fast.gone,
            fast.traceparent,
        )
        self._fast = None
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if answer is None:  # the client hung up
            self.transport.close()
            return
        status, body, headers = answer
        default = self.server_state.default_headers
        self.transport.write(response_bytes(status, body, headers, default, fast.keep_alive))
        if not fast.keep_alive:
            self.transport.close()
            return
        self._phase = _IDLE
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def on_response_complete(self) -> None:
        self._phase = _IDLE  # uvicorn's keep-alive timeout takes over
        _on_response_complete(self)

    # ------------------------------------------------------------------ the sweep

    def _ensure_sweep(self) -> None:
        key = id(self.server_state)
        task = self._sweeps.get(key)
        if task is None or task.done():
            sweep = self.loop.create_task(_sweep(self.connections, self.limits, self.loop))
            self._sweeps[key] = sweep

    def _late(self, now: float) -> str | None:
        """Why this connection is to be closed now, or None."""
        if self._phase == _HEADERS and now - self._since > self.limits.header_timeout_s:
            return f"headers not complete after {self.limits.header_timeout_s:g} s"
        if self._phase == _BODY and now - self._since > self.limits.body_timeout_s:
            return f"body not complete {self.limits.body_timeout_s:g} s after its headers"
        return None

    def _close_late(self, why: str) -> None:
        cycle = self.cycle
        if self.transport.is_closing():
            return
        fresh = cycle is None or self._fast is not None or not cycle.response_started
        if fresh or self._phase == _HEADERS:
            self.transport.write(_raw_response(408, "Request Timeout", f"request timed out: {why}"))
        self.transport.close()


async def _sweep(connections: set[Any], limits: ConnectionLimits, loop: Any) -> None:
    """Close every connection whose headers or body are late, once a second."""
    timeouts = RejectionLog(log)
    while True:
        await asyncio.sleep(_SWEEP_S)
        now = loop.time()
        for conn in list(connections):
            why = conn._late(now) if isinstance(conn, GuardedHttpProtocol) else None
            if why is not None:
                timeouts.rejected(408, "connection", why)
                conn._close_late(why)


def guarded_protocol(
    limits: ConnectionLimits,
    on_refused: Callable[[], None] | None = None,
    fast_app: Callable[[], Any] | None = None,
    max_body_bytes: int | None = None,
) -> type[GuardedHttpProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` under ``limits``; ``fast_app``
    returns the lean app that answers the inference route without ASGI (or None yet)."""
    attrs: dict[str, Any] = {"limits": limits, "refusals": RejectionLog(log), "_sweeps": {}}
    if on_refused is not None:
        attrs["on_refused"] = staticmethod(on_refused)
    if fast_app is not None:
        attrs["fast_app"] = staticmethod(fast_app)
    if max_body_bytes is not None:
        attrs["max_body_bytes"] = max_body_bytes
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), attrs)

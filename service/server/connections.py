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
  of a request hung up, so queued work for it can be dropped before it reaches onnxruntime.

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


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under :class:`ConnectionLimits` (see the module's doc)."""

    limits = ConnectionLimits()
    refusals = RejectionLog(log)
    #: called with the number of refused connections (a metric, set by the worker)
    on_refused: Callable[[], None] = staticmethod(lambda: None)
    _sweeps: dict[int, asyncio.Task[None]] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._phase, self._since, self._refused = _HEADERS, self.loop.time(), False
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
        super().connection_lost(exc)

    # the parser's callbacks, once per request: two timestamps, the parent called directly

    def on_message_begin(self) -> None:
        _on_message_begin(self)
        self._phase, self._since = _HEADERS, self.loop.time()

    def on_headers_complete(self) -> None:
        self._phase, self._since = _BODY, self.loop.time()
        _on_headers_complete(self)
        cycle = self.cycle
        self.scope["extensions"] = {CLIENT_GONE: lambda: cycle.disconnected}  # type: ignore[dict-item]

    def on_message_complete(self) -> None:
        self._phase = _BUSY
        _on_message_complete(self)

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
        if cycle is None or self._phase == _HEADERS or not cycle.response_started:
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
    limits: ConnectionLimits, on_refused: Callable[[], None] | None = None
) -> type[GuardedHttpProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` under ``limits``."""
    attrs: dict[str, Any] = {"limits": limits, "refusals": RejectionLog(log), "_sweeps": {}}
    if on_refused is not None:
        attrs["on_refused"] = staticmethod(on_refused)
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), attrs)

"""The inference route without the ASGI round trip.

``POST /v2/models/{name}[/versions/{version}]/infer`` is most of a server's traffic, and on a
small model most of its cost was the HTTP machinery around it: an ASGI scope, a task, receive
and send messages, a middleware, two writes. slimserve's HTTP protocol
(:mod:`service.server.connections`) recognises that route when a request's headers are
complete, gathers its body itself, hands ``(path, name, version, body, headers)`` to the lean
app's :meth:`service.http.app.HttpApp.infer_now` (the same decoder, dataplane, batcher, errors,
metrics and traces as every other way in), and writes the answer in one write. Everything else
(other routes, ``Expect: 100-continue``, upgrades) goes through uvicorn and ASGI as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FastRequest", "match", "response_bytes"]

_PREFIX = b"/v2/models/"
_SUFFIX = b"/infer"
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    415: b"Unsupported Media Type",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def match(method: bytes, url: bytes) -> tuple[str, str, str | None] | None:
    """``(path, model, version)`` when ``method url`` is the inference route, else None."""
    if method != b"POST" or not url.startswith(_PREFIX) or not url.endswith(_SUFFIX):
        return None
    if b"%" in url or b"?" in url:  # encoded or with a query: the general path handles it
        return None
    parts = url[len(_PREFIX) : -len(_SUFFIX)].split(b"/")
    try:
        if len(parts) == 1 and parts[0]:
            return url.decode("ascii"), parts[0].decode("ascii"), None
        if len(parts) == 3 and parts[0] and parts[1] == b"versions" and parts[2]:
            return url.decode("ascii"), parts[0].decode("ascii"), parts[2].decode("ascii")
    except UnicodeDecodeError:
        return None
    return None


@dataclass
class FastRequest:
    """One inference request read by the protocol itself."""

    path: str
    name: str
    version: str | None
    limit: int
    header_length: str | None = None
    traceparent: str | None = None
    keep_alive: bool = True
    body: bytearray = field(default_factory=bytearray)
    too_large: bool = False
    disconnected: bool = False

    def add(self, chunk: bytes) -> None:
        """Gather the body; past the limit, keep reading but drop it (a 413 at the end, so the
        client reads the answer rather than a reset)."""
        if self.too_large:
            return
        self.body += chunk
        if len(self.body) > self.limit:
            self.too_large = True
            self.body = bytearray()

    def gone(self) -> bool:
        return self.disconnected


def response_bytes(
    status: int,
    body: bytes,
    headers: dict[str, str],
    default_headers: list[tuple[bytes, bytes]],
    keep_alive: bool,
) -> bytes:
    """The whole HTTP/1.1 response, for one write."""
    out: list[Any] = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for name, value in default_headers:
        out += [name, b": ", value, b"\r\n"]
    for key, text in headers.items():
        out += [key.encode("latin-1"), b": ", text.encode("latin-1"), b"\r\n"]
    out.append(b"content-length: %d\r\n" % len(body))
    if not keep_alive:
        out.append(b"connection: close\r\n")
    out += [b"\r\n", body]
    return b"".join(out)

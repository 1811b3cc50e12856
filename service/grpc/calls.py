"""gRPC calls over slimserve's HTTP/2 (:mod:`service.grpc.h2`): the transport under the v2 service.

Why not ``grpc.aio``: on the 2-core machine the benchmarks run on, a ``grpc.aio`` server spends
about 200 us of CPU on an echo RPC before any work (its Cython call machinery on the event
loop, a poller thread handing each completion to the loop, gRPC core's EventEngine threads),
about twice what slimserve's whole HTTP path costs per request; 32-sample inference reached
64% of in-process onnxruntime over gRPC against 81% over HTTP. Here a call costs what its
frames and messages cost, on the worker's event loop (``SLIMSERVE_GRPC_SERVER=grpcio`` still
serves with ``grpc.aio``).

What a call is (gRPC's PROTOCOL-HTTP2.md): a POST to ``/package.Service/Method`` with
``content-type: application/grpc``; length-prefixed messages, compressed or not
(``grpc-encoding`` gzip or deflate, decompressed up to the size limit; answers go
uncompressed, any other encoding is UNIMPLEMENTED); ``grpc-timeout`` ends it with
DEADLINE_EXCEEDED; the answer is headers, messages and trailers with ``grpc-status`` and the
percent-encoded ``grpc-message``, or trailers only when it fails before any message. A
request message over ``max_message`` is RESOURCE_EXHAUSTED as soon as its length prefix is
read. Unary and bidirectional-streaming methods; a client's RST_STREAM cancels the handler.

The methods are :class:`Method` (path -> handler, request message class, streaming), so this
module knows nothing of inference: :mod:`service.grpc.server` builds the table from the
servicer. Handlers are called as ``grpc.aio`` calls them, ``handler(request, context)``, with
a :class:`Context` whose ``abort`` ends the call with a status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .h2 import END_STREAM, Connection, Limits, Stream, field

__all__ = ["Abort", "Context", "GrpcConnection", "Listener", "Method", "listener", "percent"]

log = logging.getLogger("slimserve.grpc")

# the status codes the transport itself answers with
INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 3, 4, 8
UNIMPLEMENTED, INTERNAL = 12, 13
#: request encodings read (answers go uncompressed: a server may choose per response)
_ENCODINGS = ("identity", "gzip", "deflate")
_TIMEOUT = re.compile(rb"^(\d{1,8})([HMSmun])$")
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_ONE_MESSAGE = (
    "the request body ({} bytes) is not one length-prefixed message; a unary call sends exactly one"
)

RESPONSE_HEADERS = (
    b"\x88"
    + field(b"content-type", b"application/grpc")
    + field(b"grpc-accept-encoding", b"identity,deflate,gzip")
)
OK_TRAILERS = field(b"grpc-status", b"0")


def percent(text: str, limit: int = 4096) -> bytes:
    """``grpc-message``'s percent-encoding (bytes outside printable ASCII, and ``%``),
    clipped to ``limit`` bytes so it stays inside the peer's metadata limit."""
    raw = text.encode("utf-8", "replace")[:limit]
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


@dataclass(frozen=True)
class Method:
    """One RPC: ``handler(request, context)`` returns the response (unary), or
    ``handler(requests, context)`` yields them (bidirectional streaming)."""

    handler: Callable[..., Any]
    request: Any  # the request's protobuf message class
    streaming: bool = False


class Abort(Exception):
    """Ends an RPC with ``code`` (a ``grpc.StatusCode`` or its number), ``message`` and
    trailing metadata."""

    def __init__(self, code: Any, message: str, trailers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.code = code if isinstance(code, int) else code.value[0]
        self.message = message
        self.trailers = tuple(trailers)


class Context:
    """What a handler sees of its call: the ``grpc.aio`` methods slimserve's servicer uses."""

    __slots__ = ("headers",)

    def __init__(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.headers = headers

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The call's metadata (its headers but HTTP/2's own), as ``grpc.aio`` gives it."""
        return tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in self.headers
            if name[:1] != b":"
        )

    async def abort(
        self, code: Any, details: str = "", trailing_metadata: Sequence[tuple[str, str]] = ()
    ) -> None:
        raise Abort(code, details, trailing_metadata)


class GrpcConnection(Connection):
    """A client's connection, each stream one call."""

    response_headers = RESPONSE_HEADERS

    def __init__(self, methods: dict[str, Method], limits: Limits, live: set[Connection]) -> None:
        super().__init__(limits, live)
        self.methods = methods
        self.timer: asyncio.TimerHandle | None = None  # the deadline sweep

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        super().connection_lost(exc)

    def opened(self, stream: Stream, flags: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A new RPC: its method, metadata and deadline; unary ones wait for their message,
        streaming ones start now."""
        head = dict(headers)
        stream.context = Context(headers)
        stream.ended = bool(flags & END_STREAM)
        path = head.get(b":path", b"").decode("latin-1")
        if head.get(b":method") != b"POST":
            self._respond_error(stream, UNIMPLEMENTED, f"{path}: gRPC calls are POST")
            return
        kind = head.get(b"content-type", b"").decode("latin-1")
        if not kind.startswith("application/grpc"):
            self._respond_error(
                stream, INVALID_ARGUMENT, f"content-type {kind[:64]!r}: expected application/grpc"
            )
            return
        encoding = head.get(b"grpc-encoding", b"identity").decode("latin-1")
        if encoding not in _ENCODINGS:
            self._respond_error(
                stream,
                UNIMPLEMENTED,
                f"grpc-encoding {encoding[:32]!r} is not supported; slimserve takes "
                f"{', '.join(_ENCODINGS)}",
            )
            return
        stream.encoding = encoding
        method = self.methods.get(path)
        if method is None:
            self._respond_error(stream, UNIMPLEMENTED, f"Method not found: {path[:128]}")
            return
        stream.method = method
        timeout = head.get(b"grpc-timeout")
        if timeout is not None:
            match = _TIMEOUT.match(timeout)
            if match is None:
                self._respond_error(
                    stream,
                    INVALID_ARGUMENT,
                    f"grpc-timeout {timeout[:16].decode('latin-1')!r}: not a timeout",
                )
                return
            stream.deadline = self.loop.time() + int(match[1]) * _UNITS[match[2]]
            self._watch(stream.deadline)
        if method.streaming:
            stream.queue = asyncio.Queue()
            stream.task = self.loop.create_task(self._call(stream))
            if stream.ended:
                stream.queue.put_nowait(None)
        elif stream.ended:
            self._dispatch(stream)

    def received(self, stream: Stream, data: bytes, size: int) -> None:
        stream.buffer += data
        method = stream.method
        if method.streaming:
            self._messages(stream)
            if stream.ended and not stream.done:
                if stream.buffer:
                    self._respond_error(
                        stream, INVALID_ARGUMENT, "the request stream ended inside a message"
                    )
                else:
                    assert stream.queue is not None
                    stream.queue.put_nowait(None)
        elif self._fits(stream):
            if stream.ended:
                self._dispatch(stream)
            else:
                self._credit(stream, size)  # unary: the whole message is read anyway

    def _fits(self, stream: Stream) -> bool:
        """A unary request's message is under the size limit (checked as soon as its length
        prefix is in); RESOURCE_EXHAUSTED otherwise."""
        buf = stream.buffer
        if len(buf) >= 5:
            length = self._length(stream)
            if length is None:
                return False
            if len(buf) > 5 + length:
                self._respond_error(stream, INVALID_ARGUMENT, _ONE_MESSAGE.format(len(buf)))
                return False
        return True

    def _length(self, stream: Stream) -> int | None:
        """The length prefix of the message at the head of ``stream``'s buffer; None, the call
        answered RESOURCE_EXHAUSTED, when it is over the size limit."""
        length = int.from_bytes(stream.buffer[1:5], "big")
        if length > self.limits.max_message:
            self._respond_error(
                stream,
                RESOURCE_EXHAUSTED,
                f"Received message larger than max ({length} vs. {self.limits.max_message})",
            )
            return None
        return length

    def _dispatch(self, stream: Stream) -> None:
        """A unary request is complete: parse its one message and start the handler."""
        assert stream.method is not None
        buf = stream.buffer
        if len(buf) < 5 or int.from_bytes(buf[1:5], "big") != len(buf) - 5:
            self._respond_error(stream, INVALID_ARGUMENT, _ONE_MESSAGE.format(len(buf)))
            return
        request = self._parse(stream, buf[0], bytes(buf[5:]))
        stream.buffer = bytearray()
        if request is not None:
            stream.task = self.loop.create_task(self._call(stream, request))

    def _parse(self, stream: Stream, compressed: int, data: bytes) -> Any:
        """A request message, decompressed first when its flag says so; None when it cannot
        be read (the call is answered with why)."""
        assert stream.method is not None
        kind = stream.method.request
        if compressed:
            inflated = self._inflate(stream, data)
            if inflated is None:
                return None
            data = inflated
        try:
            return kind.FromString(data)
        except Exception as exc:  # protobuf's DecodeError
            self._respond_error(
                stream, INVALID_ARGUMENT, f"cannot parse the {kind.__name__} message: {exc}"
            )
            return None

    def _inflate(self, stream: Stream, data: bytes) -> bytes | None:
        """A compressed message (``grpc-encoding`` gzip or deflate) decompressed, never to
        more than ``max_message`` bytes."""
        limit = self.limits.max_message
        if stream.encoding == "identity":
            self._respond_error(
                stream,
                INVALID_ARGUMENT,
                "a message flagged compressed, but grpc-encoding is identity; send "
                f"grpc-encoding {' or '.join(_ENCODINGS[1:])} with compressed messages",
            )
            return None
        inflater = zlib.decompressobj(47)  # a zlib (deflate) or gzip header, found
        try:
            out = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            self._respond_error(
                stream, INVALID_ARGUMENT, f"cannot {stream.encoding}-decompress the message: {exc}"
            )
            return None
        if len(out) > limit:
            self._respond_error(
                stream,
                RESOURCE_EXHAUSTED,
                f"Received message larger than max (over {limit} once decompressed)",
            )
            return None
        if not inflater.eof:
            self._respond_error(
                stream, INVALID_ARGUMENT, f"the {stream.encoding} message is cut short"
            )
            return None
        return out

    def _messages(self, stream: Stream) -> None:
        """A streaming request's complete messages, parsed, to its handler's queue."""
        buf = stream.buffer
        while len(buf) >= 5:
            length = self._length(stream)
            if length is None:
                return
            if len(buf) < 5 + length:
                return
            request = self._parse(stream, buf[0], bytes(buf[5 : 5 + length]))
            del buf[: 5 + length]
            if request is None:
                return
            assert stream.queue is not None
            stream.queue.put_nowait((request, 5 + length))

    async def _requests(self, stream: Stream) -> AsyncIterator[Any]:
        """A streaming call's requests as they come; the window is given back as each is
        taken, so a client cannot queue more than a window ahead of the handler."""
        assert stream.queue is not None
        while (item := await stream.queue.get()) is not None:
            request, size = item
            self._credit(stream, size)
            self._flush()
            yield request

    async def _call(self, stream: Stream, request: Any = None) -> None:
        """Run the handler: a unary one on ``request``, a streaming one on the requests as
        they come, each answer sent as it is yielded; then the status."""
        method, context = stream.method, stream.context
        try:
            if method.streaming:
                async for response in method.handler(self._requests(stream), context):
                    self._send(stream, _framed(response), None)
                    self._flush_soon()
                last = b""
            else:
                last = _framed(await method.handler(request, context))
        except Abort as exc:
            self._respond_error(stream, exc.code, exc.message, exc.trailers)
        except asyncio.CancelledError:
            if stream.expired:
                self._respond_error(stream, DEADLINE_EXCEEDED, "Deadline Exceeded")
        except Exception:
            log.exception("gRPC %s failed", stream_path(stream))
            self._respond_error(stream, INTERNAL, "internal server error")
        else:
            self._send(stream, last, OK_TRAILERS)
        self._flush_soon()

    def _watch(self, deadline: float) -> None:
        """Have :meth:`_sweep` run by ``deadline``: one timer per connection, moved only when
        a call's deadline comes before it (calls' deadlines mostly come in order)."""
        if self.timer is None or deadline < self.timer.when():
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(deadline, self._sweep)

    def _sweep(self) -> None:
        """End the calls whose deadline has passed; wait for the next one."""
        self.timer = None
        now = self.loop.time()
        upcoming = math.inf
        for stream in list(self.streams.values()):
            if stream.deadline <= now:
                self._expire(stream)
            elif stream.deadline < upcoming:
                upcoming = stream.deadline
        if upcoming < math.inf:
            self._watch(upcoming)
        self._flush()

    def _expire(self, stream: Stream) -> None:
        if stream.done:
            return
        stream.expired = True
        if stream.task is not None:
            stream.task.cancel()
        else:  # still receiving its request
            self._respond_error(stream, DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _respond_error(
        self, stream: Stream, code: int, message: str, trailers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """End ``stream`` with a status: trailers-only when nothing was sent yet."""
        if stream.done:
            return
        block = field(b"grpc-status", str(code).encode()) + field(b"grpc-message", percent(message))
        for key, value in trailers:
            block += field(key.lower().encode("latin-1"), value.encode("latin-1", "replace"))
        self._send(stream, b"", block)


def stream_path(stream: Stream) -> str:
    method = stream.method
    return getattr(method.handler, "__name__", "RPC") if method is not None else "RPC"


def _framed(message: Any) -> bytes:
    """A message as gRPC sends it: uncompressed, its length in front."""
    data = message.SerializeToString()
    return len(data).to_bytes(5, "big") + data


class Listener:
    """A TCP listener; ``factory(live)`` makes each connection's protocol (``live``: the set
    of open connections, which each keeps itself in)."""

    def __init__(self, factory: Callable[[set[Connection]], Connection]) -> None:
        self.factory = factory
        self.connections: set[Connection] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: self.factory(self.connections),
            host,
            port,
            reuse_port=True,
        )

    async def stop(self, grace_s: float) -> None:
        """No new connections or streams; the streams started get ``grace_s`` to finish."""
        server, self.server = self.server, None
        if server is None:
            return
        server.close()
        for connection in list(self.connections):
            connection.drain()
        waiting = [c.closed for c in self.connections]
        if waiting:
            await asyncio.wait(waiting, timeout=grace_s)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)


def listener(methods: dict[str, Method], limits: Limits) -> Listener:
    """A listener whose every connection serves ``methods``."""
    return Listener(lambda live: GrpcConnection(methods, limits, live))

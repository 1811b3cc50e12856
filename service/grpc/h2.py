"""HTTP/2 (RFC 9113) as gRPC uses it, cleartext with prior knowledge (h2c), on asyncio.

One :class:`Connection` per client on the worker's own event loop: frames parsed in place,
HPACK decoded by ``hpack`` (python-hyper's decoder) and encoded as literals (what we send
needs no dynamic table), the output of one turn of the loop written at once. It speaks the
connection preface and SETTINGS, flow control both ways (our windows given back as data is
read; the peer's windows and frame size respected when sending), PING, WINDOW_UPDATE,
RST_STREAM, GOAWAY both ways (draining lets the streams that have started finish), HEADERS
with CONTINUATION, padding and priority. Header blocks, concurrent streams and frame sizes
are bounded; a peer that breaks the protocol gets GOAWAY with the matching error code and is
closed. What streams mean is the subclass's (:class:`service.grpc.calls.GrpcConnection`):
:meth:`Connection.opened` when a stream's headers are in, :meth:`Connection.received` for
its data.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from dataclasses import dataclass
from typing import Any

import hpack

__all__ = ["Connection", "Limits", "Stream", "field", "frame"]

log = logging.getLogger("slimserve.grpc")

# frame types and flags (RFC 9113 section 6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# error codes (section 7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 11
# settings identifiers (section 6.5.2)
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384

_FRAME = struct.Struct(">BHBBI")  # length (3 bytes, as 1 + 2), type, flags, stream id


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 16, n & 0xFFFF, kind, flags, stream) + payload


def _integer(value: int, prefix: int) -> bytes:
    """An HPACK integer with a ``prefix``-bit prefix (RFC 7541 section 5.1), flags clear."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman: what we send needs no
    dynamic table, so the peer's HEADER_TABLE_SIZE never matters."""
    return b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value


@dataclass(frozen=True)
class Limits:
    max_message: int  # bytes of one request message (SLIMSERVE_MAX_BODY_BYTES)
    max_streams: int = 1024  # concurrent streams per connection
    window: int = 1 << 20  # each stream's receive window
    connection_window: int = 1 << 24
    max_frame: int = 1 << 20  # the largest frame payload we accept
    max_header_list: int = 1 << 16  # decoded header bytes per block (and compressed)


class ProtocolError(Exception):
    """The peer broke HTTP/2: GOAWAY with ``code``, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Stream:
    """One stream (one RPC): what has come in, what waits for the peer's window, and the
    gRPC call's own state (its method, handler task, requests and deadline)."""

    __slots__ = (
        "id",
        "method",
        "context",
        "buffer",
        "recv_window",
        "send_window",
        "pending",
        "trailers",
        "headers_sent",
        "ended",
        "task",
        "queue",
        "encoding",
        "deadline",
        "expired",
        "done",
    )

    def __init__(self, sid: int, recv_window: int, send_window: int) -> None:
        self.id = sid
        self.method: Any = None  # service.grpc.calls.Method
        self.context: Any = None
        self.buffer = bytearray()
        self.recv_window = recv_window
        self.send_window = send_window
        self.pending = b""  # DATA bytes waiting for window
        self.trailers: bytes | None = None  # sent once pending is out
        self.headers_sent = False
        self.ended = False  # the peer's END_STREAM came
        self.task: asyncio.Task[None] | None = None
        self.queue: asyncio.Queue[Any] | None = None  # streaming requests
        self.encoding = "identity"  # grpc-encoding of its messages
        self.deadline = math.inf  # loop time, from grpc-timeout
        self.expired = False
        self.done = False  # our END_STREAM is out (or queued)


def _indexed_only(block: bytes) -> bool:
    """Whether an HPACK block holds indexed header fields only (RFC 7541 section 6.1)."""
    i, n = 0, len(block)
    while i < n:
        first = block[i]
        if not first & 0x80:
            return False  # a literal (perhaps added to the table) or a table size update
        i += 1
        if first & 0x7F == 0x7F:  # the index goes on in the next bytes
            while i < n and block[i] & 0x80:
                i += 1
            i += 1
    return True


class Connection(asyncio.Protocol):
    """One client's HTTP/2 connection; a subclass gives streams their meaning."""

    #: the header block that opens every answer (":status 200", static table index 8)
    response_headers = b"\x88"

    def __init__(self, limits: Limits, live: set[Connection]) -> None:
        self.limits = limits
        self.live = live
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface = False
        self.streams: dict[int, Stream] = {}
        self.last_id = 0  # the highest stream id the peer opened
        self.decoder = hpack.Decoder(max_header_list_size=limits.max_header_list)
        self.known: dict[bytes, list[tuple[bytes, bytes]]] = {}  # see _decode
        self.continuing: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self.recv_window = limits.connection_window
        self.send_window = DEFAULT_WINDOW
        self.peer_window = DEFAULT_WINDOW  # the peer's initial stream window
        self.peer_frame = DEFAULT_FRAME
        self.blocked: dict[int, Stream] = {}  # streams with data waiting for window
        self.out: list[bytes] = []  # written at the end of data_received
        self.draining = False
        self.loop = asyncio.get_running_loop()
        self.closed = self.loop.create_future()
        self.flushing = False
        self._frames = {
            DATA: self._data,
            HEADERS: self._headers,
            PRIORITY: self._priority,
            RST_STREAM: self._reset,
            SETTINGS: self._settings,
            PUSH_PROMISE: self._push,
            PING: self._ping,
            GOAWAY: self._goaway,
            WINDOW_UPDATE: self._window,
            CONTINUATION: self._continuation,
        }

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.live.add(self)
        limits = self.limits
        settings = b"".join(
            struct.pack(">HI", key, value)
            for key, value in (
                (ENABLE_PUSH, 0),
                (MAX_CONCURRENT_STREAMS, limits.max_streams),
                (INITIAL_WINDOW_SIZE, limits.window),
                (MAX_FRAME_SIZE, limits.max_frame),
                (MAX_HEADER_LIST_SIZE, limits.max_header_list),
            )
        )
        grow = struct.pack(">I", limits.connection_window - DEFAULT_WINDOW)
        transport.write(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, grow))

    def connection_lost(self, exc: Exception | None) -> None:
        self.live.discard(self)
        for stream in list(self.streams.values()):
            self._forget(stream)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        try:
            if not self.preface:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise ProtocolError(
                        PROTOCOL_ERROR, "expected the HTTP/2 preface (gRPC speaks h2c)"
                    )
                self.preface, pos = True, len(PREFACE)
            end = len(buf)
            max_frame = self.limits.max_frame
            handlers = self._frames
            while end - pos >= 9:
                length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
                if length > max_frame:
                    raise ProtocolError(
                        FRAME_SIZE_ERROR, f"frame of {length} bytes over {max_frame}"
                    )
                stop = pos + 9 + length
                if stop > end:
                    break
                kind, flags = buf[pos + 3], buf[pos + 4]
                sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                payload = bytes(buf[pos + 9 : stop])
                pos = stop
                if self.continuing is not None and kind != CONTINUATION:
                    raise ProtocolError(PROTOCOL_ERROR, "expected CONTINUATION")
                handler = handlers.get(kind)
                if handler is not None:  # unknown frame types are ignored (section 5.5)
                    handler(flags, sid, payload)
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))
            return
        except Exception:
            log.exception("gRPC connection failed")
            self._fail(INTERNAL_ERROR, "internal error")
            return
        finally:
            del buf[:pos]
        if self.recv_window < self.limits.connection_window // 2:
            grow = self.limits.connection_window - self.recv_window
            self.recv_window += grow
            self.out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", grow)))
        self._flush()

    def _flush_soon(self) -> None:
        """Write at the end of this turn of the loop: the answers of a batch that finished
        together leave in one write."""
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        if self.out:
            out, self.out = self.out, []
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(out))

    def _fail(self, code: int, message: str) -> None:
        """GOAWAY with ``code`` and close: the peer broke the protocol."""
        log.info("gRPC connection closed: %s", message)
        self.out.append(
            frame(GOAWAY, 0, 0, struct.pack(">II", self.last_id, code) + message[:200].encode())
        )
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        """Refuse new streams (GOAWAY) and close once those started are answered."""
        if self.draining:
            return
        self.draining = True
        self.out.append(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_id, NO_ERROR)))
        self._flush()
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self.draining and not self.streams and self.transport is not None:
            self._flush()  # the last answers first
            self.transport.close()

    # ------------------------------------------------------------------ frames

    def opened(self, stream: Stream, flags: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A new stream's header block is in (``flags``: its HEADERS frame's)."""
        raise NotImplementedError

    def received(self, stream: Stream, data: bytes, size: int) -> None:
        """``data`` came on ``stream`` (``size``: what it took of the window, padding too);
        ``stream.ended`` says whether it was the last."""
        raise NotImplementedError

    def _unpad(self, flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1 : len(payload) - payload[0]]
        return payload

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        self.recv_window -= size
        if self.recv_window < 0:
            raise ProtocolError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        data = self._unpad(flags, payload)
        stream = self.streams.get(sid)
        if stream is None or stream.ended:
            if sid > self.last_id:
                raise ProtocolError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream we have finished or reset: frames still in flight
        stream.recv_window -= size
        if stream.recv_window < 0:
            self._refuse(stream, FLOW_CONTROL_ERROR)
            return
        stream.ended = bool(flags & END_STREAM)
        if not stream.done:  # else answered already (an error while it was still sending)
            self.received(stream, data, size)

    def _credit(self, stream: Stream, size: int) -> None:
        """Give ``size`` bytes of ``stream``'s window back once half of it is used."""
        if size and stream.recv_window < self.limits.window // 2 and not stream.ended:
            grow = self.limits.window - stream.recv_window
            stream.recv_window += grow
            self.out.append(frame(WINDOW_UPDATE, 0, stream.id, struct.pack(">I", grow)))

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(sid, flags, block)
        else:
            self.continuing = (sid, flags, bytearray(block))

    def _continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self.continuing is None or self.continuing[0] != sid:
            raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        block = self.continuing[2]
        block += payload
        if len(block) > self.limits.max_header_list:
            raise ProtocolError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            first = self.continuing[1]
            self.continuing = None
            self._header_block(sid, first, bytes(block))

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """A header block's fields. A block made only of indexed fields (what gRPC clients send
        once a call's headers are in the dynamic table) changes no decoder state, so its fields
        are kept and reused until a block that may change the table comes."""
        known = self.known.get(block)
        if known is not None:
            return known
        try:
            headers = [
                (bytes(name), bytes(value)) for name, value in self.decoder.decode(block, raw=True)
            ]
        except hpack.OversizedHeaderListError:
            raise ProtocolError(ENHANCE_YOUR_CALM, "header list too large") from None
        except hpack.HPACKError as exc:
            raise ProtocolError(COMPRESSION_ERROR, f"HPACK: {exc}") from None
        if not _indexed_only(block):
            self.known.clear()
        elif len(self.known) < 64:
            self.known[block] = headers
        return headers

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)
        stream = self.streams.get(sid)
        if stream is not None:  # trailers: the request ends here
            if not flags & END_STREAM:
                raise ProtocolError(PROTOCOL_ERROR, "request trailers without END_STREAM")
            self._data(END_STREAM, sid, b"")
            return
        if sid % 2 == 0:
            raise ProtocolError(PROTOCOL_ERROR, f"HEADERS opening even stream {sid}")
        if sid <= self.last_id:
            return  # trailers on a stream we have finished or reset: in flight, ignored
        self.last_id = sid
        stream = Stream(sid, self.limits.window, self.peer_window)
        if self.draining or len(self.streams) >= self.limits.max_streams:
            self.out.append(frame(RST_STREAM, 0, sid, struct.pack(">I", REFUSED_STREAM)))
            return
        self.streams[sid] = stream
        self.opened(stream, flags, headers)

    def _priority(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 5:
            raise ProtocolError(FRAME_SIZE_ERROR, "PRIORITY of the wrong size")

    def _reset(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0 or len(payload) != 4:
            raise ProtocolError(PROTOCOL_ERROR, "malformed RST_STREAM")
        stream = self.streams.get(sid)
        if stream is not None:
            self._forget(stream)  # the client gave up: its RPC is cancelled
            self._close_if_drained()

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                delta, self.peer_window = value - self.peer_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= 16_777_215:
                    raise ProtocolError(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_frame = value
            elif key == ENABLE_PUSH and value > 1:
                raise ProtocolError(PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
        self.out.append(frame(SETTINGS, ACK, 0))
        self._unblock()

    def _push(self, flags: int, sid: int, payload: bytes) -> None:
        raise ProtocolError(PROTOCOL_ERROR, "clients do not push")

    def _ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ProtocolError(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ProtocolError(FRAME_SIZE_ERROR, "PING of the wrong size")
        if not flags & ACK:
            self.out.append(frame(PING, ACK, 0, payload))

    def _goaway(self, flags: int, sid: int, payload: bytes) -> None:
        self.draining = True  # the client opens no more streams; answer those it has
        self._close_if_drained()

    def _window(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        grow = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if grow == 0:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += grow
            if self.send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        else:
            stream = self.streams.get(sid)
            if stream is None:
                return
            if grow == 0 or stream.send_window + grow > MAX_WINDOW:
                self._refuse(stream, PROTOCOL_ERROR if grow == 0 else FLOW_CONTROL_ERROR)
                return
            stream.send_window += grow
        self._unblock()

    # ------------------------------------------------------------------ responses

    def _send(self, stream: Stream, data: bytes, trailers: bytes | None) -> None:
        """Queue ``data`` (whole DATA payload bytes) and, when given, the trailers that end the
        stream; as much goes out now as the peer's windows allow."""
        if stream.done or stream.id not in self.streams:
            return
        if not stream.headers_sent:
            stream.headers_sent = True
            if not data and trailers is not None and not stream.pending:  # trailers-only
                stream.done = True
                self.out.append(
                    frame(
                        HEADERS,
                        END_HEADERS | END_STREAM,
                        stream.id,
                        self.response_headers + trailers,
                    )
                )
                self._finish(stream)
                return
            self.out.append(frame(HEADERS, END_HEADERS, stream.id, self.response_headers))
        if trailers is not None:
            stream.done = True
            stream.trailers = trailers
        stream.pending = stream.pending + data if stream.pending else data
        self._pump(stream)

    def _pump(self, stream: Stream) -> None:
        pending = stream.pending
        while pending:
            n = min(len(pending), self.send_window, stream.send_window, self.peer_frame)
            if n <= 0:
                self.blocked[stream.id] = stream
                stream.pending = pending
                return
            self.out.append(frame(DATA, 0, stream.id, pending[:n]))
            pending = pending[n:]
            self.send_window -= n
            stream.send_window -= n
        stream.pending = b""
        self.blocked.pop(stream.id, None)
        if stream.trailers is not None:
            self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, stream.trailers))
            stream.trailers = None
            self._finish(stream)

    def _unblock(self) -> None:
        for stream in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            self._pump(stream)

    def _finish(self, stream: Stream) -> None:
        """Our side is done: forget the stream, telling a client still sending to stop."""
        if not stream.ended:
            self.out.append(frame(RST_STREAM, 0, stream.id, struct.pack(">I", NO_ERROR)))
            stream.ended = True
        self.streams.pop(stream.id, None)
        task = stream.task
        if (
            stream.queue is not None
            and task is not None
            and not task.done()
            and task is not asyncio.current_task()
        ):
            task.cancel()  # a streaming handler whose request stream broke
        self._close_if_drained()

    def _refuse(self, stream: Stream, code: int) -> None:
        self.out.append(frame(RST_STREAM, 0, stream.id, struct.pack(">I", code)))
        self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        """Drop a stream that is reset or whose connection is gone; its handler is cancelled."""
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        stream.done = stream.ended = True
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

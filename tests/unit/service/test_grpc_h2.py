"""slimserve's HTTP/2 transport for gRPC, driven frame by frame: a :class:`Connection` fed bytes,
its writes parsed back into frames and decoded with ``hpack``; the handlers are small
stand-ins with protobuf's own ``StringValue``. Interop with real gRPC clients (grpcio,
tritonclient) is in tests/integration/test_grpc.py and tests/e2e/test_grpc.py."""

from __future__ import annotations

import asyncio
import gzip
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any
from unittest.mock import patch

import hpack
import pytest
from google.protobuf.wrappers_pb2 import StringValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.grpc import calls, h2
from service.grpc.calls import Abort, GrpcConnection, Method, percent
from service.grpc.h2 import Limits

ECHO, FAIL, SLOW, BOOM, CHAT = "/t.T/Echo", "/t.T/Fail", "/t.T/Slow", "/t.T/Boom", "/t.T/Chat"
META = "/t.T/Meta"
ANSWER_HEADERS = {
    ":status": "200",
    "content-type": "application/grpc",
    "grpc-accept-encoding": "identity,deflate,gzip",
}


class Handlers:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def echo(self, request: Any, context: Any) -> Any:
        return StringValue(value=request.value.upper())

    async def fail(self, request: Any, context: Any) -> Any:
        await context.abort(5, "nöpe 100%", (("retry-after", "2"),))

    async def slow(self, request: Any, context: Any) -> Any:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def meta(self, request: Any, context: Any) -> Any:
        return StringValue(value=dict(context.invocation_metadata())["trace"])

    async def boom(self, request: Any, context: Any) -> Any:
        raise RuntimeError("a bug")

    async def chat(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        try:
            async for request in requests:
                yield StringValue(value=request.value.upper())
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def methods(self) -> dict[str, Method]:
        unary = {ECHO: self.echo, FAIL: self.fail, SLOW: self.slow, BOOM: self.boom}
        unary[META] = self.meta
        table = {path: Method(fn, StringValue) for path, fn in unary.items()}
        table[CHAT] = Method(self.chat, StringValue, streaming=True)
        return table


class Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close


class Peer:
    """The client side: frames out, frames and decoded headers back."""

    def __init__(self, limits: Limits | None = None, preface: bool = True) -> None:
        self.handlers = Handlers()
        self.transport = Transport()
        self.connection = GrpcConnection(
            self.handlers.methods(), limits or Limits(max_message=1000), set()
        )
        self.connection.connection_made(self.transport)
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        if preface:
            self.send(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0))

    def send(self, data: bytes) -> None:
        self.connection.data_received(data)

    def headers(self, sid: int, path: str, end: bool = False, **extra: str) -> bytes:
        fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra.items(),
        ]
        flags = h2.END_HEADERS | (h2.END_STREAM if end else 0)
        return h2.frame(h2.HEADERS, flags, sid, self.encoder.encode(fields))

    def call(self, sid: int, path: str, *values: str, **extra: str) -> None:
        self.send(self.headers(sid, path, **extra) + data(sid, *values, end=True))

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        out, buf = [], bytes(self.transport.written)
        self.transport.written.clear()
        while buf:
            length = int.from_bytes(buf[:3], "big")
            kind, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big")
            out.append((kind, flags, sid, buf[9 : 9 + length]))
            buf = buf[9 + length :]
        return out

    def answers(self, sid: int) -> tuple[list[str], dict[str, str], list[int]]:
        """``sid``'s messages, its trailers (with the headers of a trailers-only answer) and
        the kinds of its frames."""
        messages, trailers, kinds, body = [], {}, [], b""
        for kind, flags, stream, payload in self.frames():
            if stream != sid:
                continue
            kinds.append(kind)
            if kind == h2.DATA:
                body += payload
            elif kind == h2.HEADERS and flags & h2.END_STREAM:
                trailers = dict(self.decoder.decode(payload))
            elif kind == h2.HEADERS:
                assert dict(self.decoder.decode(payload)) == ANSWER_HEADERS
        while body:
            n = int.from_bytes(body[1:5], "big")
            messages.append(StringValue.FromString(body[5 : 5 + n]).value)
            body = body[5 + n :]
        return messages, trailers, kinds


def data(sid: int, *values: str, end: bool = False) -> bytes:
    body = b"".join(message(v) for v in values)
    return h2.frame(h2.DATA, h2.END_STREAM if end else 0, sid, body)


def message(value: str) -> bytes:
    raw = StringValue(value=value).SerializeToString()
    return b"\0" + len(raw).to_bytes(4, "big") + raw


async def settle(turns: int = 5) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def goaway(peer: Peer) -> int:
    [(kind, _, _, payload)] = [f for f in peer.frames() if f[0] == h2.GOAWAY]
    assert peer.transport.closed
    return struct.unpack(">II", payload[:8])[1]


def run(test):
    def wrapper() -> None:
        asyncio.run(test())

    wrapper.__name__ = test.__name__
    return wrapper


@run
async def test_settings_ping_and_a_unary_call() -> None:
    peer = Peer(preface=False)
    first = peer.frames()
    assert [f[0] for f in first] == [h2.SETTINGS, h2.WINDOW_UPDATE]
    settings = dict(struct.iter_unpack(">HI", first[0][3]))
    assert settings[h2.INITIAL_WINDOW_SIZE] == 1 << 20 and settings[h2.ENABLE_PUSH] == 0
    peer.send(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0) + h2.frame(h2.PING, 0, 0, b"12345678"))
    assert peer.frames() == [(h2.SETTINGS, h2.ACK, 0, b""), (h2.PING, h2.ACK, 0, b"12345678")]
    peer.call(1, ECHO, "hello")
    await settle()
    messages, trailers, kinds = peer.answers(1)
    assert messages == ["HELLO"] and trailers == {"grpc-status": "0"}
    assert kinds == [h2.HEADERS, h2.DATA, h2.HEADERS]


@run
async def test_frames_split_anywhere_padded_continued_and_with_priority() -> None:
    peer = Peer()
    block = peer.encoder.encode(
        [(":method", "POST"), (":path", ECHO), ("content-type", "application/grpc")]
    )
    headers = h2.frame(h2.HEADERS, h2.PRIORITY_FLAG, 1, b"\0\0\0\0\x10" + block[:3])
    rest = h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, block[3:])
    body = message("split")
    padded = h2.frame(h2.DATA, h2.PADDED | h2.END_STREAM, 1, b"\x04" + body + b"\0" * 4)
    for byte in headers + rest + padded:
        peer.send(bytes((byte,)))
    await settle()
    assert peer.answers(1)[:2] == (["SPLIT"], {"grpc-status": "0"})


@run
async def test_a_status_with_trailers_a_bug_and_what_cannot_be_served() -> None:
    peer = Peer()
    peer.call(1, FAIL, "x")
    peer.call(3, BOOM, "x")
    peer.call(5, "/t.T/Nope", "x")
    peer.call(7, ECHO, "x", **{"grpc-encoding": "snappy"})
    peer.send(peer.headers(9, ECHO, **{"content-type": "text/plain"}) + data(9, "x", end=True))
    await settle()
    frames = peer.frames()
    trailers = {}
    for kind, _, sid, payload in frames:
        if kind == h2.HEADERS:
            trailers[sid] = dict(peer.decoder.decode(payload))
    # trailers-only answers: one HEADERS with the status and the usual headers
    assert trailers[1] == {
        **ANSWER_HEADERS,
        "grpc-status": "5",
        "grpc-message": "n%C3%B6pe 100%25",
        "retry-after": "2",
    }
    assert trailers[3]["grpc-status"] == "13"
    assert trailers[3]["grpc-message"] == "internal server error"
    assert trailers[5]["grpc-status"] == "12" and "/t.T/Nope" in trailers[5]["grpc-message"]
    assert trailers[7]["grpc-status"] == "12" and "'snappy'" in trailers[7]["grpc-message"]
    assert trailers[9]["grpc-status"] == "3" and "'text/plain'" in trailers[9]["grpc-message"]
    peer.call(11, ECHO, "still")  # the connection serves on
    await settle()
    assert peer.answers(11)[0] == ["STILL"]


@run
async def test_a_message_over_the_limit_is_refused_when_its_length_is_read() -> None:
    peer = Peer()
    big = message("x" * 2000)
    peer.send(peer.headers(1, ECHO) + h2.frame(h2.DATA, 0, 1, big[:100]))
    messages, trailers, kinds = peer.answers(1)
    assert trailers["grpc-status"] == "8"
    assert trailers["grpc-message"] == "Received message larger than max (2003 vs. 1000)"
    assert kinds == [h2.HEADERS, h2.RST_STREAM]  # trailers-only, then "stop sending"
    peer.send(h2.frame(h2.DATA, 0, 1, big[100:]))  # in flight: ignored, and so are trailers
    peer.send(
        h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, peer.encoder.encode([("x", "y")]))
    )
    peer.call(3, ECHO, "after")
    await settle()
    assert peer.answers(3)[0] == ["AFTER"]


@run
async def test_compressed_requests_are_read_up_to_the_limit() -> None:
    peer = Peer()

    def packed(raw: bytes) -> bytes:
        return b"\1" + len(raw).to_bytes(4, "big") + raw

    value = StringValue(value="squeeze" * 20).SerializeToString()
    gz, zl = gzip.compress(value), zlib.compress(value)
    bomb = gzip.compress(StringValue(value="b" * 5000).SerializeToString())
    calls_ = [
        (1, "gzip", packed(gz)),
        (3, "deflate", packed(zl)),
        (5, "identity", packed(zl)),  # flagged compressed, but no encoding
        (7, "gzip", packed(bomb)),  # small on the wire, over the limit inflated
        (9, "gzip", packed(gz[:-12])),  # cut short
        (11, "gzip", packed(b"not gzip at all")),
        (13, "gzip", message("plain")),  # uncompressed messages stay allowed
    ]
    for sid, encoding, body in calls_:
        peer.send(
            peer.headers(sid, ECHO, **{"grpc-encoding": encoding})
            + h2.frame(h2.DATA, h2.END_STREAM, sid, body)
        )
    await settle()
    frames = peer.frames()
    status = {
        sid: dict(peer.decoder.decode(payload))
        for kind, flags, sid, payload in frames
        if kind == h2.HEADERS and flags & h2.END_STREAM
    }
    assert status[1] == status[3] == status[13] == {"grpc-status": "0"}
    assert (
        status[5]["grpc-status"] == "3" and "grpc-encoding is identity" in status[5]["grpc-message"]
    )
    assert status[7]["grpc-status"] == "8" and "once decompressed" in status[7]["grpc-message"]
    assert status[9]["grpc-status"] == "3" and "cut short" in status[9]["grpc-message"]
    assert (
        status[11]["grpc-status"] == "3" and "cannot gzip-decompress" in status[11]["grpc-message"]
    )


@run
async def test_bodies_that_are_not_one_message() -> None:
    peer = Peer()
    peer.send(
        peer.headers(1, ECHO) + h2.frame(h2.DATA, h2.END_STREAM, 1, b"\0\0\0\0\x03\xff\xff\xff")
    )
    peer.call(3, ECHO, "a", "b")
    peer.send(peer.headers(5, ECHO) + h2.frame(h2.DATA, h2.END_STREAM, 5, b"\0\0\0"))
    await settle()
    frames = peer.frames()
    status = {
        sid: dict(peer.decoder.decode(payload))
        for kind, _, sid, payload in frames
        if kind == h2.HEADERS
    }
    assert (
        status[1]["grpc-status"] == "3"
        and "cannot parse the StringValue" in status[1]["grpc-message"]
    )
    assert (
        status[3]["grpc-status"] == "3"
        and "not one length-prefixed message" in status[3]["grpc-message"]
    )
    assert status[5]["grpc-status"] == "3" and "(3 bytes)" in status[5]["grpc-message"]


@run
async def test_deadlines_and_a_reset_cancel_the_call() -> None:
    peer = Peer()
    peer.call(1, SLOW, "x", **{"grpc-timeout": "30m"})
    await asyncio.sleep(0.1)
    _, trailers, _ = peer.answers(1)
    assert trailers["grpc-status"] == "4" and peer.handlers.cancelled.is_set()
    peer.call(3, ECHO, "x", **{"grpc-timeout": "soon"})
    await settle()
    assert peer.answers(3)[1]["grpc-status"] == "3"
    peer.handlers.cancelled.clear()
    peer.call(5, SLOW, "x")
    await settle()
    peer.send(h2.frame(h2.RST_STREAM, 0, 5, struct.pack(">I", h2.CANCEL)))
    await settle()
    assert peer.handlers.cancelled.is_set() and 5 not in peer.connection.streams
    assert peer.answers(5)[2] == []  # nothing sent on a stream the client reset


@run
async def test_answers_wait_for_the_peers_window_and_frame_size() -> None:
    peer = Peer(Limits(max_message=1 << 20))
    peer.send(h2.frame(h2.SETTINGS, 0, 0, struct.pack(">HI", h2.INITIAL_WINDOW_SIZE, 10)))
    peer.call(1, ECHO, "y" * 30_000)
    await settle()
    frames = [f for f in peer.frames() if f[2] == 1]
    assert [(f[0], len(f[3])) for f in frames] == [
        (h2.HEADERS, len(calls.RESPONSE_HEADERS)),
        (h2.DATA, 10),
    ]
    peer.send(h2.frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 100_000)))
    sizes = [len(f[3]) for f in peer.frames() if f[0] == h2.DATA]
    total = len(message("Y" * 30_000))
    assert sizes == [16_384, total - 10 - 16_384]  # the rest, in frames of the default size
    # the connection's window (65,535 at start) is spent next: blocked until it grows
    peer.call(3, ECHO, "z" * 40_000)
    await settle()
    peer.send(h2.frame(h2.WINDOW_UPDATE, 0, 3, struct.pack(">I", 100_000)))
    sent = sum(len(f[3]) for f in peer.frames() if f[0] == h2.DATA)
    assert sent == 65_535 - total
    peer.send(h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 100_000)))
    frames = peer.frames()
    sent += sum(len(f[3]) for f in frames if f[0] == h2.DATA)
    assert sent == len(message("Z" * 40_000))
    assert frames[-1][:3] == (h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 3)


@run
async def test_our_windows_are_given_back_and_enforced() -> None:
    limits = Limits(max_message=1 << 20, window=1000, connection_window=70_000)
    peer = Peer(limits)
    peer.frames()
    body = message("w" * 1500)
    peer.send(peer.headers(1, ECHO) + h2.frame(h2.DATA, 0, 1, body[:800]))
    [update] = [f for f in peer.frames() if f[0] == h2.WINDOW_UPDATE]
    assert update[2] == 1 and int.from_bytes(update[3], "big") == 800
    peer.send(h2.frame(h2.DATA, h2.END_STREAM, 1, body[800:]))
    await settle()
    assert peer.answers(1)[0] == ["W" * 1500]
    peer.send(peer.headers(3, ECHO) + h2.frame(h2.DATA, 0, 3, b"\0" * 1001))
    assert [f[0] for f in peer.frames()] == [h2.RST_STREAM]  # over the stream's window
    peer.send(h2.frame(h2.DATA, 0, 3, b"\0" * 70_000))  # over the connection's
    assert goaway(peer) == h2.FLOW_CONTROL_ERROR


@run
async def test_streams_beyond_the_limit_are_refused() -> None:
    peer = Peer(Limits(max_message=1000, max_streams=1))
    peer.call(1, SLOW, "x")
    peer.call(3, ECHO, "x")
    await settle()
    assert (h2.RST_STREAM, 0, 3, struct.pack(">I", h2.REFUSED_STREAM)) in peer.frames()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 10, h2.PROTOCOL_ERROR),
        (h2.PREFACE + b"\x20\0\0\0\0\0\0\0\0", h2.FRAME_SIZE_ERROR),  # 2 MiB frame
        (h2.PREFACE + h2.frame(h2.HEADERS, h2.END_HEADERS, 2, b"\x82"), h2.PROTOCOL_ERROR),
        (h2.PREFACE + h2.frame(h2.HEADERS, h2.END_HEADERS, 0, b"\x82"), h2.PROTOCOL_ERROR),
        (h2.PREFACE + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xff\xff"), h2.COMPRESSION_ERROR),
        (h2.PREFACE + h2.frame(h2.PUSH_PROMISE, 0, 1, b"\0" * 4), h2.PROTOCOL_ERROR),
        (h2.PREFACE + h2.frame(h2.PING, 0, 0, b"short"), h2.FRAME_SIZE_ERROR),
        (h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0, b"\0" * 5), h2.FRAME_SIZE_ERROR),
        (
            h2.PREFACE + h2.frame(h2.HEADERS, 0, 1, b"\x82") + h2.frame(h2.PING, 0, 0, b"\0" * 8),
            h2.PROTOCOL_ERROR,
        ),
        (h2.PREFACE + h2.frame(h2.DATA, 0, 7, b"x"), h2.PROTOCOL_ERROR),  # idle stream
    ],
    ids=[
        "not-h2",
        "frame-size",
        "even-stream",
        "stream-0",
        "hpack",
        "push",
        "ping",
        "settings",
        "no-continuation",
        "idle-data",
    ],
)
def test_a_peer_breaking_http2_gets_goaway_with_the_code(data: bytes, code: int) -> None:
    async def main() -> None:
        peer = Peer(preface=False)
        peer.frames()
        peer.send(data)
        assert goaway(peer) == code

    asyncio.run(main())


@run
async def test_a_header_list_over_the_limit_closes_the_connection() -> None:
    peer = Peer(Limits(max_message=1000, max_header_list=1000))
    peer.frames()
    peer.send(peer.headers(1, ECHO, big="v" * 2000))
    assert goaway(peer) == h2.ENHANCE_YOUR_CALM


@run
async def test_a_bidirectional_stream_answers_each_message() -> None:
    peer = Peer()
    peer.send(peer.headers(1, CHAT) + data(1, "a", "b"))
    await settle()
    assert peer.answers(1)[0] == ["A", "B"]
    peer.send(data(1, "c", end=True))
    await settle()
    messages, trailers, _ = peer.answers(1)
    assert messages == ["C"] and trailers == {"grpc-status": "0"}
    # a message that cannot be parsed ends the stream with its status; the handler stops
    peer.send(peer.headers(3, CHAT))
    await settle()  # the handler waits for its first request
    peer.send(h2.frame(h2.DATA, 0, 3, b"\0\0\0\0\x02\xff\xff"))
    await settle()
    _, trailers, _ = peer.answers(3)
    assert trailers["grpc-status"] == "3" and peer.handlers.cancelled.is_set()


@run
async def test_draining_finishes_started_calls_and_refuses_new_ones() -> None:
    peer = Peer()
    peer.send(peer.headers(1, ECHO) + data(1, "first"))  # started, not yet complete
    peer.frames()
    peer.connection.drain()
    [(kind, _, _, payload)] = peer.frames()
    assert kind == h2.GOAWAY and struct.unpack(">II", payload) == (1, h2.NO_ERROR)
    peer.call(3, ECHO, "late")
    assert (h2.RST_STREAM, 0, 3, struct.pack(">I", h2.REFUSED_STREAM)) in peer.frames()
    assert not peer.transport.closed
    peer.send(h2.frame(h2.DATA, h2.END_STREAM, 1, b""))
    await settle()
    assert peer.answers(1)[0] == ["FIRST"] and peer.transport.closed


def test_abort_takes_grpc_status_codes_or_numbers() -> None:
    import grpc

    assert Abort(grpc.StatusCode.NOT_FOUND, "x").code == 5 and Abort(14, "y").code == 14
    assert percent("plain: ok") == b"plain: ok"
    assert percent("100%\n") == b"100%25%0A"


@run
async def test_header_blocks_reused_only_while_the_table_stands() -> None:
    """An indexed-only block is decoded once and reused; a block that adds to the dynamic table
    may give the same bytes other headers, and they are decoded again."""

    def added(name: bytes, value: bytes) -> bytes:  # literal with incremental indexing
        return b"\x40" + bytes((len(name),)) + name + bytes((len(value),)) + value

    head = added(b":path", META.encode()) + added(b"content-type", b"application/grpc")
    indexed = bytes((0x83, 0x80 | 64, 0x80 | 63, 0x80 | 62))  # POST, :path, content-type, trace
    blocks = [
        head + added(b"trace", b"a") + b"\x83",
        indexed,  # trace: a
        head + added(b"trace", b"b") + b"\x83",
        indexed,  # the same bytes, now trace: b
    ]
    peer = Peer()
    for sid, block in zip((1, 3, 5, 7), blocks, strict=True):
        peer.send(h2.frame(h2.HEADERS, h2.END_HEADERS, sid, block) + data(sid, "x", end=True))
        await settle()
        assert peer.answers(sid)[0] == ["a" if sid < 5 else "b"]
        assert list(peer.connection.known) == ([indexed] if block == indexed else [])


# frames a fuzzer puts together: any type (and unknown ones), flags, small stream ids, and
# payloads that are random, or a valid header block, or gRPC messages
_payloads = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            hpack.Encoder().encode([(":method", "POST"), (":path", p), ("content-type", ct)])
            for p in (ECHO, CHAT, SLOW, "/x")
            for ct in ("application/grpc", "text/plain")
        ]
    ),
    st.lists(st.text(max_size=5), max_size=3).map(lambda vs: b"".join(map(message, vs))),
)
_frames = st.lists(
    st.tuples(
        st.integers(0, 11), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 7]), _payloads
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=_frames, cut=st.integers(1, 64))
def test_any_sequence_of_frames_is_answered_or_refused_never_a_crash(frames, cut) -> None:
    """Whatever frames come, in pieces of any size: no exception escapes and none is logged
    as our own fault; the connection either serves or says GOAWAY."""

    async def main() -> None:
        peer = Peer()
        wire = b"".join(h2.frame(*f) for f in frames)
        for i in range(0, len(wire), cut):
            peer.send(wire[i : i + cut])
            await settle(2)
        await settle()
        for stream in list(peer.connection.streams.values()):
            peer.connection._forget(stream)
        await settle()

    with patch.object(calls.log, "exception") as ours, patch.object(h2.log, "exception") as h2s:
        asyncio.run(main())
    assert not ours.called and not h2s.called

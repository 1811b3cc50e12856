"""The fast path's pieces: which requests it takes, and the bytes it writes."""

from __future__ import annotations

import pytest

from service.server.fastpath import FastRequest, match, response_bytes


@pytest.mark.parametrize(
    ("method", "url", "found"),
    [
        (b"POST", b"/v2/models/cnn/infer", ("/v2/models/cnn/infer", "cnn", None)),
        (
            b"POST",
            b"/v2/models/cnn/versions/3/infer",
            ("/v2/models/cnn/versions/3/infer", "cnn", "3"),
        ),
        (b"GET", b"/v2/models/cnn/infer", None),  # a 405, answered by the general path
        (b"POST", b"/v2/models/cnn/ready", None),
        (b"POST", b"/v2/models//infer", None),
        (b"POST", b"/v2/models/a%2Fb/infer", None),  # encoded: decoded by the general path
        (b"POST", b"/v2/models/cnn/infer?x=1", None),
        (b"POST", b"/v2/models/cnn/versions//infer", None),
        (b"POST", b"/v2/models/cnn/other/3/infer", None),
        (b"POST", b"/v2/models/c\xffn/infer", None),
    ],
)
def test_match_takes_only_the_plain_inference_route(method, url, found) -> None:
    assert match(method, url) == found


def test_a_body_over_the_limit_is_dropped_not_kept() -> None:
    fast = FastRequest("/v2/models/m/infer", "m", None, limit=10)
    fast.add(b"12345")
    fast.add(b"67890")
    assert not fast.too_large and bytes(fast.body) == b"1234567890"
    fast.add(b"1")
    assert fast.too_large and not fast.body
    fast.add(b"more")  # still read, never kept
    assert not fast.body


def test_response_bytes_is_one_well_formed_http_answer() -> None:
    out = response_bytes(
        200,
        b'{"a":1}',
        {"content-type": "application/json", "x-model-version": "2"},
        [(b"server", b"uvicorn")],
        keep_alive=True,
    )
    head, body = out.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK" and body == b'{"a":1}'
    assert b"content-length: 7" in lines and b"x-model-version: 2" in lines
    assert b"connection: close" not in lines
    closing = response_bytes(413, b"{}", {}, [], keep_alive=False)
    assert closing.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert b"connection: close\r\n" in closing


def test_the_worker_runs_uvloop_and_httptools_with_the_fast_path() -> None:
    """Issue 15 asked which HTTP stack the worker really runs: uvicorn with uvloop and
    slimserve's protocol, which is httptools' with the fast path on top (not h11/asyncio)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from service.core.settings import Settings
    from service.server.connections import GuardedHttpProtocol
    from service.server.worker import _uvicorn_config

    config = _uvicorn_config(object(), Settings(max_body_bytes=1234))
    assert config.loop == "uvloop"
    assert isinstance(config.http, type) and issubclass(config.http, GuardedHttpProtocol)
    assert issubclass(config.http, HttpToolsProtocol)
    assert config.http.max_body_bytes == 1234
    assert config.access_log is False

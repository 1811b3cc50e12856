"""The inference route read and answered by slimserve's HTTP protocol itself: the same answers
as through ASGI, over raw sockets (keep-alive, HTTP/1.0, pipelining, limits, 100-continue)."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from service.core.repository import ModelRepository
from tests.conftest import publish_identity
from tests.e2e.conftest import metric, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
).encode()


@pytest.fixture(scope="module")
def fast_server(tmp_path_factory: pytest.TempPathFactory):
    repo = ModelRepository(tmp_path_factory.mktemp("fast") / "models")
    publish_identity(repo, "alpha")
    work = tmp_path_factory.mktemp("fast-work")
    srv = start_server(repo.root, work, max_body_bytes="100000")
    yield srv
    stop_server(srv.process)


def _request(path: str, body: bytes = BODY, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    head = b"POST %s HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n" % (
        path.encode(),
        version,
    )
    return head + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _answers(sock: socket.socket, count: int) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Read ``count`` answers (or fewer, when the server closes)."""
    sock.settimeout(10)
    data, out = b"", []
    while len(out) < count:
        if b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            status, *lines = head.split(b"\r\n")
            headers = dict(line.lower().split(b": ", 1) for line in lines)
            size = int(headers[b"content-length"])
            if len(rest) >= size:
                out.append((status, headers, rest[:size]))
                data = rest[size:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return out


def _connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def test_one_connection_serves_many_requests(fast_server) -> None:
    with _connect(fast_server) as sock:
        for _ in range(5):
            sock.sendall(_request("/v2/models/alpha/infer"))
            [(status, headers, body)] = _answers(sock, 1)
            assert status == b"HTTP/1.1 200 OK"
            assert headers[b"content-type"] == b"application/json"
            assert headers[b"x-model-version"] == b"1" and b"connection" not in headers
            assert json.loads(body)["outputs"][0]["data"] == [1, 2, 3, 4]


def test_http_1_0_gets_its_answer_and_a_close(fast_server) -> None:
    with _connect(fast_server) as sock:
        sock.sendall(_request("/v2/models/alpha/versions/1/infer", version=b"1.0"))
        [(status, headers, _)] = _answers(sock, 1)
        assert status.endswith(b"200 OK") and headers[b"connection"] == b"close"
        assert sock.recv(100) == b""  # closed


def test_pipelined_requests_get_the_first_answer_and_a_close(fast_server) -> None:
    """A request sent behind one still being served is not silently mixed up: the first is
    answered with ``connection: close`` and the client retries the rest (as after any close)."""
    with _connect(fast_server) as sock:
        sock.sendall(_request("/v2/models/alpha/infer") * 3)
        answers = _answers(sock, 3)
        assert len(answers) >= 1 and answers[0][0].endswith(b"200 OK")
        if len(answers) == 1:
            assert answers[0][1][b"connection"] == b"close"


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v2/models/nope/infer", BODY, 404, "nope"),
        ("/v2/models/alpha/versions/9/infer", BODY, 404, "9"),
        ("/v2/models/alpha/infer", b"{not json", 400, "JSON"),
        ("/v2/models/alpha/infer", b"x" * 200_000, 413, "100000"),
        ("/v2/models/nope/infer", b"x" * 200_000, 404, "nope"),
    ],
    ids=["unknown-model", "unknown-version", "bad-json", "too-large", "too-large-unknown"],
)
def test_errors_on_the_fast_path_keep_the_connection(fast_server, path, body, status, says):
    with _connect(fast_server) as sock:
        sock.sendall(_request(path, body))
        [(first, _, answer)] = _answers(sock, 1)
        assert first.startswith(b"HTTP/1.1 %d " % status), first
        assert says in json.loads(answer)["error"]
        sock.sendall(_request("/v2/models/alpha/infer"))  # the connection still serves
        [(again, _, _)] = _answers(sock, 1)
        assert again.endswith(b"200 OK")


def test_expect_100_continue_and_encoded_paths_answer_the_same(fast_server) -> None:
    with _connect(fast_server) as sock:
        sock.sendall(_request("/v2/models/alpha/infer", extra=b"Expect: 100-continue\r\n"))
        sock.settimeout(10)
        data = b""
        while b"outputs" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert b"HTTP/1.1 200 OK" in data
    r = httpx.post(f"{fast_server.url}/v2/models/%61lpha/infer", content=BODY, timeout=10)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1, 2, 3, 4]


def test_fast_requests_are_counted(fast_server) -> None:
    before = _count(fast_server.url)
    for _ in range(3):
        r = httpx.post(f"{fast_server.url}/v2/models/alpha/infer", content=BODY, timeout=10)
        assert r.status_code == 200
    assert _count(fast_server.url) == before + 3


def _count(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return metric(text, "slimserve_requests_total", model="alpha", outcome="success")


def test_the_server_answers_after_a_client_vanishes_mid_request(fast_server) -> None:
    for _ in range(3):
        sock = _connect(fast_server)
        sock.sendall(_request("/v2/models/alpha/infer")[:-5])  # body incomplete
        sock.close()
    with _connect(fast_server) as sock:
        sock.sendall(_request("/v2/models/alpha/infer"))
        answers = _answers(sock, 1)
    assert answers and answers[0][0].endswith(b"200 OK")
    assert httpx.get(f"{fast_server.url}/v2/health/ready", timeout=10).status_code == 200

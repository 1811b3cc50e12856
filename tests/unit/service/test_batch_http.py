"""The http engine against a stand-in v2 server: binary tensors, retries, refused rows."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from service.batch import JobConfig, JobFailed, SetupError, run_job
from service.core.protocol import (
    HEADER_LENGTH,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    select_outputs,
)

METADATA = {
    "name": "double",
    "versions": ["3"],
    "platform": "onnxruntime_onnx",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}


class StubServer:
    """``y = 2x`` over v2 with the binary extension; 503 for the first ``busy`` requests; 400
    for any batch holding the value 666."""

    def __init__(self, busy: int = 0, drop: int = 0) -> None:
        self.busy = busy
        self.drop = drop  # requests answered by closing the connection
        self.requests: list[tuple[int, int]] = []  # (status, rows)
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/v2/models/double":
                    self._send(200, orjson.dumps(METADATA), {"content-type": "application/json"})
                else:
                    self._send(
                        404, b'{"error": "model \'nope\' is not served here (models: double)"}', {}
                    )

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = decode_request(body, self.headers.get(HEADER_LENGTH))
                x = request.inputs["x"]
                with stub.lock:
                    if stub.drop > 0:
                        stub.drop -= 1
                        stub.requests.append((0, len(x)))
                        self.close_connection = True  # no answer at all
                        return
                    if stub.busy > 0:
                        stub.busy -= 1
                        stub.requests.append((503, len(x)))
                        self._send(503, b'{"error": "queue full"}', {"retry-after": "0"})
                        return
                    status = 400 if (x == 666).any() else 200
                    stub.requests.append((status, len(x)))
                if status == 400:
                    self._send(400, b'{"error": "value 666 is cursed"}', {})
                    return
                wanted = select_outputs(request, ["y"], "double")
                payload, headers = encode_response("double", "3", request, wanted, {"y": x * 2})
                self._send(200, payload, headers)

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer(busy=2)
    yield server
    server.close()


def test_request_and_response_codecs_round_trip() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    body, headers = encode_request({"x": x}, ["y"], binary=True, parameters={"variant": "int8"})
    n = int(headers[HEADER_LENGTH])
    assert orjson.loads(body[:n])["inputs"][0]["parameters"] == {"binary_data_size": x.nbytes}
    assert len(body) - n == x.nbytes
    request = decode_request(body, headers[HEADER_LENGTH])
    np.testing.assert_array_equal(request.inputs["x"], x)
    assert request.parameters == {"variant": "int8"}
    assert request.outputs is not None and request.outputs[0].binary
    payload, extra = encode_response(
        "m", "1", request, select_outputs(request, ["y"], "m"), {"y": x + 1}
    )
    response = decode_response(payload, extra.get(HEADER_LENGTH))
    assert (response.model_name, response.model_version) == ("m", "1")
    np.testing.assert_array_equal(response.outputs["y"], x + 1)
    json_body, json_headers = encode_request({"x": x}, None, binary=False)
    assert json_headers == {"content-type": "application/json"}
    np.testing.assert_array_equal(decode_request(json_body).inputs["x"], x)


def test_http_engine_retries_busy_answers_and_sets_refused_rows_aside(stub, tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    x[13, 1] = 666
    source = tmp_path / "in.npy"
    np.save(source, x)
    target = tmp_path / "out.parquet"
    summary = run_job(
        JobConfig(
            model="double",
            input=source,
            output=target,
            engine="http",
            url=stub.url,
            batch_size=4,
            concurrency=2,
            chunk_rows=8,
            retry_backoff_s=0.01,
            max_error_rate=0.1,
            progress=False,
            repo=tmp_path / "no-repo",
        )
    )
    out = pq.read_table(target)
    good = [i for i in range(20) if i != 13]
    assert out["row"].to_pylist() == good
    np.testing.assert_array_equal(np.array(out["y"].to_pylist(), np.float32), x[good] * 2)
    errors = [
        orjson.loads(line)
        for line in (tmp_path / "out.parquet.errors.jsonl").read_bytes().splitlines()
    ]
    assert errors == [
        {"row": 13, "id": None, "reason": "the server refused the row: value 666 is cursed"}
    ]
    statuses = [s for s, _ in stub.requests]
    assert statuses.count(503) == 2
    # the refused batch of 4 was split until the one bad row was found
    assert sorted(n for s, n in stub.requests if s == 400) == [1, 2, 4]
    assert summary.predicted == 19


def test_http_engine_retries_dropped_connections(tmp_path):
    server = StubServer(drop=2)
    try:
        source = tmp_path / "in.npy"
        x = np.arange(15, dtype=np.float32).reshape(5, 3)
        np.save(source, x)
        config = JobConfig(
            model="double", input=source, output=tmp_path / "o.npy", engine="http",
            url=server.url, retry_backoff_s=0.01, concurrency=1, progress=False,
            repo=tmp_path / "no-repo",
        )  # fmt: skip
        assert run_job(config).predicted == 5
        assert [s for s, _ in server.requests] == [0, 0, 200]
        np.testing.assert_array_equal(np.load(tmp_path / "o.npy")["y"], x * 2)
    finally:
        server.close()


def test_http_engine_gives_up_after_its_retries(tmp_path):
    server = StubServer(busy=100)
    try:
        source = tmp_path / "in.npy"
        np.save(source, np.ones((5, 3), np.float32))
        config = JobConfig(
            model="double",
            input=source,
            output=tmp_path / "o.csv",
            engine="http",
            url=server.url,
            retries=2,
            retry_backoff_s=0.01,
            progress=False,
            repo=tmp_path / "no-repo",
        )
        with pytest.raises(
            JobFailed, match=r"gave up after 2 retries; last answer: 503 queue full"
        ):
            run_job(config)
        assert len(server.requests) == 3
    finally:
        server.close()


def test_http_engine_setup_errors_name_the_server(stub, tmp_path):
    source = tmp_path / "in.npy"
    np.save(source, np.ones((5, 3), np.float32))
    config = {"input": source, "output": tmp_path / "o.csv", "engine": "http", "progress": False}
    with pytest.raises(
        SetupError, match=rf"model 'nope' at {stub.url}: 404 model 'nope' is not served here"
    ):
        run_job(JobConfig(model="nope", url=stub.url, **config))
    with pytest.raises(
        SetupError, match=r"no v2 server answers at http://127.0.0.1:9 \(ConnectError"
    ):
        run_job(JobConfig(model="double", url="http://127.0.0.1:9", **config))
    with pytest.raises(SetupError, match="does not serve variants; drop --variant int8"):
        run_job(JobConfig(model="double", url=stub.url, variant="int8", **config))
    assert not Path(tmp_path / "o.csv").exists()

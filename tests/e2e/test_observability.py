"""What the server tells operators under hostile or careless traffic: a bounded set of metric
series whatever the URLs, work for clients that hung up dropped and counted."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import pytest

from service.core.repository import ModelRepository
from tests.conftest import publish_identity, publish_slow
from tests.e2e.conftest import metric, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


def test_unknown_models_and_paths_add_no_metric_series(server) -> None:
    httpx.get(f"{server.url}/no/such/warmup")  # the bounded series of unknown things exist now
    httpx.post(f"{server.url}/v2/models/warmup-unknown/infer", json={"inputs": []})
    httpx.get(f"{server.url}/v2/models/warmup-unknown")
    before = _series(httpx.get(f"{server.url}/metrics").text)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for i in range(100):
            assert c.get(f"/random/path/{i}/x%0Ay").status_code == 404
            assert c.post(f"/v2/models/unknown-{i}/infer", json={"inputs": []}).status_code == 404
            assert c.get(f"/v2/models/unknown-{i}").status_code == 404
    after = httpx.get(f"{server.url}/metrics").text
    assert _series(after) == before, sorted(_series(after) - before)[:10]
    assert "unknown-7" not in after and "random" not in after


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("slow")
    repo = ModelRepository(work / "models")
    publish_slow(repo)
    publish_identity(repo, "alpha")
    srv = start_server(repo.root, work)
    yield srv
    stop_server(srv.process)


def test_requests_whose_client_hung_up_are_dropped_before_onnxruntime(slow_server) -> None:
    """30 clients send one sample each while a 2,048-sample request keeps the model busy for
    a few seconds, then hang up: their work never reaches onnxruntime, and it is counted."""
    x = np.zeros((2048, 2048), np.float32)  # 32 batches of 64
    header = (
        b'{"inputs": [{"name": "x", "shape": [2048, 2048], "datatype": "FP32", '
        b'"parameters": {"binary_data_size": %d}}]}' % x.nbytes
    )
    one = b'{"inputs": [{"name": "x", "shape": [1, 2048], "datatype": "FP32", "data": [%s]}]}' % (
        b",".join([b"0"] * 2048)
    )
    before = httpx.get(f"{slow_server.url}/metrics").text
    answer: list[httpx.Response] = []
    patient = threading.Thread(
        target=lambda: answer.append(
            httpx.post(
                f"{slow_server.url}/v2/models/slow/infer",
                content=header + x.tobytes(),
                headers={"Inference-Header-Content-Length": str(len(header))},
                timeout=120,
            )
        )
    )
    patient.start()
    time.sleep(0.5)  # decoded and queued: the model is busy
    impatient = []
    for _ in range(30):
        sock = socket.create_connection(("127.0.0.1", slow_server.port))
        sock.sendall(
            b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(one), one)
        )
        impatient.append(sock)
    time.sleep(0.2)
    for sock in impatient:  # hang up while queued
        sock.close()
    patient.join()
    assert answer[0].status_code == 200
    time.sleep(0.5)
    after = httpx.get(f"{slow_server.url}/metrics").text
    labels = {"model": "slow"}
    gone = metric(after, "slimserve_requests_total", outcome="client_gone", **labels)
    gone -= metric(before, "slimserve_requests_total", outcome="client_gone", **labels)
    samples = metric(after, "slimserve_inference_samples_total", **labels)
    samples -= metric(before, "slimserve_inference_samples_total", **labels)
    assert gone == 30
    assert samples == 2048  # none of the 30 abandoned samples reached onnxruntime

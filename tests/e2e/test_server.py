"""The real server on 127.0.0.1, driven by tritonclient.http and plain HTTP."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from export.data import load
from service.core.runtime import OrtSession
from tests.e2e.conftest import metric

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(f"{server.host}:{server.port}", concurrency=8)
    yield c
    c.close()


def test_health_and_metadata_through_tritonclient(client, server) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits-cnn")
    assert not client.is_model_ready("iris-knn")
    meta = client.get_model_metadata("digits-gan")
    assert meta["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("noise", "FP32", [-1, 32]),
        ("label", "INT64", [-1]),
    ]
    assert client.get_server_metadata()["name"] == "slimserve"


@pytest.mark.parametrize("binary", [False, True])
def test_digits_accuracy_over_tritonclient_equals_the_manifest(
    client, server, binary: bool
) -> None:
    ds = load("digits")
    x = ds.x_test.reshape(-1, 1, 8, 8)
    labels = []
    for i in range(0, len(x), 90):
        chunk = x[i : i + 90]
        inp = triton.InferInput("pixels", list(chunk.shape), "FP32")
        inp.set_data_from_numpy(chunk, binary_data=binary)
        out = triton.InferRequestedOutput("label", binary_data=binary)
        result = client.infer("digits-cnn", [inp], outputs=[out], request_id=f"chunk-{i}")
        assert result.get_response()["id"] == f"chunk-{i}"
        assert result.as_numpy("probabilities") is None  # only what was asked for
        labels.append(result.as_numpy("label"))
    accuracy = float(np.mean(np.concatenate(labels) == ds.y_test))
    m = server.repo.get("digits-cnn").manifest  # the default variant answers
    assert accuracy == m.variants[m.default_variant].details["measurement"]["metrics"]["accuracy"]


def test_two_inputs_int64_and_binary_output(client, server) -> None:
    noise = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    label = np.array([0, 3, 7, 9], dtype=np.int64)
    inputs = [triton.InferInput("noise", [4, 32], "FP32"), triton.InferInput("label", [4], "INT64")]
    inputs[0].set_data_from_numpy(noise, binary_data=True)
    inputs[1].set_data_from_numpy(label, binary_data=False)
    result = client.infer(
        "digits-gan", inputs, outputs=[triton.InferRequestedOutput("image", binary_data=True)]
    )
    local = OrtSession(server.repo.get("digits-gan").variant_path(), "local")
    assert np.allclose(
        result.as_numpy("image"), local.run({"noise": noise, "label": label})[0], atol=1e-6
    )


def test_concurrent_clients_with_mixed_batch_sizes(server) -> None:
    ds = load("digits")
    local = OrtSession(server.repo.get("digits-pca").variant_path(), "local")
    rng = np.random.default_rng(2)
    batches = [
        ds.x_test[rng.integers(0, len(ds.x_test), int(rng.integers(1, 12)))] for _ in range(160)
    ]

    def call(x: np.ndarray):
        body = {
            "inputs": [
                {"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
            ]
        }
        return httpx.post(f"{server.url}/v2/models/digits-pca/infer", json=body, timeout=30)

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(call, batches))
    for x, r in zip(batches, responses, strict=True):
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
        assert np.allclose(got, local.run({"pixels": x})[0], atol=1e-5)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "message"),
    [
        (
            "post",
            "/v2/models/nope/infer",
            {"json": {"inputs": []}},
            404,
            "model 'nope' is not served here",
        ),
        ("get", "/v2/models/nope", {}, 404, "model 'nope' is not served here"),
        (
            "post",
            "/v2/models/digits-cnn/infer",
            {"content": b"{"},
            400,
            "request body is not valid JSON",
        ),
        (
            "post",
            "/v2/models/digits-cnn/infer",
            {
                "json": {
                    "inputs": [
                        {"name": "pixels", "shape": [3, 64], "datatype": "FP32", "data": [0] * 192}
                    ]
                }
            },
            400,
            "input 'pixels' of model 'digits-cnn': expected shape [-1, 1, 8, 8], got [3, 64]",
        ),
        (
            "post",
            "/v2/models/digits-cnn/infer",
            {
                "json": {
                    "inputs": [
                        {
                            "name": "pixels",
                            "shape": [1, 1, 8, 8],
                            "datatype": "INT64",
                            "data": [0] * 64,
                        }
                    ]
                }
            },
            400,
            "expected datatype FP32, got INT64",
        ),
        (
            "post",
            "/v2/models/iris-knn/infer",
            {"json": {"inputs": []}},
            400,
            "model 'iris-knn' version 1 failed to load and will not be served",
        ),
        ("get", "/v2/models/iris-knn/ready", {}, 400, "sha256"),
        (
            "post",
            "/v2/models/digits-cnn/infer",
            {"content": b"x" * 2_100_000},
            413,
            "over the limit of 2000000",
        ),
    ],
)
def test_errors_over_http(server, method, path, kwargs, status, message) -> None:
    r = getattr(httpx, method)(f"{server.url}{path}", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    if status == 503:
        assert r.headers["retry-after"] == "1"


def test_client_errors_are_summed_up_in_a_few_lines_without_traceback(server) -> None:
    """A burst of bad requests writes a WARNING summary at most every 10 s, not a line each."""
    before = len(server.log_text())
    with httpx.Client() as c:
        for _ in range(1000):
            c.post(f"{server.url}/v2/models/digits-cnn/infer", content=b"{", timeout=10)
    time.sleep(0.5)
    log = server.log_text()[before:]
    assert "Traceback" not in log
    assert len(log) < 2000, f"{len(log)} bytes of log for 1,000 bad requests"


def test_metrics_count_requests_and_samples(server) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    x = load("diabetes").x_test[:3]
    body = {
        "inputs": [{"name": "features", "shape": [3, 10], "datatype": "FP32", "data": x.tolist()}]
    }
    for _ in range(7):
        assert (
            httpx.post(f"{server.url}/v2/models/diabetes-linear/infer", json=body).status_code
            == 200
        )
    bad = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert httpx.post(f"{server.url}/v2/models/diabetes-linear/infer", json=bad).status_code == 400
    httpx.post(f"{server.url}/v2/models/no-such-model-xyz/infer", json=body)
    after = httpx.get(f"{server.url}/metrics").text
    labels = {"model": "diabetes-linear", "version": "1", "variant": "fp32"}

    def delta(name: str, **extra: str) -> float:
        return metric(after, name, **labels, **extra) - metric(before, name, **labels, **extra)

    assert delta("slimserve_requests_total", outcome="success") == 7
    assert delta("slimserve_requests_total", outcome="invalid_input") == 1
    assert delta("slimserve_inference_samples_total") == 21
    assert delta("slimserve_request_duration_seconds_count") == 7
    assert delta("slimserve_queue_duration_seconds_count") == 7
    assert 1 <= delta("slimserve_batch_executions_total") <= 7
    info = {"model": "digits-cnn", "variant": "fp32", "provider": "CPUExecutionProvider"}
    assert metric(after, "slimserve_model_info", **info) == 1
    assert metric(after, "slimserve_model_info", model="iris-knn", provider="none") == 0
    assert "no-such-model-xyz" not in after  # unknown names never become series
    assert re.search(r'slimserve_requests_total\{.*model="_unknown".*outcome="not_found"', after)


def test_friendly_endpoints_are_counted_like_v2(server) -> None:
    """One dataplane counts every transport: /regress lands in the same series as /v2."""
    before = httpx.get(f"{server.url}/metrics").text
    rows = load("diabetes").x_test[:4].tolist()
    for _ in range(3):
        r = httpx.post(f"{server.url}/regress", json={"model": "diabetes-linear", "rows": rows})
        assert r.status_code == 200, r.text
    bad = httpx.post(f"{server.url}/regress", json={"model": "diabetes-linear", "rows": [[1.0]]})
    assert bad.status_code == 400
    after = httpx.get(f"{server.url}/metrics").text
    labels = {"model": "diabetes-linear", "version": "1", "variant": "fp32"}

    def delta(name: str, **extra: str) -> float:
        return metric(after, name, **labels, **extra) - metric(before, name, **labels, **extra)

    assert delta("slimserve_requests_total", outcome="success") == 3
    assert delta("slimserve_requests_total", outcome="invalid_input") == 1
    assert delta("slimserve_inference_samples_total") == 12

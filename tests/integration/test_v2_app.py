"""The v2 ASGI app in-process (no server): protocol, batching, errors, metrics."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import numpy as np
import orjson
import pytest

from export.data import load
from service.core.repository import ModelRepository
from service.core.settings import Settings
from service.http.app import HttpApp
from service.serving.dataplane import DataPlane
from service.serving.store import ModelStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app_repo(zoo_repo: ModelRepository, tmp_path_factory) -> ModelRepository:
    """Three zoo models plus one whose file is corrupt."""
    root = tmp_path_factory.mktemp("v2") / "models"
    for name in ("digits-cnn", "digits-gan", "diabetes-linear", "iris-knn"):
        shutil.copytree(zoo_repo.root / name, root / name)
    bad = root / "iris-knn" / "1" / "model.onnx"
    bad.write_bytes(bad.read_bytes()[:50])
    return ModelRepository(root)


@pytest.fixture(scope="module")
def store(app_repo: ModelRepository) -> ModelStore:
    settings = Settings(model_repository=app_repo.root, max_body_bytes=200_000, max_batch_size=32)
    s = ModelStore(app_repo, settings)
    s.load_all()
    return s


def run(store: ModelStore, coro_fn):
    async def main():
        transport = httpx.ASGITransport(app=HttpApp(DataPlane(store), dict))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await coro_fn(client)

    return asyncio.run(main())


def infer_body(x: np.ndarray, name: str = "pixels", datatype: str = "FP32", **extra) -> dict:
    return {
        "inputs": [
            {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}
        ],
        **extra,
    }


def test_server_metadata_and_health(store: ModelStore) -> None:
    async def go(c):
        return [await c.get(p) for p in ("/v2", "/v2/health/live", "/v2/health/ready")]

    meta, live, ready = run(store, go)
    assert meta.json()["name"] == "slimserve" and "binary_tensor_data" in meta.json()["extensions"]
    assert live.status_code == 200
    assert ready.status_code == 200
    assert list(ready.json()["not_ready_models"]) == ["iris-knn"]


def test_model_metadata(store: ModelStore) -> None:
    r = run(store, lambda c: c.get("/v2/models/digits-gan"))
    assert r.status_code == 200
    meta = r.json()
    params = meta.pop("parameters")
    assert params["variant"] == params["default_variant"]
    assert params["card"].startswith("# digits-gan: variants")
    assert params["variants"]["fp32"]["served"] is True
    assert meta == {
        "name": "digits-gan",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "noise", "datatype": "FP32", "shape": [-1, 32]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
    }
    assert run(store, lambda c: c.get("/v2/models/digits-gan/versions/1/ready")).status_code == 200


def test_digits_test_split_accuracy_equals_the_manifest(store: ModelStore) -> None:
    ds = load("digits")
    x = ds.x_test.reshape(-1, 1, 8, 8)

    async def go(c):
        chunks = [x[i : i + 50] for i in range(0, len(x), 50)]
        rs = await asyncio.gather(
            *(
                c.post("/v2/models/digits-cnn/infer", json=infer_body(ch, id=f"r{i}"))
                for i, ch in enumerate(chunks)
            )
        )
        return rs

    responses = run(store, go)
    labels = []
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (
            doc["id"] == f"r{i}"
            and doc["model_name"] == "digits-cnn"
            and doc["model_version"] == "1"
        )
        labels += next(o for o in doc["outputs"] if o["name"] == "label")["data"]
    accuracy = float(np.mean(np.array(labels) == ds.y_test))
    model = store.models["digits-cnn"]  # the default variant answers: its measured accuracy
    measured = model.manifest.variants[model.variant].details["measurement"]["metrics"]
    assert accuracy == measured["accuracy"]


def test_many_concurrent_clients_with_mixed_batch_sizes_get_their_own_results(
    store: ModelStore,
) -> None:
    rng = np.random.default_rng(1)
    ds = load("digits")
    reference = store.models["digits-cnn"].session
    requests = []
    for _ in range(120):
        idx = rng.integers(0, len(ds.x_test), int(rng.integers(1, 9)))
        requests.append(ds.x_test[idx].reshape(-1, 1, 8, 8))

    async def go(c):
        return await asyncio.gather(
            *(c.post("/v2/models/digits-cnn/infer", json=infer_body(x)) for x in requests)
        )

    responses = run(store, go)
    for x, r in zip(requests, responses, strict=True):
        probs = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")
        assert probs["shape"] == [len(x), 10]
        expected = reference.run({"pixels": x})[1]
        assert np.allclose(np.array(probs["data"]).reshape(len(x), 10), expected, atol=1e-6)
    executions = store.models["digits-cnn"].batcher  # merged: fewer runs than requests
    assert executions is not None


def binary_header(x: np.ndarray, **extra) -> bytes:
    """The JSON header of a v2 request whose ``features`` input follows as raw bytes."""
    tensor = {
        "name": "features",
        "shape": list(x.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": x.nbytes},
    }
    return orjson.dumps({"inputs": [tensor], **extra})


def test_binary_tensors_both_ways(store: ModelStore) -> None:
    x = load("diabetes").x_test[:5]
    header = binary_header(x, outputs=[{"name": "prediction", "parameters": {"binary_data": True}}])
    r = run(
        store,
        lambda c: c.post(
            "/v2/models/diabetes-linear/infer",
            content=header + x.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header))},
        ),
    )
    assert r.status_code == 200
    n = int(r.headers["inference-header-content-length"])
    doc = orjson.loads(r.content[:n])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 20
    got = np.frombuffer(r.content[n:], np.float32).reshape(5, 1)
    expected = store.models["diabetes-linear"].session.run({"features": x})[0]
    assert np.allclose(got, expected)


@pytest.mark.parametrize(
    ("path", "payload", "status", "message"),
    [
        ("/v2/models/nope/infer", {"inputs": []}, 404, "model 'nope' is not served here"),
        (
            "/v2/models/digits-cnn/versions/9/infer",
            {"inputs": []},
            404,
            "has no version '9' loaded",
        ),
        (
            "/v2/models/iris-knn/infer",
            {"inputs": []},
            400,
            "model 'iris-knn' version 1 failed to load and will not be served",
        ),
        ("/v2/models/digits-cnn/infer", b"{oops", 400, "request body is not valid JSON"),
        (
            "/v2/models/digits-cnn/infer",
            infer_body(np.zeros((3, 64), np.float32)),
            400,
            "input 'pixels' of model 'digits-cnn': expected shape [-1, 1, 8, 8], got [3, 64]",
        ),
        (
            "/v2/models/digits-cnn/infer",
            infer_body(np.zeros((1, 1, 8, 8)), datatype="FP64"),
            400,
            "expected datatype FP32, got FP64",
        ),
        (
            "/v2/models/digits-cnn/infer",
            infer_body(np.zeros((1, 1, 8, 8), np.float32), name="image"),
            400,
            "model 'digits-cnn' has no input 'image'; it expects inputs ['pixels']",
        ),
        (
            "/v2/models/digits-cnn/infer",
            infer_body(np.zeros((1000, 1, 8, 8), np.float32)),
            413,
            "over the limit of 200000",
        ),
    ],
)
def test_errors_are_json_with_the_right_status(
    store: ModelStore, path, payload, status, message
) -> None:
    kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    r = run(store, lambda c: c.post(path, **kwargs))
    assert r.status_code == status
    assert message in r.json()["error"]
    if status == 503:
        assert r.headers["retry-after"] == "1"


def test_nan_over_binary_is_refused(store: ModelStore) -> None:
    x = np.full((1, 10), np.nan, np.float32)
    header = binary_header(x)
    r = run(
        store,
        lambda c: c.post(
            "/v2/models/diabetes-linear/infer",
            content=header + x.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header))},
        ),
    )
    assert r.status_code == 400 and "NaN or infinity" in r.json()["error"]


def test_unknown_routes_are_404_json(store: ModelStore) -> None:
    r = run(store, lambda c: c.get("/v2/models/digits-cnn/bogus"))
    assert r.status_code == 404 and "no route" in r.json()["error"]

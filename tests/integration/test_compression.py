"""The zoo's variants: built, valid, measured, chosen, carded, and served by name."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.data import load
from service.core.repository import ModelRepository
from service.core.settings import Settings
from service.http.app import HttpApp
from service.serving.dataplane import DataPlane
from service.serving.metrics import metrics
from service.serving.store import ModelStore

pytestmark = pytest.mark.slow

# documented tolerances (README, "Compression"): label agreement with FP32 on the test split
MIN_LABEL_AGREEMENT = {"int8-dynamic": 0.98, "int8-static": 0.98, "pruned": 0.95, "distilled": 0.95}


def initializer_numbers(path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
def test_every_technique_gives_a_valid_variant_that_agrees_with_fp32(
    zoo_repo: ModelRepository, name: str
) -> None:
    model = zoo_repo.get(name)
    m = model.manifest
    assert set(m.variants) == {"fp32", "int8-dynamic", "int8-static", "pruned", "distilled", "fp16"}
    for variant, floor in MIN_LABEL_AGREEMENT.items():
        entry = m.variants[variant]
        assert entry.available and entry.file in m.files, (variant, entry.reason)
        onnx.checker.check_model(str(model.path / entry.file))
        measured = entry.details["measurement"]
        assert measured["label_agreement"] >= floor, (variant, measured["label_agreement"])
        assert set(measured["latency"]) == {"1", "32"} and measured["speedup"]["32"] > 0
    # pruning shrinks the stored weights, distillation more so
    fp32 = initializer_numbers(model.path / "model.onnx")
    assert initializer_numbers(model.path / m.variants["pruned"].file) < 0.5 * fp32
    assert initializer_numbers(model.path / m.variants["distilled"].file) < fp32 / 3
    # INT8 weights take a quarter of the bytes
    size = m.variants["int8-static"].details["measurement"]["size_bytes"]
    assert size < model.path.joinpath("model.onnx").stat().st_size / 2.5


def test_the_distilled_student_keeps_97_percent_of_the_teachers_accuracy(
    zoo_repo: ModelRepository,
) -> None:
    m = zoo_repo.get("digits-cnn").manifest
    teacher = m.variants["fp32"].details["measurement"]["metrics"]["accuracy"]
    student = m.variants["distilled"].details["measurement"]["metrics"]["accuracy"]
    assert student >= 0.97 * teacher


def test_fp16_is_built_and_marked_for_cuda(zoo_repo: ModelRepository) -> None:
    m = zoo_repo.get("digits-mlp").manifest
    fp16 = m.variants["fp16"]
    assert fp16.file and fp16.requires_provider == "CUDAExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert not fp16.available and "no CUDAExecutionProvider" in fp16.reason


def test_techniques_that_do_not_apply_say_why(zoo_repo: ModelRepository) -> None:
    knn = zoo_repo.get("iris-knn").manifest.variants
    assert knn["pruned"].reason.startswith("not applicable: a scikit-learn estimator")
    assert "ai.onnx.ml" in knn["int8-dynamic"].reason
    logreg = zoo_repo.get("digits-logreg").manifest.variants
    assert "no hidden neurons" in logreg["pruned"].reason


def test_default_is_the_fastest_within_budget_and_the_card_says_why(
    zoo_repo: ModelRepository,
) -> None:
    for name in ("digits-cnn", "digits-mlp", "diabetes-mlp"):
        model = zoo_repo.get(name)
        m = model.manifest
        sel = m.selection
        ref = m.variants["fp32"].details["measurement"]["metrics"][m.headline_metric]
        eligible = {v for v, verdict in sel["verdicts"].items() if verdict["eligible"]}
        assert m.default_variant in eligible
        if m.default_variant != "fp32":
            chosen = m.variants[m.default_variant].details["measurement"]
            assert chosen["speedup"]["32"] >= sel["budget"]["min_speedup"]
            faster = [
                v
                for v in eligible - {"fp32"}
                if m.variants[v].details["measurement"]["speedup"]["32"] > chosen["speedup"]["32"]
            ]
            assert not faster
            value = chosen["metrics"][m.headline_metric]
            if m.headline_metric == "accuracy":
                assert value >= ref - sel["budget"]["max_accuracy_drop"] - 1e-9
        card = (model.path / "card.md").read_text()
        assert f"Default variant: **{m.default_variant}**" in card
        assert "card.md" in m.files and "accuracy_latency.png" in m.files
        assert (model.path / "accuracy_latency.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def store(zoo_repo: ModelRepository) -> ModelStore:
    s = ModelStore(zoo_repo, Settings(model_repository=zoo_repo.root))
    s.load_all()
    return s


def call(store: ModelStore, method: str, path: str, **kwargs) -> httpx.Response:
    async def main():
        transport = httpx.ASGITransport(app=HttpApp(DataPlane(store), dict))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(main())


def body(x: np.ndarray, **extra) -> dict:
    return {
        "inputs": [
            {
                "name": "pixels",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
        **extra,
    }


X = load("digits", 0).x_test[:8].reshape(-1, 1, 8, 8)


def labels(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return next(o for o in response.json()["outputs"] if o["name"] == "label")["data"]


def test_every_variant_is_addressable_over_http(store: ModelStore) -> None:
    default = store.models["digits-cnn"].variant
    plain = call(store, "POST", "/v2/models/digits-cnn/infer", json=body(X))
    assert plain.json()["parameters"] == {"variant": default}
    for variant in ("fp32", "int8-static", "pruned"):
        by_url = call(store, "POST", f"/v2/models/digits-cnn@{variant}/infer", json=body(X))
        by_param = call(
            store,
            "POST",
            "/v2/models/digits-cnn/infer",
            json=body(X, parameters={"variant": variant}),
        )
        assert by_url.json()["parameters"] == {"variant": variant}
        assert labels(by_url) == labels(by_param)
        assert by_url.json()["model_name"] == "digits-cnn"
    requests = metrics().requests.labels("digits-cnn", "1", "int8-static", "success", "http")
    assert requests._value.get() >= 2


def test_metadata_carries_the_variants_and_the_card(store: ModelStore) -> None:
    meta = call(store, "GET", "/v2/models/digits-cnn@pruned").json()
    params = meta["parameters"]
    assert params["variant"] == "pruned"
    assert params["variants"]["fp16"]["served"] is (
        "CUDAExecutionProvider" in ort.get_available_providers()
    )
    assert params["card"].startswith("# digits-cnn: variants")


@pytest.mark.parametrize(
    ("path", "extra", "status", "message"),
    [
        (
            "/v2/models/digits-cnn@int4/infer",
            {},
            404,
            "model 'digits-cnn' has no variant 'int4' (served variants: ['distilled', 'fp32', 'int8-dynamic', 'int8-static', 'pruned'",
        ),
        (
            "/v2/models/digits-cnn/infer",
            {"parameters": {"variant": 3}},
            400,
            "request parameter 'variant' for model 'digits-cnn': expected a variant name (string), got 3",
        ),
        (
            "/v2/models/digits-cnn@pruned/infer",
            {"parameters": {"variant": "fp32"}},
            400,
            "the URL names variant 'pruned', the request parameter 'variant' names 'fp32'; name one",
        ),
        (
            "/v2/models/iris-knn@pruned/infer",
            {},
            404,
            "model 'iris-knn' variant 'pruned' is not served here: not applicable: a scikit-learn estimator",
        ),
    ],
)
def test_bad_variant_requests_get_clear_errors(store, path, extra, status, message) -> None:
    response = call(store, "POST", path, json=body(X, **extra))
    assert response.status_code == status
    assert message in response.json()["error"]


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="checks the CPU-only answer"
)
def test_fp16_without_cuda_is_refused_with_the_reason(store: ModelStore) -> None:
    response = call(store, "POST", "/v2/models/digits-cnn@fp16/infer", json=body(X))
    assert response.status_code == 404
    assert (
        "variant 'fp16' is not served here: built but not measured or served here"
        in response.json()["error"]
    )


@pytest.mark.gpu
def test_fp16_is_served_on_cuda(store: ModelStore) -> None:
    fp32 = call(store, "POST", "/v2/models/digits-cnn@fp32/infer", json=body(X))
    fp16 = call(store, "POST", "/v2/models/digits-cnn@fp16/infer", json=body(X))
    assert fp16.json()["parameters"] == {"variant": "fp16"}
    assert np.mean(np.array(labels(fp16)) == np.array(labels(fp32))) >= 0.99


def test_friendly_endpoints_take_name_at_variant(store: ModelStore) -> None:
    from service.http.friendly import classify

    rows = X.reshape(len(X), -1).tolist()
    answer = asyncio.run(classify(DataPlane(store), "digits-cnn@int8-static", rows))
    assert answer["model"] == "digits-cnn" and answer["variant"] == "int8-static"
    assert len(answer["predictions"]) == len(rows)

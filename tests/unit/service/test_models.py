from __future__ import annotations

import json

import pytest

from service.core.errors import ModelNotFound, ModelNotReady
from service.core.repository import ModelRepository
from service.core.settings import Settings
from service.serving.store import ModelStore
from tests.conftest import publish_identity


def test_manifest_serving_overrides_the_batching_defaults(tiny_repo: ModelRepository) -> None:
    model = publish_identity(tiny_repo, "gamma")
    path = model.path / "manifest.json"
    data = json.loads(path.read_text())
    data["serving"] = {"max_batch_size": 3, "max_queue_delay_ms": 5, "max_queue_size": 9}
    # a hand-edited manifest: its own hash is not recorded, only the files it lists are
    path.write_text(json.dumps(data))
    store = ModelStore(tiny_repo, Settings(model_repository=tiny_repo.root, max_batch_size=64))
    store.load_all()
    gamma = store.models["gamma"].batcher
    alpha = store.models["alpha"].batcher
    assert (gamma.max_batch_size, gamma.max_queue_delay_s, gamma.max_queue_size) == (3, 0.005, 9)
    assert alpha.max_batch_size == 64 and alpha.max_queue_delay_s == 0.0


def test_a_model_that_fails_to_load_is_kept_as_not_ready(tiny_repo: ModelRepository) -> None:
    (tiny_repo.root / "beta" / "1" / "model.onnx").write_bytes(b"broken")
    store = ModelStore(tiny_repo, Settings(model_repository=tiny_repo.root))
    store.load_all()
    assert store.models["alpha"].ready and not store.models["beta"].ready
    with pytest.raises(
        ModelNotReady, match=r"model 'beta' version 1 is not ready: .*sha256"
    ) as info:
        store.resolve("beta")
    assert info.value.headers == {"Retry-After": "1"}
    with pytest.raises(
        ModelNotFound, match=r"model 'zeta' is not served here \(models: alpha, beta\)"
    ):
        store.resolve("zeta")


@pytest.mark.parametrize(
    ("serving", "expected"),
    [
        (
            {"max_batch_size": 0},
            r"max_batch_size: Input should be greater than or equal to 1 \(got 0\)",
        ),
        ({"max_batch_size": "8"}, r"max_batch_size: Input should be a valid integer \(got '8'\)"),
        (
            {"max_queue_delay_ms": -1},
            r"max_queue_delay_ms: Input should be greater than or equal to 0",
        ),
        ({"max_batch": 8}, r"max_batch: Extra inputs are not permitted \(got 8\)"),
        ([8], r"serving: Input should be a valid dictionary"),
    ],
)
def test_a_bad_serving_value_marks_only_that_model_not_ready(
    tiny_repo: ModelRepository, serving: object, expected: str
) -> None:
    model = publish_identity(tiny_repo, "gamma")
    path = model.path / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "serving": serving}))
    store = ModelStore(tiny_repo, Settings(model_repository=tiny_repo.root))
    store.load_all()
    assert store.models["alpha"].ready and not store.models["gamma"].ready
    with pytest.raises(ModelNotReady, match=r"model 'gamma' version 1 is not ready: ") as info:
        store.resolve("gamma")
    assert "manifest 'serving' is invalid" in str(info.value)
    assert info.value.status_code == 503
    with pytest.raises(ModelNotReady, match=expected):
        store.resolve("gamma")

from __future__ import annotations

import json

import pytest

from service.core.errors import ModelNotFound, ModelUnavailable
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
        ModelUnavailable, match=r"model 'beta' version 1 failed to load and will not be served"
    ) as info:
        store.resolve("beta")
    # permanent: 400 as Triton answers, no Retry-After, and no absolute path for clients
    assert info.value.status_code == 400 and info.value.headers == {}
    assert "beta/1/model.onnx: sha256" in info.value.message
    assert str(tiny_repo.root) not in info.value.message
    with pytest.raises(ModelNotFound, match=r"model 'zeta' is not served here \(2 models; "):
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
    with pytest.raises(ModelUnavailable, match=r"model 'gamma' version 1 failed to load") as info:
        store.resolve("gamma")
    assert "manifest 'serving' is invalid" in str(info.value)
    assert info.value.status_code == 400
    with pytest.raises(ModelUnavailable, match=expected):
        store.resolve("gamma")


def test_a_corrupt_variant_file_takes_down_that_variant_only(tiny_repo: ModelRepository) -> None:
    """Each variant's file is checked on its own: the model keeps serving its others."""
    from service.core.repository import Manifest, Variant
    from tests.conftest import write_identity_onnx

    staging = tiny_repo.staging_dir("gamma")
    write_identity_onnx(staging / "model.onnx")
    write_identity_onnx(staging / "model.int8-dynamic.onnx")
    write_identity_onnx(staging / "model.pruned.onnx")
    manifest = Manifest(
        name="gamma",
        version=0,
        task="unknown",
        inputs=[],
        outputs=[],
        variants={
            "fp32": Variant("model.onnx"),
            "int8-dynamic": Variant("model.int8-dynamic.onnx"),
            "pruned": Variant("model.pruned.onnx"),
        },
    )
    version = tiny_repo.publish(staging, manifest)
    (version.path / "model.int8-dynamic.onnx").write_bytes(b"flipped")
    store = ModelStore(tiny_repo, Settings(model_repository=tiny_repo.root))
    store.load_all()
    gamma = store.models["gamma"]
    assert gamma.ready and sorted(gamma.siblings) == ["fp32", "pruned"]
    assert store.resolve("gamma@pruned").variant == "pruned"
    with pytest.raises(ModelNotFound, match="variant 'int8-dynamic' is not served here: .*sha256"):
        store.resolve("gamma@int8-dynamic")
    assert str(tiny_repo.root) not in gamma.unservable["int8-dynamic"]


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda v: _flip_a_byte(v / "model.onnx"), "sha256"),
        (lambda v: (v / "model.onnx").write_bytes((v / "model.onnx").read_bytes()[:20]), "sha256"),
        (lambda v: (v / "model.onnx").unlink(), "listed in manifest.json but missing"),
        (lambda v: (v / "manifest.json").write_text("{"), "manifest is not readable JSON"),
        (lambda v: (v / "manifest.json").write_text('{"format": "x"}'), "does not follow"),
    ],
    ids=["flipped-byte", "truncated", "missing-file", "manifest-not-json", "manifest-wrong"],
)
def test_a_damaged_model_is_refused_with_its_reason_and_the_others_serve(
    tiny_repo: ModelRepository, damage, reason: str
) -> None:
    damage(tiny_repo.root / "beta" / "1")
    store = ModelStore(tiny_repo, Settings(model_repository=tiny_repo.root))
    store.load_all()
    assert store.models["alpha"].ready and not store.models["beta"].ready
    assert reason in store.models["beta"].error
    with pytest.raises(ModelUnavailable, match=reason):
        store.resolve("beta")


def test_a_version_folder_without_a_manifest_is_skipped_and_said(
    tiny_repo: ModelRepository, caplog
) -> None:
    (tiny_repo.root / "beta" / "2").mkdir()
    (tiny_repo.root / "beta" / "2" / "model.onnx").write_bytes(b"half copied")
    store = ModelStore(tiny_repo, Settings(model_repository=tiny_repo.root))
    store.load_all()
    assert store.models["beta"].ready and store.models["beta"].version == 1
    assert "model beta: folder beta/2 has no manifest.json, so it is not a version" in caplog.text

from __future__ import annotations

import json

import pytest

from service.core.repository import (
    IntegrityError,
    Manifest,
    ManifestError,
    ModelNotFoundError,
    ModelRepository,
    TensorSpec,
    sha256_file,
)
from tests.conftest import publish_identity


def test_publish_assigns_versions_and_hashes(tiny_repo: ModelRepository) -> None:
    second = publish_identity(tiny_repo, "alpha")
    assert second.version == 2
    assert tiny_repo.versions("alpha") == [1, 2]
    assert tiny_repo.names() == ["alpha", "beta"]
    model = tiny_repo.get("alpha")
    assert model.version == 2
    entry = model.manifest.files["model.onnx"]
    assert entry.sha256 == sha256_file(model.path / "model.onnx")
    assert entry.bytes == (model.path / "model.onnx").stat().st_size
    model.verify()


def test_manifest_round_trips(tiny_repo: ModelRepository) -> None:
    model = tiny_repo.get("alpha", 1)
    raw = json.loads((model.path / "manifest.json").read_text())
    assert raw["format"] == "slimserve.manifest/1"
    assert raw["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert raw["variants"] == {
        "fp32": {
            "file": "model.onnx",
            "available": True,
            "reason": None,
            "details": {},
            "requires_provider": None,
        }
    }
    assert Manifest.from_dict(raw) == model.manifest
    assert model.manifest.headline == ("score", 1.0)


def test_published_version_is_never_rewritten(tiny_repo: ModelRepository) -> None:
    before = (tiny_repo.root / "alpha" / "1" / "model.onnx").read_bytes()
    publish_identity(tiny_repo, "alpha", width=8)
    assert (tiny_repo.root / "alpha" / "1" / "model.onnx").read_bytes() == before
    assert tiny_repo.get("alpha").manifest.inputs[0].shape == (-1, 8)
    assert not any((tiny_repo.root / ".staging").iterdir())


def test_unknown_model_names_the_model_and_lists_known(tiny_repo: ModelRepository) -> None:
    with pytest.raises(
        ModelNotFoundError, match=r"model 'gamma' is not in the repository.*alpha, beta"
    ):
        tiny_repo.get("gamma")


def test_unknown_version(tiny_repo: ModelRepository) -> None:
    with pytest.raises(
        ModelNotFoundError, match=r"model 'alpha' has no version 7 \(versions: \[1\]\)"
    ):
        tiny_repo.get("alpha", 7)


@pytest.mark.parametrize("name", ["../alpha", "/etc", "a/../../b", ""])
def test_names_cannot_escape_the_repository(tiny_repo: ModelRepository, name: str) -> None:
    with pytest.raises(ModelNotFoundError):
        tiny_repo.get(name)


def test_unknown_variant(tiny_repo: ModelRepository) -> None:
    with pytest.raises(ModelNotFoundError, match=r"has no variant 'int8'.*\['fp32'\]"):
        tiny_repo.get("alpha").variant_path("int8")


def test_truncated_onnx_is_reported_with_its_path(tiny_repo: ModelRepository) -> None:
    path = tiny_repo.root / "alpha" / "1" / "model.onnx"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(IntegrityError) as info:
        tiny_repo.get("alpha").verify()
    assert str(path) in str(info.value)
    assert "does not match the manifest" in str(info.value)
    assert "(20 bytes)" in str(info.value)


def test_missing_file_is_reported(tiny_repo: ModelRepository) -> None:
    path = tiny_repo.root / "beta" / "1" / "model.onnx"
    path.unlink()
    with pytest.raises(IntegrityError, match="listed in manifest.json but missing"):
        tiny_repo.get("beta").verify()


def test_corrupt_manifest_names_the_file(tiny_repo: ModelRepository) -> None:
    path = tiny_repo.root / "alpha" / "1" / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError) as info:
        tiny_repo.get("alpha")
    assert str(path) in str(info.value) and "not readable JSON" in str(info.value)


def test_manifest_missing_fields(tiny_repo: ModelRepository) -> None:
    path = tiny_repo.root / "alpha" / "1" / "manifest.json"
    data = json.loads(path.read_text())
    del data["inputs"]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"does not follow slimserve.manifest/1.*inputs"):
        tiny_repo.get("alpha")


def test_manifest_in_the_wrong_folder(tiny_repo: ModelRepository) -> None:
    src = tiny_repo.root / "alpha" / "1" / "manifest.json"
    (tiny_repo.root / "beta" / "1" / "manifest.json").write_text(src.read_text())
    with pytest.raises(ManifestError, match="describes 'alpha' version 1.*folder of 'beta'"):
        tiny_repo.get("beta")


def test_scan_keeps_the_rest_usable(tiny_repo: ModelRepository) -> None:
    (tiny_repo.root / "alpha" / "1" / "model.onnx").write_bytes(b"garbage")
    entries = {e.name: e for e in tiny_repo.scan()}
    assert entries["alpha"].model is None
    assert isinstance(entries["alpha"].error, IntegrityError)
    assert entries["beta"].error is None
    assert entries["beta"].model is not None
    entries["beta"].model.verify()


def test_manifest_validates_itself() -> None:
    spec = [TensorSpec("x", "FP32", (-1, 1))]
    with pytest.raises(ValueError, match="task 'guessing'"):
        Manifest(name="m", version=1, task="guessing", inputs=spec, outputs=spec)
    with pytest.raises(ValueError, match="model name"):
        Manifest(name="../m", version=1, task="unknown", inputs=spec, outputs=spec)
    with pytest.raises(ValueError, match="default variant 'int8'"):
        Manifest(
            name="m", version=1, task="unknown", inputs=spec, outputs=spec, default_variant="int8"
        )


def test_empty_or_missing_root_has_no_models(tmp_path) -> None:
    assert ModelRepository(tmp_path / "nowhere").names() == []
    (tmp_path / "m" / "1").mkdir(parents=True)  # a version folder without a manifest
    assert ModelRepository(tmp_path).names() == []

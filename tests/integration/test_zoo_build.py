"""Builds the whole zoo into a temporary repository once, then checks what the server will read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export import zoo
from export.build import build
from export.spec import PARITY_BATCH_SIZES
from service.core.repository import IntegrityError, ModelRepository, sha256_file
from tests.conftest import random_feeds, zoo_options

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
ZOO = list(zoo.SPECS)


def test_every_zoo_model_is_published(zoo_repo: ModelRepository) -> None:
    assert zoo_repo.names() == sorted(ZOO)
    assert all(e.error is None for e in zoo_repo.scan(verify=True))


@pytest.mark.parametrize("name", ZOO)
def test_manifest_records_what_the_issue_asks(zoo_repo: ModelRepository, name: str) -> None:
    model = zoo_repo.get(name)
    m = model.manifest
    spec = zoo.SPECS[name]
    assert (m.name, m.version, m.task) == (name, 1, spec.task)
    assert m.inputs and m.outputs
    assert all(t.shape[0] == -1 for t in [*m.inputs, *m.outputs])
    assert m.dataset["name"] == spec.dataset
    assert m.dataset["split"]["seed"] == 0 and m.dataset["split"]["sizes"]["test"] > 0
    assert m.preprocessing["description"]
    assert m.headline is not None and np.isfinite(m.headline[1])
    assert m.parity["passed"] is True
    assert [c["batch_size"] for c in m.parity["checks"]] == [*PARITY_BATCH_SIZES, "test"]
    assert m.producer["opset"] == 18 and m.producer["onnxruntime"] == ort.__version__
    assert "torch" in m.producer if spec.family == "torch" else "skl2onnx" in m.producer
    built = {v.file for v in m.variants.values() if v.file}
    extra = {m.tokenizer["file"]} if m.tokenizer else set()
    assert (
        set(m.files)
        == {"model.onnx", "build.json", "card.md", "accuracy_latency.png"} | built | extra
    )
    assert set(m.variants) == {"fp32", "int8-dynamic", "int8-static", "pruned", "distilled", "fp16"}
    assert all(v.file or v.reason for v in m.variants.values())  # a file, or why there is none
    assert m.default_variant in m.variants and m.selection["reason"]
    for rel, entry in m.files.items():
        assert sha256_file(model.path / rel) == entry.sha256
    assert m.fingerprint and m.created_at.endswith("+00:00")
    if m.task == "classification":
        assert m.labels and len(m.labels) == m.outputs[1].shape[1]
        assert [o.name for o in m.outputs] == ["label", "probabilities"]


@pytest.mark.parametrize("name", ZOO)
def test_onnxruntime_accepts_the_declared_inputs(zoo_repo: ModelRepository, name: str) -> None:
    model = zoo_repo.get(name)
    session = ort.InferenceSession(str(model.variant_path()), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 64):
        outputs = session.run(None, random_feeds(model.manifest.inputs, batch, seed=batch))
        assert len(outputs) == len(model.manifest.outputs)
        for out, spec in zip(outputs, model.manifest.outputs, strict=True):
            assert out.shape[0] == batch
            assert list(out.shape[1:]) == [d for d in spec.shape[1:]]


def test_quality_targets(zoo_repo: ModelRepository) -> None:
    metrics = {n: zoo_repo.get(n).manifest.metrics for n in ZOO}
    assert metrics["digits-cnn"]["accuracy"] >= 0.97
    assert metrics["digits-mlp"]["accuracy"] >= 0.96
    assert metrics["digits-svc"]["accuracy"] >= 0.95
    assert metrics["iris-knn"]["accuracy"] >= 0.9
    assert metrics["diabetes-linear"]["r2"] > 0.2
    # the generators draw digits the CNN recognises, across all classes
    assert metrics["digits-gan"]["confident_share"] >= 0.5
    assert metrics["digits-gan"]["label_agreement"] >= 0.5
    assert metrics["digits-vae-decoder"]["classes_covered"] == 10
    # the denoiser removes some of the noise it was trained on
    ae = metrics["digits-autoencoder"]
    assert ae["denoising_mse"] < ae["noisy_input_mse"]


@pytest.mark.parametrize("name", ["sunspots-lstm", "sunspots-gru"])
def test_forecasters_beat_the_naive_forecast_on_their_card(zoo_repo, name) -> None:
    m = zoo_repo.get(name).manifest
    naive, seasonal = m.baselines["naive"], m.baselines["seasonal-naive"]
    assert m.metrics["mae"] < 0.9 * naive["value"]  # measured 19.0-19.7 against 23.9
    assert seasonal["metric"] == "mae" and seasonal["value"] > 0
    card = (zoo_repo.get(name).path / "card.md").read_text()
    assert "- **naive** (every future month equals the last one seen): mae 23." in card
    assert "**beats** it" in card
    assert [i.name for i in m.inputs] == ["history"] and m.inputs[0].shape == (-1, -1)


def test_text_models_declare_their_tokenizer_and_say_how_int8_fares(zoo_repo) -> None:
    for name, length in (("text-minilm", 256), ("news-minilm", 128)):
        model = zoo_repo.get(name)
        m = model.manifest
        assert m.tokenizer is not None and m.tokenizer["max_length"] == length
        assert (model.path / "tokenizer.json").stat().st_size == m.files["tokenizer.json"].bytes
        assert [i.name for i in m.inputs] == ["input_ids", "attention_mask"]
        assert all(i.shape == (-1, -1) and i.datatype == "INT64" for i in m.inputs)
        assert m.variants["int8-dynamic"].details["compression"]["weights"] == "int8, per channel"
    encoder = zoo_repo.get("text-minilm").manifest
    assert encoder.outputs[0].shape == (-1, 384)
    int8 = encoder.variants["int8-dynamic"].details["measurement"]["metrics"]
    assert int8["cosine_to_fp32"] >= 0.98 and "probe_accuracy" in int8
    news = zoo_repo.get("news-minilm")
    assert news.manifest.labels[:2] == ["alt.atheism", "comp.graphics"]
    assert "tfidf-logistic" in news.manifest.baselines
    assert "Baselines on the same split" in (news.path / "card.md").read_text()


def test_unchanged_rebuild_does_nothing_and_force_adds_an_identical_version(zoo_copy) -> None:
    outcomes = build(zoo_copy, only=["wine-decision-tree", "digits-logreg"], options=zoo_options())
    assert [(o.name, o.status, o.version) for o in outcomes] == [
        ("wine-decision-tree", "unchanged", 1),
        ("digits-logreg", "unchanged", 1),
    ]
    outcomes = build(
        zoo_copy, only=["wine-decision-tree", "digits-logreg"], force=True, options=zoo_options()
    )
    assert [(o.status, o.version) for o in outcomes] == [("built", 2), ("built", 2)]
    for name in ("wine-decision-tree", "digits-logreg"):  # deterministic for a given seed
        v1, v2 = zoo_copy.get(name, 1), zoo_copy.get(name, 2)
        assert v1.manifest.files["model.onnx"] == v2.manifest.files["model.onnx"]
        assert v1.manifest.metrics == v2.manifest.metrics


def test_a_corrupt_model_is_rebuilt_as_a_new_version(zoo_copy) -> None:
    path = zoo_copy.get("iris-knn").variant_path()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(IntegrityError):
        zoo_copy.get("iris-knn").verify()
    (outcome,) = build(zoo_copy, only=["iris-knn"], options=zoo_options())
    assert (outcome.status, outcome.version) == ("built", 2)
    zoo_copy.get("iris-knn").verify()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_list_shows_the_zoo_with_metrics(zoo_repo: ModelRepository) -> None:
    out = _cli("list", "--repo", str(zoo_repo.root))
    assert out.returncode == 0, out.stderr
    for name in ZOO:
        assert name in out.stdout
    assert "accuracy=0.9" in out.stdout and "rmse=" in out.stdout
    assert "pixels FP32[-1, 1, 8, 8]" in out.stdout


def test_cli_unknown_model_is_refused_before_any_work(tmp_path: Path) -> None:
    out = _cli("build", "--repo", str(tmp_path / "r"), "--only", "digits-rnn")
    assert out.returncode == 2
    assert "model 'digits-rnn' is not in the zoo" in out.stderr
    assert not (tmp_path / "r").exists()


def test_cli_verify_names_the_corrupt_file_and_passes_the_rest(zoo_copy) -> None:
    bad = zoo_copy.get("digits-pca").variant_path()
    bad.write_bytes(b"\x00" * 10)
    out = _cli("verify", "--repo", str(zoo_copy.root))
    assert out.returncode == 1
    assert f"FAIL digits-pca: {bad}" in " ".join(out.stderr.split())
    assert "ok   digits-cnn v1" in out.stdout
    listing = _cli("list", "--repo", str(zoo_copy.root))  # the listing still works
    assert listing.returncode == 0 and "digits-cnn" in listing.stdout


def test_cli_verify_reports_a_model_onnxruntime_cannot_load(tiny_repo: ModelRepository) -> None:
    """A file whose hash matches but that is not a model: onnxruntime's error is named."""
    from tests.conftest import publish_identity

    model = publish_identity(tiny_repo, "broken")
    staging = tiny_repo.staging_dir("broken")
    (staging / "model.onnx").write_bytes(b"not an onnx file")
    manifest = model.manifest
    tiny_repo.publish(staging, manifest)
    out = _cli("verify", "--repo", str(tiny_repo.root))
    assert out.returncode == 1
    assert "FAIL broken: onnxruntime cannot load it" in out.stderr
    assert "ok   alpha v1" in out.stdout

"""Batch jobs in-process: predictions equal onnxruntime's, interrupted jobs resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from service.batch import Interrupted, JobConfig, SetupError, run_job
from service.batch.engines import (
    CANDIDATE_BATCH_SIZES,
    LocalEngine,
    RowsRejected,
    calibrate_batch_size,
    run_batches,
)
from service.batch.errors import JobFailed
from service.batch.model import from_repository
from service.core.repository import ModelRepository
from service.core.runtime import RuntimeOptions
from tests.batch_models import publish_classifier, reference_outputs

ROWS = 50


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "models")
    publish_classifier(repo, "clf", row_shape=(6,), classes=4)
    return repo


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """50 rows of 6 features with an id; rows 7, 23 and 41 are bad."""
    x = np.random.default_rng(5).standard_normal((ROWS, 6))
    lines = ["key," + ",".join(f"f{j}" for j in range(6))]
    for i, row in enumerate(x):
        values = [repr(float(v)) for v in row]
        if i == 7:
            values[2] = "oops"
        if i == 23:
            values = values[:4]
        if i == 41:
            values[5] = "inf"
        lines.append(f"k{i}," + ",".join(values))
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def job(repo: ModelRepository, source: Path, target: Path, **kw) -> JobConfig:
    kw.setdefault("chunk_rows", 8)
    kw.setdefault("batch_size", 3)
    kw.setdefault("max_error_rate", 0.1)
    kw.setdefault("id_column", "key")
    kw.setdefault("progress", False)
    return JobConfig(model="clf", input=source, output=target, repo=repo.root, **kw)


def test_predictions_equal_onnxruntime_run_directly(repo, source, tmp_path):
    target = tmp_path / "out.parquet"
    summary = run_job(job(repo, source, target))
    out = pq.read_table(target)
    good = [i for i in range(ROWS) if i not in (7, 23, 41)]
    assert out["row"].to_pylist() == good
    assert out["key"].to_pylist() == [f"k{i}" for i in good]
    lines = source.read_text().splitlines()[1:]
    rows = np.array([[float(v) for v in lines[i].split(",")[1:]] for i in good], np.float32)
    expected = reference_outputs(repo.get("clf"), rows)
    np.testing.assert_array_equal(out["label"].to_numpy(), expected["label"])
    np.testing.assert_array_equal(
        np.array(out["probabilities"].to_pylist(), np.float32), expected["probabilities"]
    )
    assert (summary.rows, summary.predicted, summary.errors, summary.chunks) == (ROWS, 47, 3, 7)


def test_an_interrupted_job_resumes_without_losing_or_repeating_a_row(
    repo, source, tmp_path, monkeypatch
):
    whole = tmp_path / "whole.parquet"
    run_job(job(repo, source, whole))

    target = tmp_path / "out.parquet"
    real = LocalEngine.predict

    def stop_at_chunk_4(self, chunk):
        if chunk.index == 4:
            raise KeyboardInterrupt
        return real(self, chunk)

    monkeypatch.setattr(LocalEngine, "predict", stop_at_chunk_4)
    with pytest.raises(Interrupted) as info:
        run_job(job(repo, source, target))
    assert info.value.exit_code == 130
    assert "32 of 50 rows committed (4 of 7 chunks)" in info.value.message
    assert "--resume" in info.value.message
    work = tmp_path / "out.parquet.partial"
    journal = json.loads((work / "journal.json").read_text())
    assert journal["next_chunk"] == 4 and journal["rows"] == 32 and journal["errors"] == 2
    assert not target.exists()

    # what a kill between writing and committing leaves behind: a later part, more errors
    (work / "part-000004.arrow").write_bytes(b"half a part")
    with open(work / "errors.jsonl", "ab") as fh:
        fh.write(b'{"row": 33, "id": null, "reason": "uncommitted"}\n')

    monkeypatch.setattr(LocalEngine, "predict", real)
    with pytest.raises(SetupError, match="holds an unfinished job .* pass --resume"):
        run_job(job(repo, source, target))
    summary = run_job(job(repo, source, target, resume=True))
    assert summary.resumed_from_chunk == 4 and summary.rows_this_run == 18
    assert pq.read_table(target).equals(pq.read_table(whole))
    assert (tmp_path / "out.parquet.errors.jsonl").read_text() == (
        tmp_path / "whole.parquet.errors.jsonl"
    ).read_text()
    assert [
        e["row"]
        for e in map(
            orjson.loads, (tmp_path / "out.parquet.errors.jsonl").read_bytes().splitlines()
        )
    ] == [7, 23, 41]
    assert not work.exists()


def test_resume_refuses_a_changed_input_and_finishes_a_done_job(
    repo, source, tmp_path, monkeypatch
):
    target = tmp_path / "out.csv"
    real = LocalEngine.predict

    def stop(self, chunk):
        if chunk.index == 2:
            raise KeyboardInterrupt
        return real(self, chunk)

    monkeypatch.setattr(LocalEngine, "predict", stop)
    with pytest.raises(Interrupted):
        run_job(job(repo, source, target))
    monkeypatch.setattr(LocalEngine, "predict", real)
    with pytest.raises(
        SetupError, match="cannot resume .*the job changed \\(chunk_rows: was 8, now 9\\)"
    ):
        run_job(job(repo, source, target, resume=True, chunk_rows=9))
    with open(source, "a") as fh:
        fh.write("k50,1,2,3,4,5,6\n")
    with pytest.raises(SetupError, match="cannot resume .*the job changed \\(input: was"):
        run_job(job(repo, source, target, resume=True))
    summary = run_job(job(repo, source, target, overwrite=True))
    assert summary.rows == 51
    from service.batch.errors import AlreadyComplete

    with pytest.raises(AlreadyComplete, match="is complete; nothing to resume") as info:
        run_job(job(repo, source, target, resume=True))
    assert info.value.exit_code == 0


def test_resume_keeps_the_model_version_the_job_started_with(repo, source, tmp_path, monkeypatch):
    target = tmp_path / "out.jsonl"
    real = LocalEngine.predict

    def stop(self, chunk):
        if chunk.index == 1:
            raise KeyboardInterrupt
        return real(self, chunk)

    monkeypatch.setattr(LocalEngine, "predict", stop)
    with pytest.raises(Interrupted):
        run_job(job(repo, source, target))
    monkeypatch.setattr(LocalEngine, "predict", real)
    publish_classifier(repo, "clf", row_shape=(6,), classes=4)  # version 2 appears meanwhile
    run_job(job(repo, source, target, resume=True))
    fresh = tmp_path / "v1.jsonl"
    run_job(job(repo, source, fresh, version=1))
    assert target.read_bytes() == fresh.read_bytes()


def test_refused_rows_are_found_by_splitting_the_batch() -> None:
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    calls = []

    def call(batch):
        calls.append(len(batch))
        if (batch == 3).any() or (batch == 8).any():
            raise RowsRejected(f"row {int(batch[0, 0])} refused")
        return [batch * 2]

    outputs, failed = run_batches(call, x, 4, ["y"])
    assert failed == {3: "row 3 refused", 8: "row 8 refused"}
    np.testing.assert_array_equal(outputs["y"].ravel(), [0, 2, 4, 8, 10, 12, 14, 18])

    def too_large(batch):
        raise RowsRejected("413 too large", per_row=False)

    with pytest.raises(JobFailed, match="413 too large"):
        run_batches(too_large, x, 4, ["y"])


def test_the_best_batch_size_is_measured_among_the_candidates(repo):
    model = from_repository(repo, "clf")
    engine = LocalEngine(model, RuntimeOptions(providers=["CPUExecutionProvider"]))
    engine.open()
    assert engine.batch_size in CANDIDATE_BATCH_SIZES
    assert engine.session is not None
    assert calibrate_batch_size(engine.session, model, (5, 7), seconds_each=0.01) in (5, 7)


def test_progress_bar_and_summary_go_to_the_stream(repo, source, tmp_path):
    import io

    stream = io.StringIO()
    summary = run_job(job(repo, source, tmp_path / "out.csv", progress=True), stream=stream)
    text = stream.getvalue()
    assert "clf: 100%" in text and "50.0/50.0" in text and "rows/s" in text and "errors=3" in text
    assert "clf:1:fp32 on the local engine: batch 3, 7 chunks of 8 rows" in text
    assert "rows        50 (47 predicted, 3 errors = 6.0000%, limit 10.00%)" in text
    assert f"output      {tmp_path / 'out.csv'}" in text
    assert summary.error_share == pytest.approx(0.06)


def test_the_ray_engine_without_ray_installed_says_how_to_get_it(
    repo, source, tmp_path, monkeypatch
):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now fails
    monkeypatch.delitem(sys.modules, "service.batch.engines.ray", raising=False)
    with pytest.raises(
        SetupError, match=r"--engine ray needs Ray Data .*pip install 'slimserve\[batch-ray\]'"
    ):
        run_job(job(repo, source, tmp_path / "out.csv", engine="ray"))

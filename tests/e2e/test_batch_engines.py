"""The http engine against the real server, and the ray engine on a local Ray: both give the
local engine's output (same rows, same errors, same predictions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.batch import JobConfig, run_job
from service.core.repository import ModelRepository
from tests.batch_models import publish_classifier
from tests.e2e.conftest import start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ROWS = 3_000


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRepository, Path, Path]:
    """A classifier with class names, a JSON Lines input with bad rows, the local engine's output."""
    folder = tmp_path_factory.mktemp("engines")
    repo = ModelRepository(folder / "models")
    publish_classifier(repo, "clf", row_shape=(8,), classes=5, labels=list("abcde"))
    x = np.random.default_rng(2).standard_normal((ROWS, 8)).round(3)
    lines = []
    for i, row in enumerate(x.tolist()):
        if i % 401 == 3:
            lines.append(json.dumps({"id": f"s{i}", "pixels": row[:7]}))  # one value short
        elif i % 401 == 9:
            lines.append("{broken")
        else:
            lines.append(json.dumps({"id": f"s{i}", "pixels": row}))
    source = folder / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    local = folder / "local.parquet"
    run_job(_config(repo, source, local))
    return repo, source, local


def _config(repo: ModelRepository, source: Path, target: Path, **kw) -> JobConfig:
    return JobConfig(
        model="clf", input=source, output=target, repo=repo.root, chunk_rows=500,
        batch_size=64, max_error_rate=0.05, progress=False, **kw,
    )  # fmt: skip


def _assert_same(target: Path, local: Path) -> None:
    got, expected = pq.read_table(target), pq.read_table(local)
    assert got.schema == expected.schema
    assert got.column_names == ["row", "id", "label", "probabilities", "label_name"]
    for name in ("row", "id", "label", "label_name"):
        assert got[name].to_pylist() == expected[name].to_pylist(), name
    np.testing.assert_allclose(
        np.array(got["probabilities"].to_pylist()),
        np.array(expected["probabilities"].to_pylist()),
        rtol=1e-6,
        atol=1e-7,
    )
    errors = target.with_name(target.name + ".errors.jsonl").read_text()
    assert errors == local.with_name(local.name + ".errors.jsonl").read_text()
    assert len(errors.splitlines()) == 2 * len(range(3, ROWS, 401))


def test_http_engine_against_the_real_server_equals_the_local_engine(work, tmp_path):
    repo, source, local = work
    server = start_server(repo.root, tmp_path, max_batch_size="32")
    try:
        target = tmp_path / "http.parquet"
        done = subprocess.run(
            [
                sys.executable, "-m", "service.batch", "--model", "clf", "--engine", "http",
                "--url", server.url, "--repo", str(repo.root), "--input", str(source),
                "--output", str(target), "--chunk-rows", "500", "--batch-size", "64",
                "--concurrency", "4", "--max-error-rate", "0.05", "--no-progress",
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "on the http engine" in done.stderr
        _assert_same(target, local)
        metrics = __import__("httpx").get(f"{server.url}/metrics").text
        assert 'slimserve_requests_total{model="clf"' in metrics
    finally:
        stop_server(server.process)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_on_a_local_ray_equals_the_local_engine(work, tmp_path, local_ray):
    repo, source, local = work
    target = tmp_path / "ray.parquet"
    summary = run_job(_config(repo, source, target, engine="ray", ray_actors=2))
    assert summary.engine == "ray" and summary.chunks == 6
    _assert_same(target, local)


def test_a_job_interrupted_locally_resumes_on_ray(work, tmp_path, local_ray, monkeypatch):
    from service.batch import Interrupted
    from service.batch.engines import LocalEngine

    repo, source, local = work
    target = tmp_path / "mixed.parquet"
    real = LocalEngine.predict

    def stop_at_chunk_3(self, chunk):
        if chunk.index == 3:
            raise KeyboardInterrupt
        return real(self, chunk)

    monkeypatch.setattr(LocalEngine, "predict", stop_at_chunk_3)
    with pytest.raises(Interrupted):
        run_job(_config(repo, source, target))
    monkeypatch.setattr(LocalEngine, "predict", real)
    summary = run_job(_config(repo, source, target, engine="ray", resume=True))
    assert summary.resumed_from_chunk == 3 and summary.rows_this_run == ROWS - 1_500
    _assert_same(target, local)

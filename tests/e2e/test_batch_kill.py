"""A batch job killed mid-run (SIGKILL, SIGTERM) resumes to exactly the uninterrupted output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.core.repository import ModelRepository
from tests.batch_models import publish_classifier

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ROWS, CHUNK = 200_000, 2_000


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A classifier, a CSV of 200,000 rows with a bad row every 9,973, and the output of an
    uninterrupted run to compare with."""
    work = tmp_path_factory.mktemp("kill")
    repo = ModelRepository(work / "models")
    publish_classifier(repo, "clf", row_shape=(4,), classes=3)
    x = np.random.default_rng(11).integers(0, 1000, (ROWS, 4)) / 8
    lines = ["id,a,b,c,d"]
    for i, row in enumerate(x.tolist()):
        fields = [f"{v:g}" for v in row]
        if i % 9973 == 5:
            fields[1] = "bad"
        lines.append(f"{i}," + ",".join(fields))
    source = work / "in.csv"
    source.write_text("\n".join(lines) + "\n")
    whole = work / "whole.parquet"
    done = _run(repo.root, source, whole)
    assert done.returncode == 0, done.stderr
    return repo.root, source, whole


def _command(repo: Path, source: Path, target: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "service.batch", "--model", "clf", "--repo", str(repo),
        "--input", str(source), "--output", str(target), "--chunk-rows", str(CHUNK),
        "--batch-size", "500", "--no-progress", *extra,
    ]  # fmt: skip


def _run(repo: Path, source: Path, target: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(repo, source, target, *extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _start_and_stop(repo: Path, source: Path, target: Path, signum: int) -> tuple[int, str, int]:
    """Start the job, send ``signum`` once a few chunks are committed; (exit code, stderr,
    chunks committed)."""
    process = subprocess.Popen(
        _command(repo, source, target),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = target.with_name(target.name + ".partial") / "journal.json"
    deadline = time.monotonic() + 60
    committed = 0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            committed = json.loads(journal.read_text())["next_chunk"]
        except (FileNotFoundError, ValueError):
            committed = 0
        if committed >= 5:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the job ended before it could be interrupted"
    os.kill(process.pid, signum)
    _, err = process.communicate(timeout=60)
    return process.returncode, err, committed


def _same_as_whole(target: Path, whole: Path) -> None:
    resumed, expected = pq.read_table(target), pq.read_table(whole)
    assert resumed.num_rows == expected.num_rows == ROWS - len(range(5, ROWS, 9973))
    assert resumed.equals(expected)  # row by row, every column
    errors = target.with_name(target.name + ".errors.jsonl").read_text()
    assert errors == whole.with_name(whole.name + ".errors.jsonl").read_text()
    assert [json.loads(line)["row"] for line in errors.splitlines()] == list(range(5, ROWS, 9973))


def test_sigkill_then_resume_equals_an_uninterrupted_run(setup, tmp_path):
    repo, source, whole = setup
    target = tmp_path / "out.parquet"
    code, _, committed = _start_and_stop(repo, source, target, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not target.exists()
    journal = json.loads((tmp_path / "out.parquet.partial" / "journal.json").read_text())
    assert committed <= journal["next_chunk"] < ROWS // CHUNK
    done = _run(repo, source, target, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"resumed at chunk {journal['next_chunk']}" in done.stderr
    _same_as_whole(target, whole)
    assert not (tmp_path / "out.parquet.partial").exists()


def test_sigterm_stops_cleanly_and_resumes(setup, tmp_path):
    repo, source, whole = setup
    target = tmp_path / "out.parquet"
    code, err, _ = _start_and_stop(repo, source, target, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    assert "error: terminated (SIGTERM): " in err and "run the same command with --resume" in err
    assert "Traceback" not in err
    done = _run(repo, source, target, "--resume")
    assert done.returncode == 0, done.stderr
    _same_as_whole(target, whole)

"""The Locust scenarios run headless and bounded against the real server, and report failures."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def run_locust(server, out: Path, scenario: str, *extra: str) -> dict[str, dict[str, str]]:
    locust = Path(sys.executable).with_name("locust")
    cmd = [str(locust), "-f", "loadtest/locustfile.py", "--headless", "-u", "4", "-r", "4",
           "-t", "4s", "-H", server.url, "--csv", str(out / "locust"), "--html",
           str(out / "report.html"), "--only-summary", *extra, scenario]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    with open(out / "locust_stats.csv") as fh:
        rows = {r["Name"]: r for r in csv.DictReader(fh)}
    assert (out / "report.html").stat().st_size > 0
    total = rows["Aggregated"]
    # On a count of zero show what locust and the server said, not just "0 > 10".
    assert int(total["Request Count"]) > 0, (
        f"locust made no request (exit {run.returncode}):\n{run.stderr[-3000:]}\n"
        f"server log:\n{server.log_text()[-3000:]}"
    )
    return rows


@pytest.mark.parametrize("scenario", ["V2JsonUser", "V2BinaryUser", "FriendlyUser", "MixedUser"])
def test_scenario_runs_without_failures(server, tmp_path: Path, scenario: str) -> None:
    rows = run_locust(
        server, tmp_path, scenario, "--models", "digits-cnn,diabetes-linear,digits-pca"
    )
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 10
    assert int(total["Failure Count"]) == 0


def test_failures_are_reported(server, tmp_path: Path) -> None:
    rows = run_locust(server, tmp_path, "MixedUser", "--models", "iris-knn")  # fails to load
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) == int(total["Request Count"]) > 0


def test_the_grpc_scenario_runs_without_failures(server, tmp_path: Path) -> None:
    rows = run_locust(server, tmp_path, "GrpcUser", "--grpc-target", server.grpc_target)
    assert int(rows["Aggregated"]["Request Count"]) > 10
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert {"grpc infer digits-cnn b1", "grpc infer digits-cnn b32"} <= set(rows)

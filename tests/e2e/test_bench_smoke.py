"""``python -m loadtest.serving`` end to end, with tiny cells: it runs, writes well-formed
results, and leaves no server behind. Nothing here is about speed (that is ``make bench``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("slimserve", "fastapi", "bentoml-plain", "bentoml-batched")
CELLS = (
    {
        (server, f"{model}/json/b1/c{c}")
        for server in SERVERS
        for model in ("digits-cnn", "mlp-2048")
        for c in (1, 4)
    }
    | {("slimserve", "mlp-2048/binary/b32/c8")}
    | {
        ("slimserve", f"{v}/json/b1/c4")
        for v in (
            "digits-cnn@int8-static",
            "digits-cnn@pruned",
            "mlp-2048@int8-dynamic",
            "mlp-2048@int8-static",
        )
    }
)
TARGETS = {
    "digits-cnn",
    "mlp-2048",
    "digits-cnn@int8-static",
    "digits-cnn@pruned",
    "mlp-2048@int8-dynamic",
    "mlp-2048@int8-static",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == create_time and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "loadtest.serving", "--quick", "--skip-startup"]
    cmd += ["--cell-seconds", "0.3", "--warmup-seconds", "0.1", "--concurrency", "1,4"]
    cmd += ["--out", str(out), "--servers", ",".join(SERVERS[1:])]  # the peers: make bench
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_every_cell_is_measured_and_its_errors_add_up(bench) -> None:
    _, doc = bench
    assert {(c["server"], c["id"]) for c in doc["cells"]} == CELLS
    for cell in doc["cells"]:
        m = cell["median"]
        assert m["req_per_s"] > 0, cell["id"]
        assert m["ok"] > 0 and m["p50_ms"] > 0 and m["p99_ms"] >= m["p50_ms"], cell["id"]
        assert all(isinstance(v, int) and v > 0 for v in m["errors"].values()), m["errors"]
        assert m["requests"] == m["ok"] + sum(m["errors"].values()), cell["id"]
        assert m["server_cpu_us_per_request"] > 0, cell["id"]
        per_sample = m["server_cpu_us_per_request"] / cell["samples_per_request"]
        assert abs(m["server_cpu_us_per_sample"] - per_sample) < 1e-6 * per_sample
        for run in cell["runs"]:
            assert run["requests"] == run["ok"] + sum(run["errors"].values())
            assert "200" not in run["errors"]
    assert set(doc["ceilings"]) == TARGETS
    for per_batch in doc["ceilings"].values():
        assert set(per_batch) == {"1", "32"}
        assert all(v["samples_per_s"] > 0 for v in per_batch.values())
    served = doc["headline"]["served_vs_ceiling"]
    assert set(served) == TARGETS and all(r["percent_of_b32"] > 0 for r in served.values())
    assert doc["startup"] == {"skipped": "--skip-startup"}
    assert doc["headline"]["binary_percent_of_ceiling"] > 0
    assert doc["headline"]["in_process_cpu_us_per_sample_b32"] > 0
    for per_batch in doc["ceilings"].values():
        assert all(v["cpu_us_per_sample"] > 0 for v in per_batch.values())
    assert doc["headline"]["concurrency"] == 4
    for model in ("digits-cnn", "mlp-2048"):
        assert set(doc["headline"]["req_per_s_ratio"][model]) == set(SERVERS[1:])
        assert set(doc["headline"]["server_cpu_us_per_request"][model]) == set(SERVERS)
    assert doc["headline"]["cnn_p50_ratio_to_fastapi_at_lowest_concurrency"] > 0
    assert doc["meta"]["servers"] == list(SERVERS)


def test_markdown_report_has_the_table_and_headline(bench) -> None:
    out, doc = bench
    text = (out / "results.md").read_text()
    assert "| cell | server | req/s |" in text
    assert "## Headline" in text
    assert text.count("| slimserve |") == 9 and text.count("| fastapi |") == 4
    assert "| digits-cnn@pruned |" in text  # the served / in-process table
    assert text.count("| bentoml-plain |") == 4 and text.count("| bentoml-batched |") == 4
    assert "/ bentoml-plain **" in text and "/ bentoml-batched **" in text
    assert "server CPU us/request" in text and "server CPU us per request at c=4" in text
    assert "slimserve / FastAPI **" in text


def test_both_plots_are_png_files_next_to_the_results(bench) -> None:
    out, doc = bench
    assert doc["plots"] == ["throughput.png", "latency.png"]
    for name in doc["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 1000, name


def test_no_server_is_left_behind(bench) -> None:
    _, doc = bench
    kinds = [s["kind"] for s in doc["servers"]]
    assert sorted(kinds) == sorted(["slimserve", *[k for k in SERVERS[1:] for _ in range(2)]])
    for server in doc["servers"]:
        assert server["left_behind"] == []
        assert server["pids"], server
        assert not [p for p in server["pids"] if _alive(p["pid"], p["create_time"])], server
        assert not _listening(server["port"]), server


def test_the_grpc_bench_measures_both_protocols_and_the_ceilings(tmp_path: Path) -> None:
    """``make bench-grpc`` with tiny cells: every (HTTP binary, gRPC) pair answered without
    errors, the in-process ceilings at batch 1 and 32, and the headline in the report."""
    from loadtest.serving.protocols import cells

    cmd = [sys.executable, "-m", "loadtest.serving.protocols", "--repeats", "1"]
    cmd += ["--cell-seconds", "0.3", "--warmup-seconds", "0.1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    ids = {cell.id for pair in cells() for cell in pair}
    assert set(doc["cells"]) == ids
    for cell_id, measured in doc["cells"].items():
        assert measured["ok"] > 0 and not measured["errors"], (cell_id, measured)
    for model in ("digits-cnn", "mlp-2048"):
        assert set(doc["ceilings"][model]) == {"1", "32"}
        assert all(c["samples_per_s"] > 0 for c in doc["ceilings"][model].values())
    report = (tmp_path / "results.md").read_text()
    assert "best share of in-process at batch 32" in report and "| gRPC |" in report


def test_the_ray_bench_measures_slimserve_alone_and_on_ray_and_stops_ray(tmp_path: Path) -> None:
    """``make bench-ray`` with tiny cells: every cell on each server answered without errors,
    the headline in the report, and no Ray process left once it is done."""
    pytest.importorskip("ray.serve")
    from loadtest.serving.rayserve import SERVERS as RAY_SERVERS
    from loadtest.serving.rayserve import cells

    before = _raylets()
    cmd = [sys.executable, "-m", "loadtest.serving.rayserve", "--repeats", "1"]
    cmd += ["--cell-seconds", "0.3", "--warmup-seconds", "0.1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["cells"]) == {f"{s}|{c.id}" for s in RAY_SERVERS for c in cells()}
    for cell_id, measured in doc["cells"].items():
        assert measured["ok"] > 0 and not measured["errors"], (cell_id, measured)
    report = (tmp_path / "results.md").read_text()
    assert "Ray Serve adds" in report and "| ray-2-replicas |" in report
    deadline = time.monotonic() + 30  # Ray's own shutdown may still be finishing
    while (left := _raylets() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"a raylet of the bench is still running: {left}"


def _raylets() -> set[int]:
    """Running raylets (a zombie waiting for its reaper is not running)."""
    found = set()
    for p in psutil.process_iter(["name", "status"]):
        if "raylet" in (p.info["name"] or "") and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.add(p.pid)
    return found

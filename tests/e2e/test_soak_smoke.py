"""make soak in miniature: the harness runs, the mix reaches the server, and the report holds
the figures the README quotes (RSS growth, descriptors, no 5xx but 503)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_short_soak_reports_memory_descriptors_and_answers(tmp_path) -> None:
    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "loadtest.serving.soak", "--minutes", "0.2"]
    cmd += ["--warmup-minutes", "0.05", "--clients", "8", "--sample-s", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    statuses = doc["statuses"]
    assert doc["requests"] > 100 and doc["server_errors"] == 0
    assert statuses.get("v2-json 200", 0) > 0 and statuses.get("bad-json 400", 0) > 0
    assert statuses.get("unknown-path 404", 0) > 0
    assert doc["fds"][1] < 200 and doc["rss_end_mib"] > 0 and len(doc["samples"]) >= 3
    assert "RSS growth after warm-up" in (out / "results.md").read_text()
    assert not doc["server_left_behind"]

"""The server against its own published OpenAPI document, with schemathesis (its CLI, as a
user would run it): every operation, 50 generated requests each in every phase (examples,
coverage, fuzzing, stateful), valid and invalid data, every check. No 5xx, every answer of
the status, content type and schema the document gives, 405 for undeclared methods, invalid
data refused. The one adjustment is written down in ``schemathesis.toml`` beside this file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_the_server_keeps_its_published_contract(server) -> None:
    cli = Path(sys.executable).with_name("schemathesis")
    cmd = [str(cli), "--config-file", str(CONFIG), "run", f"{server.url}/docs.json"]
    cmd += ["--checks", "all", "--mode", "all", "--max-examples", "50", "--seed", "1"]
    cmd += ["--request-timeout", "30", "--no-color"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert "Selected: 24/24" in report and " passed" in report  # with /embed, /forecast
    assert "Traceback" not in server.log_text()

"""``python -m service.rayserve`` (what ``make serve-ray`` runs): a local Ray, the application
on the port asked for, and SIGTERM stopping both; settings that make no application refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil
import pytest

pytest.importorskip("ray.serve")

import tritonclient.http as triton  # noqa: E402

from service.core.repository import ModelRepository  # noqa: E402
from tests.e2e.conftest import ROOT, _free_port  # noqa: E402

pytestmark = pytest.mark.slow


def _env(repo: ModelRepository, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["SLIMSERVE_MODEL_REPOSITORY"] = str(repo.root)
    env.update({f"SLIMSERVE_{k.upper()}": v for k, v in settings.items()})
    return env


def test_settings_that_make_no_application_exit_2_with_the_reason(tiny_repo):
    env = _env(tiny_repo, ray_groups='{"ghosts": ["ghost-*"]}')
    done = subprocess.run(
        [sys.executable, "-m", "service.rayserve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "SLIMSERVE_RAY_GROUPS: group 'ghosts' (ghost-*) serves no model" in done.stderr
    assert "alpha, beta" in done.stderr


def test_serve_ray_starts_a_local_ray_serves_v2_and_sigterm_stops_everything(tiny_repo, tmp_path):
    port = _free_port()
    env = _env(tiny_repo, ray_num_cpus="2", ray_port=str(port), ray_replica_cpus="0.5")
    log = tmp_path / "serve-ray.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "service.rayserve"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not ready in 180 s:\n{log.read_text()}"
            time.sleep(1)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        tensor = triton.InferInput("x", [2, 4], "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("beta", [tensor]).as_numpy("y"), x)
        ray_processes = psutil.Process(process.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in ray_processes)

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0, log.read_text()
        gone, alive = psutil.wait_procs(ray_processes, timeout=30)
        assert not alive, [p.cmdline()[:2] for p in alive]
        assert "stopping slimserve" in log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

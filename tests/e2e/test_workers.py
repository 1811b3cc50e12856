"""Two BentoML workers: every request is counted once on /metrics (multiprocess mode)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.core.repository import ModelRepository
from tests.e2e.conftest import start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_metrics_add_up_across_two_workers(zoo_repo: ModelRepository, tmp_path) -> None:
    root = tmp_path / "models"
    shutil.copytree(zoo_repo.root / "wine-decision-tree", root / "wine-decision-tree")
    server = start_server(root, tmp_path, workers="2")
    try:
        body = {
            "inputs": [
                {
                    "name": "features",
                    "shape": [1, 13],
                    "datatype": "FP32",
                    "data": [13.2, 1.8, 2.1, 11.2, 100, 2.6, 2.8, 0.26, 1.3, 4.4, 1.0, 3.4, 1050],
                }
            ]
        }

        def call(_: int) -> int:  # a new connection each time, so both workers take some
            with httpx.Client() as c:
                return c.post(
                    f"{server.url}/v2/models/wine-decision-tree/infer", json=body
                ).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(call, range(60))) == {200}
        text = httpx.get(f"{server.url}/metrics").text
        success = [
            line
            for line in text.splitlines()
            if line.startswith("slimserve_requests_total{")
            and 'outcome="success"' in line
            and 'protocol="http"' in line
        ]
        assert len(success) == 1, success  # one series, summed over the workers
        assert float(success[0].rsplit(" ", 1)[1]) == 60
        info = [line for line in text.splitlines() if line.startswith("slimserve_model_info{")]
        assert len(info) == 1 and info[0].endswith(" 1.0")
        assert server.log_text().count("1 of 1 models ready") == 2  # each worker loaded it
    finally:
        stop_server(server.process)

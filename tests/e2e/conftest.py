"""Starts the real server (``python -m service`` -> ``bentoml serve``) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.core.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[2]
E2E_MODELS = ("digits-cnn", "digits-gan", "diabetes-linear", "digits-pca")


@dataclass
class Server:
    url: str
    host: str
    port: int
    repo: ModelRepository
    log: Path
    process: subprocess.Popen
    grpc_port: int = 0  # 0: gRPC off

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo_root: Path, workdir: Path, **settings: str) -> Server:
    port = _free_port()
    log = workdir / "server.log"
    env = {
        **os.environ,
        "SLIMSERVE_MODEL_REPOSITORY": str(repo_root),
        "SLIMSERVE_HOST": "127.0.0.1",
        "SLIMSERVE_PORT": str(port),
        "SLIMSERVE_GRPC_PORT": str(_free_port()),  # never 8001: servers run side by side
        "BENTOML_HOME": str(workdir / "bentoml"),
        **{f"SLIMSERVE_{k.upper()}": v for k, v in settings.items()},
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                grpc_port = int(env["SLIMSERVE_GRPC_PORT"])
                repo = ModelRepository(repo_root)
                return Server(url, "127.0.0.1", port, repo, log, process, grpc_port)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(process)
    raise RuntimeError(f"server not ready within 90 s:\n{log.read_text()}")


def stop_server(process: subprocess.Popen) -> None:
    """Stop the whole process group (BentoML's supervisor and its workers)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def server(zoo_repo: ModelRepository, tmp_path_factory: pytest.TempPathFactory):
    """Four zoo models plus ``broken`` (a corrupt copy of iris-knn) behind a real server."""
    work = tmp_path_factory.mktemp("server")
    root = work / "models"
    for name in E2E_MODELS:
        shutil.copytree(zoo_repo.root / name, root / name)
    shutil.copytree(zoo_repo.root / "iris-knn", root / "iris-knn")
    onnx_file = root / "iris-knn" / "1" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:64])
    srv = start_server(root, work, max_body_bytes="2000000")
    yield srv
    stop_server(srv.process)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples in a ``/metrics`` page whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total

"""Peer servers: MLServer, KServe and PyTriton on the same ONNX files, each in its own venv.

A peer is another project's model server with a small adapter of ours around the same
onnxruntime session (``loadtest/baselines/mlserver_runtime.py``, ``kserve_server.py``,
``pytriton_server.py``), speaking the v2 protocol on 127.0.0.1. Their dependency pins clash with
the project's (MLServer wants FastAPI < 0.116, PyTriton numpy < 2), so each runs from a virtual
environment of its own under ``.venv-peers/<peer>``, made with ``python -m venv`` (the Python
that runs the benchmark) and pip by ``ensure_venv`` and reused while its pins are unchanged. The
servers import ``loadtest.baselines`` from this checkout (``PYTHONPATH``) and never ``service``
or anything of the project's venv.
``mlserver_peer``, ``kserve_peer`` and ``pytriton_peer`` return a ``ServerProcess`` not yet
started, like ``servers.fastapi_baseline``::

    server = mlserver_peer(repo, "digits-cnn", work, work / "mlserver.log").start()
    ...  # POST {server.url}/v2/models/digits-cnn/infer
    server.stop()
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loadtest.serving.servers import (
    KSERVE,
    MLSERVER,
    PYTRITON,
    ROOT,
    ServerProcess,
    free_port,
)
from service.core.repository import ModelRepository

__all__ = [
    "KSERVE",
    "MLSERVER",
    "PEERS",
    "PEER_BUILDERS",
    "PEER_PINS",
    "PEER_ROOT",
    "PYTRITON",
    "PeerInstallError",
    "ensure_venv",
    "installed",
    "kserve_peer",
    "mlserver_peer",
    "peer",
    "pytriton_peer",
]

PEERS = (MLSERVER, KSERVE, PYTRITON)
PEER_ROOT = ROOT / ".venv-peers"
_ORT, _NUMPY2 = "onnxruntime==1.32.0", "numpy==2.4.6"  # the project venv's
#: exact pins per peer: the server, the project's onnxruntime and numpy where the server allows
#: them, and the HTTP stack the server answers with (a change of any of these moves the numbers)
PEER_PINS: dict[str, list[str]] = {
    MLSERVER: [
        "mlserver==1.7.1",
        _ORT,
        _NUMPY2,
        "fastapi==0.115.14",  # mlserver 1.7.1 needs fastapi < 0.116
        "uvicorn==0.55.0",
        # uvloop >= 0.22 raises in asyncio.get_event_loop() without a loop, which kills every
        # MLServer 1.7.1 inference worker at start (SeldonIO/MLServer#2286, fix unreleased)
        "uvloop==0.21.0",
        "orjson==3.13.0",
    ],
    KSERVE: [
        "kserve==0.21.0",
        _ORT,
        _NUMPY2,
        "fastapi==0.165.0",
        "uvicorn==0.55.0",
        "uvloop==0.23.0",
        "httptools==0.9.0",
        "orjson==3.13.0",
    ],
    PYTRITON: [
        "nvidia-pytriton==0.7.0",  # ships tritonserver 2.51.0 (Triton runs on CPU without CUDA)
        _ORT,
        "numpy==1.26.4",  # nvidia-pytriton 0.7.0 needs numpy < 2
    ],
}
#: seconds from start to ready (measured here: about 2, 1 and 3.2 on 2 cores), for the
#: benchmark's time estimates; a venv's first ``ensure_venv`` adds 20-45 s
_STAMP = ".peer-pins"


class PeerInstallError(RuntimeError):
    """A peer's virtual environment could not be made or its pins not installed."""


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise PeerInstallError(f"{what} failed ({' '.join(cmd)}), exit {done.returncode}:\n{tail}")


def ensure_venv(peer: str, root: Path = PEER_ROOT) -> Path:
    """The python of ``root/<peer>``, a venv holding exactly ``PEER_PINS[peer]``.

    Made with ``<this Python> -m venv`` and pip on first use (about 30 s and 0.4-0.5 GB each); a
    stamp file holds the pins it was made with, so a later call returns at once, and a change
    of pins makes the venv anew. Raises ``PeerInstallError`` when the venv cannot be made."""
    if peer not in PEER_PINS:
        raise ValueError(f"unknown peer {peer!r}; peers: {', '.join(PEER_PINS)}")
    venv = root / peer
    python = venv / "bin" / "python"
    if installed(peer, root):
        return python
    shutil.rmtree(venv, ignore_errors=True)  # a stale or half-made one
    venv.parent.mkdir(parents=True, exist_ok=True)
    # the project's own Python (a venv made from a venv's python is based on its base)
    _run([sys.executable, "-m", "venv", str(venv)], f"making the {peer} venv")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    try:
        _run([*pip, *PEER_PINS[peer]], f"installing {peer}'s pins")
    except PeerInstallError:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    (venv / _STAMP).write_text(_pins_text(peer))
    return python


def _pins_text(peer: str) -> str:
    return "\n".join(PEER_PINS[peer]) + "\n"


def installed(peer: str, root: Path = PEER_ROOT) -> bool:
    """Whether ``root/<peer>`` holds a venv made with the current ``PEER_PINS[peer]``."""
    venv = root / peer
    stamp = venv / _STAMP
    return (
        (venv / "bin" / "python").exists()
        and stamp.exists()
        and stamp.read_text() == _pins_text(peer)
    )


def _peer_env(python: Path) -> dict[str, str]:
    """The environment of a peer: its venv first on PATH, this checkout on PYTHONPATH (for
    ``loadtest.baselines``), nothing of the project's venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP")
    }
    venv = python.parent.parent
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def mlserver_peer(
    repo: Path, model: str, work: Path, log: Path, parallel_workers: int = 1
) -> ServerProcess:
    """``mlserver start`` of a folder under ``work`` holding ``settings.json`` and
    ``<model>/model-settings.json`` for ``loadtest.baselines.mlserver_runtime.OnnxRuntime``.

    MLServer's defaults, except what the other servers do too: 127.0.0.1, no access log
    (``debug: false``). One inference worker process (MLServer's default ``parallel_workers``;
    0 runs inference in the HTTP process), no adaptive batching (MLServer's default), its
    Prometheus metrics server and gzip middleware on (its defaults), gRPC and metrics on free
    ports of their own (MLServer cannot turn gRPC off)."""
    python = ensure_venv(MLSERVER)
    path = ModelRepository(repo).get(model).variant_path()
    http, grpc, metrics = _distinct_ports(3)
    folder = work / f"mlserver-{model}-{time.time_ns()}"
    folder.mkdir(parents=True)
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": http,
        "grpc_port": grpc,
        "metrics_port": metrics,
        "parallel_workers": parallel_workers,
        # both default to the working directory, which is the checkout
        "metrics_dir": str(folder / ".metrics"),
        "environments_dir": str(folder / ".envs"),
    }
    model_settings = {
        "name": model,
        "implementation": "loadtest.baselines.mlserver_runtime.OnnxRuntime",
        "parameters": {"uri": str(path), "version": "1"},
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    (folder / model).mkdir()  # MLServer warns when a model's folder is not named after it
    (folder / model / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    cmd = [str(python.with_name("mlserver")), "start", str(folder)]
    ready = f"/v2/models/{model}/ready"
    return ServerProcess(MLSERVER, model, cmd, _peer_env(python), http, log, ready_path=ready)


def kserve_peer(repo: Path, model: str, work: Path, log: Path) -> ServerProcess:
    """``python -m loadtest.baselines.kserve_server``: ``kserve.ModelServer``, one uvicorn
    worker, REST on 127.0.0.1, gRPC off. ``work`` is unused (kept for a uniform signature)."""
    python = ensure_venv(KSERVE)
    path = ModelRepository(repo).get(model).variant_path()
    port = free_port()
    cmd = [str(python), "-m", "loadtest.baselines.kserve_server"]
    cmd += ["--model-path", str(path), "--name", model, "--port", str(port)]
    ready = f"/v2/models/{model}/ready"
    return ServerProcess(KSERVE, model, cmd, _peer_env(python), port, log, ready_path=ready)


def pytriton_peer(repo: Path, model: str, work: Path, log: Path) -> ServerProcess:
    """``python -m loadtest.baselines.pytriton_server``: Triton (from the nvidia-pytriton
    wheel) with the callable bound by ``@batch``, HTTP on 127.0.0.1, gRPC and metrics off,
    PyTriton's workspace in a short folder of /tmp, removed by PyTriton at stop."""
    python = ensure_venv(PYTRITON)
    path = ModelRepository(repo).get(model).variant_path()
    port = free_port()
    # its sockets live in the workspace: a short path (AF_UNIX paths end at 107 bytes)
    workspace = Path(tempfile.gettempdir()) / f"pytriton-{os.getpid()}-{time.time_ns()}"
    cmd = [str(python), "-m", "loadtest.baselines.pytriton_server"]
    cmd += ["--model-path", str(path), "--name", model, "--port", str(port)]
    cmd += ["--workspace", str(workspace)]
    ready = f"/v2/models/{model}/ready"
    return ServerProcess(PYTRITON, model, cmd, _peer_env(python), port, log, ready_path=ready)


#: kind -> its builder, all with the signature ``(repo, model, work, log)``
PEER_BUILDERS: dict[str, Callable[[Path, str, Path, Path], ServerProcess]] = {
    MLSERVER: mlserver_peer,
    KSERVE: kserve_peer,
    PYTRITON: pytriton_peer,
}


def peer(kind: str, repo: Path, model: str, work: Path, log: Path) -> ServerProcess:
    """The peer of ``kind`` serving ``model`` alone, not started; its venv is made first when
    missing or stale (``ensure_venv``)."""
    if kind not in PEER_BUILDERS:
        raise ValueError(f"{kind!r} is not a peer; peers: {', '.join(PEER_BUILDERS)}")
    return PEER_BUILDERS[kind](repo, model, work, log)

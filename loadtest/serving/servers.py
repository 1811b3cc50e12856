"""The servers the benchmark compares, and the model repository they serve.

slimserve (``python -m service``), the FastAPI baseline and plain or batchable BentoML
(``loadtest.baselines``) each run in a process group of their own, started here, waited on
until ready, measured (CPU seconds and RSS of the whole process tree) and stopped whole, with
any straggler killed by its pid: the benchmark must leave nothing behind. ``build_repository``
prepares what they serve: the zoo's digits CNN (copied, or built) and a 784-2048-2048-10 MLP
with random weights and its INT8 variants.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from service.core.repository import Manifest, ModelRepository, TensorSpec, Variant

__all__ = [
    "BENTOML_BATCHED",
    "BENTOML_PLAIN",
    "BENTOML_SERVICES",
    "CNN",
    "DEFAULT_ZOO",
    "FASTAPI",
    "KSERVE",
    "LOCAL_SERVERS",
    "MLP",
    "MLSERVER",
    "PYTRITON",
    "MLP_SHAPE",
    "ROOT",
    "SERVERS",
    "SLIMSERVE",
    "START_SECONDS_ESTIMATE",
    "VARIANTS",
    "ServerProcess",
    "bentoml_baseline",
    "build_repository",
    "fastapi_baseline",
    "free_port",
    "infer_url",
    "mlp_inputs",
    "slimserve",
    "stop_live",
    "write_mlp_onnx",
]

ROOT = Path(__file__).resolve().parents[2]
CNN, MLP = "digits-cnn", "mlp-2048"
MLP_SHAPE = (784, 2048, 2048, 10)
SLIMSERVE, FASTAPI = "slimserve", "fastapi"
BENTOML_PLAIN, BENTOML_BATCHED = "bentoml-plain", "bentoml-batched"
#: peers, each in a virtual environment of its own (``loadtest.serving.peers``)
MLSERVER, KSERVE, PYTRITON = "mlserver", "kserve", "pytriton"
#: every server the benchmark knows; slimserve first (the ratios are slimserve over the others)
SERVERS = (SLIMSERVE, FASTAPI, BENTOML_PLAIN, BENTOML_BATCHED, MLSERVER, KSERVE, PYTRITON)
#: the ones that need nothing beyond the project's own environment
LOCAL_SERVERS = (SLIMSERVE, FASTAPI, BENTOML_PLAIN, BENTOML_BATCHED)
BENTOML_SERVICES = {BENTOML_PLAIN: "Plain", BENTOML_BATCHED: "Batched"}
#: compressed variants with slimserve cells of their own (and in-process ceilings)
VARIANTS = {CNN: ("int8-static", "pruned"), MLP: ("int8-dynamic", "int8-static")}
READY_PATH = "/v2/health/ready"
START_SECONDS_ESTIMATE = {
    SLIMSERVE: 6.0,
    FASTAPI: 3.0,
    BENTOML_PLAIN: 4.0,
    BENTOML_BATCHED: 4.0,
    MLSERVER: 3.0,
    KSERVE: 2.0,
    PYTRITON: 5.0,
}
DEFAULT_ZOO = ROOT / "models"  # the default repository


# --------------------------------------------------------------------------------------------
# the model repository


def write_mlp_onnx(path: Path, sizes: tuple[int, ...] = MLP_SHAPE, seed: int = 0) -> None:
    """Gemm/Relu/.../Gemm/Softmax with He-initialised random weights; input ``x``, output
    ``probabilities``, both with a dynamic batch axis."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = (rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}"),
        ]
        last = i == len(sizes) - 2
        out = "logits" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out]))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"{out}_relu"]))
            out = f"{out}_relu"
        current = out
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def mlp_inputs(n: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, MLP_SHAPE[0]), dtype=np.float32)


def _publish_mlp(repo: ModelRepository) -> None:
    from export.compress import quantize_dynamic, quantize_static

    staging = repo.staging_dir(MLP)
    write_mlp_onnx(staging / "model.onnx")
    src = staging / "model.onnx"
    variants = {"fp32": Variant("model.onnx")}
    quantize_dynamic(MLP, src, staging / "model.int8-dynamic.onnx")
    quantize_static(MLP, src, staging / "model.int8-static.onnx", {"x": mlp_inputs(512, 7)})
    for v in VARIANTS[MLP]:
        variants[v] = Variant(f"model.{v}.onnx")
    manifest = Manifest(
        variants=variants,
        name=MLP,
        version=0,
        task="classification",
        inputs=[TensorSpec("x", "FP32", (-1, MLP_SHAPE[0]))],
        outputs=[TensorSpec("probabilities", "FP32", (-1, MLP_SHAPE[-1]))],
        description=f"MLP {'-'.join(map(str, MLP_SHAPE))} with random weights (benchmark only)",
    )
    repo.publish(staging, manifest)


def _publish_cnn(repo: ModelRepository, source: Path) -> str:
    """Copy the latest digits-cnn of ``source`` in as version 1, or build it when absent."""
    with contextlib.suppress(Exception):
        latest = ModelRepository(source).get(CNN)
        latest.verify()
        if not all(latest.manifest.variants[v].available for v in VARIANTS[CNN]):
            raise LookupError(f"{latest.path} predates the compressed variants")
        staging = repo.staging_dir(CNN)
        for rel in latest.manifest.files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(latest.path / rel, staging / rel)
        # the base cells compare FP32 with FP32: the baselines serve model.onnx too
        latest.manifest.default_variant = "fp32"
        repo.publish(staging, latest.manifest)
        return f"copied from {latest.path}"
    cmd = [sys.executable, "-m", "export", "build", "--only", CNN, "--repo", str(repo.root)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return "built with python -m export build --only digits-cnn"


def build_repository(root: Path, source: Path = DEFAULT_ZOO) -> dict[str, str]:
    """The benchmark's repository: digits-cnn and mlp-2048, each as version 1."""
    repo = ModelRepository(root)
    cnn = _publish_cnn(repo, source)
    _publish_mlp(repo)
    shutil.rmtree(root / ".staging", ignore_errors=True)
    return {CNN: cnn, MLP: "random weights, seed 0"}


# --------------------------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """One server in its own process group: started, waited on, measured, stopped whole."""

    kind: str
    model: str | None  # the one model of a baseline; None for slimserve (all of them)
    command: list[str]
    env: dict[str, str]
    port: int
    log: Path
    ready_path: str = READY_PATH
    cwd: Path = ROOT  # the checkout it runs from (another one for before/after runs)
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_seconds: float = 0.0
    pids: dict[int, float] = field(default_factory=dict)  # pid -> create_time
    left_behind: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _LIVE.append(self)
        try:
            if self._wait_ready(timeout_s):
                return self
        except BaseException:  # anything, Ctrl-C included: leave nothing running
            self.stop()
            raise
        self.stop()
        raise RuntimeError(f"{self.kind} not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        assert self.process is not None
        deadline = self.started_at + timeout_s
        with httpx.Client(timeout=1.0) as client:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.kind} exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + self.ready_path).status_code == 200:
                        self.ready_seconds = time.perf_counter() - self.started_at
                        self._remember_tree()
                        return True
                time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def tree(self) -> list[psutil.Process]:
        assert self.process is not None
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _remember_tree(self) -> None:
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                self.pids[p.pid] = p.create_time()

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def memory(self) -> dict[str, Any]:
        """RSS of the whole tree, and of each worker (the process that runs the models)."""
        procs = []
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                procs.append((p.pid, " ".join(p.cmdline()), p.memory_info().rss))
        workers = [rss for _, cmd, rss in procs if "worker" in cmd]  # BentoML's, slimserve's
        if self.kind not in (SLIMSERVE, *BENTOML_SERVICES) or not workers:
            workers = [rss for _, _, rss in procs]
        mib = 1024 * 1024
        return {
            "total_rss_mib": round(sum(r for *_, r in procs) / mib, 1),
            "worker_rss_mib": [round(r / mib, 1) for r in workers],
            "processes": len(procs),
        }

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 20 s, then any straggler by its pid."""
        if self.process is None:
            return
        self._remember_tree()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (alive := self._alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:  # a process that left the group (none expected)
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        self.left_behind = alive
        if self in _LIVE:
            _LIVE.remove(self)

    def _alive(self) -> list[int]:
        alive = []
        for pid, created in self.pids.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def record(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "port": self.port,
            "pids": [{"pid": p, "create_time": c} for p, c in self.pids.items()],
            "ready_seconds": round(self.ready_seconds, 3),
            "left_behind": self.left_behind,
            "log": str(self.log),
        }


_LIVE: list[ServerProcess] = []  # stopped on any exit, SIGTERM and Ctrl-C included


def stop_live() -> None:
    """Stop every server still running (the benchmark's ``finally``)."""
    for server in list(_LIVE):
        server.stop()


def slimserve(
    repo: Path,
    work: Path,
    log: Path,
    checkout: Path = ROOT,
    kind: str = SLIMSERVE,
    settings: dict[str, str] | None = None,
) -> ServerProcess:
    """``python -m service`` of ``checkout`` (this one, or another for before/after runs),
    with ``settings`` (``SLIMSERVE_*`` variables) over this process's environment."""
    port = free_port()
    env = {
        **os.environ,
        "SLIMSERVE_GRPC_PORT": str(free_port()),  # never 8001: servers run side by side
        **(settings or {}),
        "SLIMSERVE_MODEL_REPOSITORY": str(repo),
        "SLIMSERVE_HOST": "127.0.0.1",
        "SLIMSERVE_PORT": str(port),
        "BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-", dir=work),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    cmd = [sys.executable, "-m", "service"]
    return ServerProcess(kind, None, cmd, env, port, log, cwd=checkout)


def fastapi_baseline(repo: Path, model: str, log: Path) -> ServerProcess:
    port = free_port()
    path = ModelRepository(repo).get(model).variant_path()
    cmd = [sys.executable, "-m", "loadtest.baselines.fastapi_server"]
    cmd += ["--model-path", str(path), "--name", model, "--port", str(port)]
    return ServerProcess(FASTAPI, model, cmd, dict(os.environ), port, log)


def bentoml_baseline(repo: Path, model: str, kind: str, work: Path, log: Path) -> ServerProcess:
    """``bentoml serve`` of ``loadtest.baselines.bentoml_service`` (Plain or Batched)."""
    port = free_port()
    env = {
        **os.environ,
        "BENCH_MODEL_PATH": str(ModelRepository(repo).get(model).variant_path()),
        "BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-", dir=work),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    target = f"loadtest.baselines.bentoml_service:{BENTOML_SERVICES[kind]}"
    cmd = [str(Path(sys.executable).with_name("bentoml")), "serve", target]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    return ServerProcess(kind, model, cmd, env, port, log, ready_path="/readyz")


def infer_url(server: ServerProcess, model: str, grpc: bool = False) -> str:
    """Where ``model``'s inference requests go (``grpc://host:port/model`` for slimserve's
    v2 gRPC service)."""
    if grpc:
        return f"grpc://127.0.0.1:{server.env['SLIMSERVE_GRPC_PORT']}/{model}"
    if server.kind in BENTOML_SERVICES:
        return f"{server.url}/predict"
    return f"{server.url}/v2/models/{model}/infer"

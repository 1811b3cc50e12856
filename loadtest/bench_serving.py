"""slimserve against FastAPI and plain BentoML baselines, on this machine, with real clients.

``python -m loadtest.bench_serving [--quick] [--out DIR]`` builds a small model repository
(the digits CNN and a 784-2048-2048-10 MLP), then, for each repeat, starts each server in turn
(the order rotates between repeats) and runs its cells: a concurrency sweep of one-sample JSON
requests per model against slimserve, the FastAPI baseline and BentoML without and with adaptive
batching (one baseline process per model), and 32-sample binary requests against slimserve.
Only one server runs at a time. Load is closed-loop: ``concurrency`` asyncio clients, each
sending its next request when the previous one answered, for a fixed time after a warm-up.
Per cell it records req/s, latency percentiles, errors by status, the server process tree's CPU
and RSS and the client's own CPU. Compressed variants (the
zoo CNN's pruned and INT8 graphs, the MLP's INT8 graphs from ``export.compress``) get slimserve
cells of their own, addressed as ``name@variant``. It also measures onnxruntime's in-process
ceiling for every model and variant at batch 1 and 32, and slimserve's start-to-ready time
with a whole zoo. Results go to
``results.json``, ``results.md`` and two PNG plots in ``--out``.

The client shares the machine with the server: on 2 cores its CPU is reported, not removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import httpx
import numpy as np
import orjson
import psutil
import typer

from service.core.repository import Manifest, ModelRepository, TensorSpec, Variant

__all__ = ["Cell", "LoadResult", "ServerProcess", "closed_loop", "build_repository", "run"]

ROOT = Path(__file__).resolve().parents[1]
CNN, MLP = "digits-cnn", "mlp-2048"
MLP_SHAPE = (784, 2048, 2048, 10)
BINARY_BATCH = 32
SLIMSERVE, FASTAPI = "slimserve", "fastapi"
BENTOML_PLAIN, BENTOML_BATCHED = "bentoml-plain", "bentoml-batched"
SERVERS = (SLIMSERVE, FASTAPI, BENTOML_PLAIN, BENTOML_BATCHED)
BENTOML_SERVICES = {BENTOML_PLAIN: "Plain", BENTOML_BATCHED: "Batched"}
CONCURRENCY = (1, 4, 16, 64, 128)
QUICK_CONCURRENCY = (1, 16, 64)
HEADLINE_CONCURRENCY = 64
#: compressed variants with slimserve cells of their own (and in-process ceilings)
VARIANTS = {CNN: ("int8-static", "pruned"), MLP: ("int8-dynamic", "int8-static")}
CEILING_BATCHES = (1, 32)
READY_PATH = "/v2/health/ready"
START_SECONDS_ESTIMATE = {SLIMSERVE: 6.0, FASTAPI: 3.0, BENTOML_PLAIN: 4.0, BENTOML_BATCHED: 4.0}
DEFAULT_ZOO = Path(__file__).resolve().parent.parent / "models"  # the default repository

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


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


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


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
    process: subprocess.Popen | None = None
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
            cwd=ROOT,
            env=self.env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _LIVE.append(self)
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
                        return self
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

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
        workers = [rss for _, cmd, rss in procs if "worker" in cmd]  # BentoML's workers
        if self.kind == FASTAPI or not workers:
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


def slimserve(repo: Path, work: Path, log: Path) -> ServerProcess:
    port = free_port()
    env = {
        **os.environ,
        "SLIMSERVE_MODEL_REPOSITORY": str(repo),
        "SLIMSERVE_HOST": "127.0.0.1",
        "SLIMSERVE_PORT": str(port),
        "BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-", dir=work),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    return ServerProcess(SLIMSERVE, None, [sys.executable, "-m", "service"], env, port, log)


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


def infer_url(server: ServerProcess, model: str) -> str:
    if server.kind in BENTOML_SERVICES:
        return f"{server.url}/predict"
    return f"{server.url}/v2/models/{model}/infer"


# --------------------------------------------------------------------------------------------
# requests


@dataclass(frozen=True)
class Cell:
    model: str
    encoding: str  # "json" or "binary"
    concurrency: int
    samples_per_request: int = 1
    servers: tuple[str, ...] = SERVERS

    @property
    def id(self) -> str:
        return f"{self.model}/{self.encoding}/b{self.samples_per_request}/c{self.concurrency}"


BINARY_CELL = Cell(MLP, "binary", 8, BINARY_BATCH, servers=(SLIMSERVE,))


def variant_cells(concurrency: tuple[int, ...] = CONCURRENCY) -> list[Cell]:
    """slimserve only: each compressed variant at the headline concurrency."""
    c = HEADLINE_CONCURRENCY if HEADLINE_CONCURRENCY in concurrency else max(concurrency)
    return [
        Cell(f"{m}@{v}", "json", c, servers=(SLIMSERVE,)) for m, vs in VARIANTS.items() for v in vs
    ]


def sweep_cells(concurrency: tuple[int, ...] = CONCURRENCY) -> list[Cell]:
    """One-sample JSON requests at each concurrency, per model, then the binary cell, then
    the compressed variants."""
    base = [Cell(m, "json", c) for m in (CNN, MLP) for c in concurrency]
    return base + [BINARY_CELL] + variant_cells(concurrency)


@dataclass(frozen=True)
class Payloads:
    """Pre-encoded request bodies, so the client spends its CPU on HTTP, not on JSON."""

    bodies: list[bytes]
    headers: dict[str, str]
    expect: dict[str, list[int]]  # output name -> shape, checked once before the load


def payloads(cell: Cell, seed: int = 0, bentoml: bool = False) -> Payloads:
    """v2 bodies, or with ``bentoml`` the baselines' ``{"x": [...]}`` body."""
    if cell.model.split("@")[0] == CNN:
        from export.data import load

        x = load("digits").x_test.reshape(-1, 1, 8, 8)
        name = "pixels"
        expect = {"label": [cell.samples_per_request], "probabilities": [1, 10]}
    else:
        x = mlp_inputs(512, seed)
        name = "x"
        expect = {"probabilities": [cell.samples_per_request, MLP_SHAPE[-1]]}
    n = cell.samples_per_request
    expect = {k: [n, *v[1:]] for k, v in expect.items()}
    batches = [x[i : i + n] for i in range(0, len(x) - n + 1, n)]
    if bentoml:
        bodies = [orjson.dumps({"x": b}, option=orjson.OPT_SERIALIZE_NUMPY) for b in batches]
        return Payloads(bodies, {"Content-Type": "application/json"}, {"": [n, MLP_SHAPE[-1]]})
    if cell.encoding == "json":
        tensors = [
            {"name": name, "shape": list(b.shape), "datatype": "FP32", "data": b.ravel()}
            for b in batches
        ]
        bodies = [orjson.dumps({"inputs": [t]}, option=orjson.OPT_SERIALIZE_NUMPY) for t in tensors]
        return Payloads(bodies, {"Content-Type": "application/json"}, expect)
    bodies, header_len = [], None
    for b in batches:
        raw = np.ascontiguousarray(b, dtype="<f4").tobytes()
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": name,
                        "shape": list(b.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        )
        header_len = len(header)
        bodies.append(header + raw)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_len),
    }
    return Payloads(bodies, headers, expect)


def check_response(url: str, cell: Cell, load: Payloads) -> None:
    """One request before the load: the server must answer the cell's request correctly."""
    r = httpx.post(url, content=load.bodies[0], headers=load.headers, timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"{cell.id} at {url}: status {r.status_code}: {r.text[:300]}")
    body = r.content
    if cell.encoding == "binary":
        n = int(r.headers["inference-header-content-length"])
        doc = orjson.loads(body[:n])
        sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
        if n + sum(sizes) != len(body):
            raise RuntimeError(f"{cell.id}: binary outputs of {sizes} bytes, body {len(body)}")
    else:
        doc = orjson.loads(body)
    if "" in load.expect:  # BentoML: a bare (n, 10) array
        got = {"": list(np.asarray(doc).shape)}
    else:
        got = {o["name"]: o["shape"] for o in doc["outputs"]}
    if got != load.expect:
        raise RuntimeError(f"{cell.id} at {url}: outputs {got}, expected {load.expect}")


# --------------------------------------------------------------------------------------------
# the load generator


@dataclass
class LoadResult:
    requests: int
    ok: int
    errors: dict[str, int]
    seconds: float
    req_per_s: float
    samples_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    server_cpu_percent: float
    client_cpu_percent: float
    server_memory: dict[str, Any]


async def closed_loop(
    server: ServerProcess,
    url: str,
    load: Payloads,
    concurrency: int,
    samples_per_request: int,
    warmup_s: float,
    duration_s: float,
) -> LoadResult:
    """``concurrency`` clients, each sending its next request as soon as the last one
    answered; only requests that start and end inside the measured window count."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    me = psutil.Process()
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    start = time.perf_counter()
    measure_from, measure_to = start + warmup_s, start + warmup_s + duration_s

    async def client(i: int, http: aiohttp.ClientSession) -> None:
        k = i
        while True:
            t0 = time.perf_counter()
            if t0 >= measure_to:
                return
            body = load.bodies[k % len(load.bodies)]
            k += concurrency
            try:
                async with http.post(url, data=body, headers=load.headers) as resp:
                    await resp.read()
                    status = str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = f"exception:{type(exc).__name__}"
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= measure_to:
                statuses[status] += 1
                if status == "200":
                    latencies.append(t1 - t0)

    async def probe() -> tuple[float, float, float, float]:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        s0, c0 = server.cpu_seconds(), sum(me.cpu_times()[:2])
        await asyncio.sleep(max(0.0, measure_to - time.perf_counter()))
        return s0, server.cpu_seconds(), c0, sum(me.cpu_times()[:2])

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        probing = asyncio.ensure_future(probe())
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
        s0, s1, c0, c1 = await probing
    memory = server.memory()
    ok = statuses.pop("200", 0)
    lat = np.array(latencies) * 1000 if latencies else np.array([math.nan])
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    return LoadResult(
        requests=ok + sum(statuses.values()),
        ok=ok,
        errors=dict(statuses),
        seconds=duration_s,
        req_per_s=ok / duration_s,
        samples_per_s=ok * samples_per_request / duration_s,
        p50_ms=float(p50),
        p95_ms=float(p95),
        p99_ms=float(p99),
        mean_ms=float(lat.mean()),
        server_cpu_percent=100 * (s1 - s0) / duration_s,
        client_cpu_percent=100 * (c1 - c0) / duration_s,
        server_memory=memory,
    )


def ort_ceiling(model_path: Path, batch: int, warmup_s: float, duration_s: float) -> float:
    """Samples/s of back-to-back ``run()`` calls in this process, with slimserve's session
    settings (the same ``SLIMSERVE_*`` environment the server gets)."""
    from service.core.runtime import OrtSession, RuntimeOptions
    from service.core.settings import Settings

    session = OrtSession(model_path, "ceiling", RuntimeOptions.from_settings(Settings()))
    spec = session.inputs[0]
    x = np.random.default_rng(1).random((batch, *spec.shape[1:]), dtype=np.float32)
    feeds = {spec.name: x}
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        session.run(feeds)
    runs, start = 0, time.perf_counter()
    while (now := time.perf_counter()) - start < duration_s:
        session.run(feeds)
        runs += 1
    return runs * batch / (now - start)


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class Options:
    out: Path
    cell_seconds: float
    warmup_seconds: float
    repeats: int
    startup: bool
    zoo: Path
    quick: bool
    concurrency: tuple[int, ...] = CONCURRENCY


def _ceiling_seconds(opts: Options) -> tuple[float, float]:
    """Warm-up and measuring time of one in-process ceiling: short, there are many of them."""
    return min(opts.warmup_seconds, 0.5), min(opts.cell_seconds, 2.0)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def summarise(runs: list[LoadResult]) -> dict[str, Any]:
    keys = ["req_per_s", "samples_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms"]
    keys += ["server_cpu_percent", "client_cpu_percent"]
    out: dict[str, Any] = {k: _median([getattr(r, k) for r in runs]) for k in keys}
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r.errors)
    out["errors"] = dict(errors)
    out["requests"] = sum(r.requests for r in runs)
    out["ok"] = sum(r.ok for r in runs)
    out["total_rss_mib"] = round(_median([r.server_memory["total_rss_mib"] for r in runs]), 1)
    out["worker_rss_mib"] = round(
        _median([max(r.server_memory["worker_rss_mib"]) for r in runs]), 1
    )
    return out


def _phase(
    server: ServerProcess, cells: list[Cell], opts: Options, results: dict[str, list[LoadResult]]
) -> None:
    server.start()
    try:
        for cell in cells:
            load = payloads(cell, bentoml=server.kind in BENTOML_SERVICES)
            url = infer_url(server, cell.model)
            check_response(url, cell, load)
            result = asyncio.run(
                closed_loop(
                    server,
                    url,
                    load,
                    cell.concurrency,
                    cell.samples_per_request,
                    opts.warmup_seconds,
                    opts.cell_seconds,
                )
            )
            results[f"{server.kind}|{cell.id}"].append(result)
            print(
                f"  {server.kind:15} {cell.id:24} {result.req_per_s:8.1f} req/s  "
                f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:7.2f} ms  "
                f"errors {result.errors or '-'}",
                flush=True,
            )
    finally:
        server.stop()


def measure_startup(
    zoo: Path, work: Path, logs: Path, repeats: int, servers: list[ServerProcess]
) -> dict[str, Any]:
    """Seconds from process start until ``GET /v2/health/ready`` answers 200, with every
    model of ``zoo``, and the worker's RSS once they are loaded."""
    models = ModelRepository(zoo).names() if zoo.is_dir() else []
    if not models:
        return {"skipped": f"no model repository at {zoo} (build one with make models)"}
    runs = []
    for r in range(repeats):
        server = slimserve(zoo, work, logs / f"startup-{r}.log")
        servers.append(server)
        try:
            server.start()
            index = httpx.post(f"{server.url}/v2/repository/index", timeout=10).json()
            memory = server.memory()
        finally:
            server.stop()
        runs.append(
            {
                "seconds": round(server.ready_seconds, 3),
                "ready_models": sum(m["state"] == "READY" for m in index),
                "memory": memory,
            }
        )
        print(f"  start-to-ready with {len(models)} models: {server.ready_seconds:.2f} s")
    return {
        "repository": str(zoo),
        "models": len(models),
        "runs": runs,
        "seconds": _median([r["seconds"] for r in runs]),
        "worker_rss_mib": round(_median([max(r["memory"]["worker_rss_mib"]) for r in runs]), 1),
    }


def budget(opts: Options, cells: list[Cell]) -> dict[str, Any]:
    """What the run should take: load time per cell and repeat, plus estimated server starts."""
    cell_runs = sum(len(c.servers) for c in cells)
    load_s = cell_runs * (opts.warmup_seconds + opts.cell_seconds) * opts.repeats
    targets = 2 + sum(len(v) for v in VARIANTS.values())
    ceiling_s = targets * len(CEILING_BATCHES) * sum(_ceiling_seconds(opts)) * opts.repeats
    starts = {SLIMSERVE: 1} | {k: 2 for k in SERVERS if k != SLIMSERVE}  # baselines: per model
    start_s = opts.repeats * sum(n * START_SECONDS_ESTIMATE[k] for k, n in starts.items())
    startup_s = (1 if opts.quick else 2) * 15.0 if opts.startup else 0.0
    return {
        "cell_runs_per_repeat": cell_runs,
        "load_seconds": round(load_s + ceiling_s, 1),
        "server_start_seconds_estimate": start_s,
        "startup_seconds_estimate": startup_s,
        "total_seconds_estimate": round(load_s + ceiling_s + start_s + startup_s + 10, 1),
    }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in (
        "bentoml",
        "onnxruntime",
        "fastapi",
        "uvicorn",
        "uvloop",
        "httptools",
        "aiohttp",
        "orjson",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def run(opts: Options) -> dict[str, Any]:
    """The whole benchmark; returns what results.json holds."""
    opts.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="slimserve-bench-"))
    began = time.perf_counter()
    plan = budget(opts, sweep_cells(opts.concurrency))
    print(
        f"budget: {plan['cell_runs_per_repeat']} cell runs x {opts.repeats} repeat(s) x "
        f"({opts.warmup_seconds} + {opts.cell_seconds}) s = {plan['load_seconds']:.0f} s of load, "
        f"about {plan['server_start_seconds_estimate']:.0f} s of server starts, "
        f"{plan['startup_seconds_estimate']:.0f} s start-to-ready: "
        f"about {plan['total_seconds_estimate'] / 60:.1f} min",
        flush=True,
    )
    doc: dict[str, Any] = {
        "meta": {
            "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "versions": _versions(),
            "cell_seconds": opts.cell_seconds,
            "warmup_seconds": opts.warmup_seconds,
            "repeats": opts.repeats,
            "quick": opts.quick,
            "concurrency": list(opts.concurrency),
            "slimserve_env": {k: v for k, v in os.environ.items() if k.startswith("SLIMSERVE_")},
            "budget": plan,
        }
    }
    servers: list[ServerProcess] = []
    try:
        repo = work / "models"
        doc["meta"]["models"] = build_repository(repo)
        all_cells = sweep_cells(opts.concurrency)
        results: dict[str, list[LoadResult]] = {
            f"{s}|{c.id}": [] for c in all_cells for s in c.servers
        }
        targets = [m for m in (CNN, MLP)] + [f"{m}@{v}" for m, vs in VARIANTS.items() for v in vs]
        ceilings: dict[str, dict[int, list[float]]] = {
            t: {b: [] for b in CEILING_BATCHES} for t in targets
        }
        bench_repo = ModelRepository(repo)
        logs = opts.out / "logs"
        for r in range(opts.repeats):
            order = SERVERS[r % len(SERVERS) :] + SERVERS[: r % len(SERVERS)]
            print(f"repeat {r + 1} of {opts.repeats}: {', '.join(order)}", flush=True)
            for kind in order:
                if kind == SLIMSERVE:
                    server = slimserve(repo, work, logs / f"slimserve-{r}.log")
                    servers.append(server)
                    _phase(server, [c for c in all_cells if kind in c.servers], opts, results)
                    for target in targets:
                        name, _, variant = target.partition("@")
                        path = bench_repo.get(name).variant_path(variant or "fp32")
                        for b in CEILING_BATCHES:
                            value = ort_ceiling(path, b, *_ceiling_seconds(opts))
                            ceilings[target][b].append(value)
                            print(f"  in-process {target:24} b{b:<3} {value:10.0f} samples/s")
                    continue
                for model in (CNN, MLP):
                    cells = [c for c in all_cells if kind in c.servers and c.model == model]
                    log = logs / f"{kind}-{model}-{r}.log"
                    if kind == FASTAPI:
                        server = fastapi_baseline(repo, model, log)
                    else:
                        server = bentoml_baseline(repo, model, kind, work, log)
                    servers.append(server)
                    _phase(server, cells, opts, results)
        doc["cells"] = []
        for cell in all_cells:
            for s in cell.servers:
                runs = results[f"{s}|{cell.id}"]
                doc["cells"].append(
                    {
                        "id": cell.id,
                        "server": s,
                        **asdict(cell),
                        "median": summarise(runs),
                        "runs": [asdict(x) for x in runs],
                    }
                )
        doc["ceilings"] = {
            t: {str(b): {"runs": runs, "samples_per_s": _median(runs)} for b, runs in per.items()}
            for t, per in ceilings.items()
        }
        if opts.startup:
            print("start-to-ready", flush=True)
            doc["startup"] = measure_startup(
                opts.zoo, work, opts.out / "logs", 1 if opts.quick else 2, servers
            )
        else:
            doc["startup"] = {"skipped": "--skip-startup"}
        doc["headline"] = headline(doc)
    finally:
        for server in list(_LIVE):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    doc["servers"] = [s.record() for s in servers if s.process is not None]
    doc["meta"]["loadavg_end"] = os.getloadavg()
    doc["meta"]["wall_seconds"] = round(time.perf_counter() - began, 1)
    doc["plots"] = plot(doc, opts.out) if doc.get("cells") else []
    (opts.out / "results.json").write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    (opts.out / "results.md").write_text(markdown(doc))
    return doc


# --------------------------------------------------------------------------------------------
# reporting


def _cell(doc: dict[str, Any], cell: Cell, server: str) -> dict[str, Any]:
    for c in doc["cells"]:
        if c["id"] == cell.id and c["server"] == server:
            return dict(c["median"])
    raise KeyError(f"{server} {cell.id}")


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def headline(doc: dict[str, Any]) -> dict[str, Any]:
    """The numbers a reader wants first: slimserve's req/s over each baseline's at c=64 (or
    the highest concurrency measured), per model, and the binary cell against the ceiling."""
    sweep = doc["meta"]["concurrency"]
    c = HEADLINE_CONCURRENCY if HEADLINE_CONCURRENCY in sweep else max(sweep)
    s = SLIMSERVE
    ratios, p99 = {}, {}
    for model in (CNN, MLP):
        cell = Cell(model, "json", c)
        mine = _cell(doc, cell, s)["req_per_s"]
        ratios[model] = {k: _ratio(mine, _cell(doc, cell, k)["req_per_s"]) for k in SERVERS[1:]}
        p99[model] = {k: _cell(doc, cell, k)["p99_ms"] for k in SERVERS}
    c1 = min(sweep)
    startup = doc["startup"]
    return {
        "concurrency": c,
        "req_per_s_ratio": ratios,
        "p99_ms": p99,
        "cnn_p50_ms_at_lowest_concurrency": {
            "concurrency": c1,
            **{k: _cell(doc, Cell(CNN, "json", c1), k)["p50_ms"] for k in SERVERS},
        },
        "binary_samples_per_s": _cell(doc, BINARY_CELL, s)["samples_per_s"],
        "binary_percent_of_ceiling": 100
        * _ratio(
            _cell(doc, BINARY_CELL, s)["samples_per_s"],
            doc["ceilings"][MLP][str(BINARY_BATCH)]["samples_per_s"],
        ),
        "served_vs_ceiling": served_vs_ceiling(doc, c),
        "startup_seconds": startup.get("seconds"),
        "startup_models": startup.get("models"),
        "zoo_worker_rss_mib": startup.get("worker_rss_mib"),
        "bench_worker_rss_mib": {
            s: _cell(doc, Cell(MLP, "json", c), s)["worker_rss_mib"],
            **{
                f"{k} ({m})": _cell(doc, Cell(m, "json", c), k)["worker_rss_mib"]
                for k in SERVERS[1:]
                for m in (CNN, MLP)
            },
        },
    }


def served_vs_ceiling(doc: dict[str, Any], c: int) -> dict[str, dict[str, float]]:
    """Per model and variant: slimserve's samples/s with ``c`` one-sample JSON clients, against
    back-to-back in-process ``run()`` at batch 1 and 32, as percentages (the same run)."""
    out = {}
    for target, per_batch in doc["ceilings"].items():
        served = _cell(doc, Cell(target, "json", c), SLIMSERVE)["samples_per_s"]
        out[target] = {
            "served_samples_per_s": served,
            **{f"in_process_b{b}": v["samples_per_s"] for b, v in per_batch.items()},
            **{
                f"percent_of_b{b}": 100 * _ratio(served, v["samples_per_s"])
                for b, v in per_batch.items()
            },
        }
    return out


def plot(doc: dict[str, Any], out: Path) -> list[str]:
    """throughput.png (req/s against concurrency) and latency.png (p99 against req/s): one
    panel per model, one line per server. Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_cells = [c for c in doc["cells"] if c["encoding"] == "json"]
    names = []
    for name, x_of, y_of, xlabel, ylabel in (
        ("throughput.png", "concurrency", "req_per_s", "concurrent clients", "req/s"),
        ("latency.png", "req_per_s", "p99_ms", "req/s", "p99 latency, ms"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
        for ax, model in zip(axes, (CNN, MLP), strict=True):
            for server in SERVERS:
                rows = sorted(
                    (c for c in json_cells if c["model"] == model and c["server"] == server),
                    key=lambda c: c["concurrency"],
                )
                xs = [c[x_of] if x_of == "concurrency" else c["median"][x_of] for c in rows]
                ys = [c["median"][y_of] for c in rows]
                ax.plot(xs, ys, marker="o", label=server)
            for c in json_cells:
                if c["model"].startswith(f"{model}@"):
                    x = c["concurrency"] if x_of == "concurrency" else c["median"][x_of]
                    ax.scatter(
                        [x],
                        [c["median"][y_of]],
                        marker="*",
                        s=90,
                        zorder=3,
                        label=f"slimserve {c['model'].partition('@')[2]}",
                    )
            ax.set_title(f"{model}, JSON, 1 sample/request")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if x_of == "concurrency":
                ax.set_xscale("log", base=2)
            else:
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(doc: dict[str, Any]) -> str:
    meta, h = doc["meta"], doc.get("headline")
    lines = [
        f"# slimserve vs FastAPI and BentoML baselines ({meta['started_utc']})",
        "",
        f"{meta['cpus']} CPUs, load average {meta['loadavg_start'][0]:.2f} at start; "
        f"{meta['cell_seconds']} s per cell after {meta['warmup_seconds']} s warm-up, "
        f"{meta['repeats']} repeat(s), medians; client and server share the machine; "
        f"{meta['wall_seconds']} s in all. "
        "CPU % is of one core (200 = both of 2); RSS is the process that runs the models "
        "(BentoML's worker; uvicorn's process for FastAPI). BentoML baselines answer "
        '`POST /predict` with `{"x": [[...]]}`; the others speak v2 JSON.',
        "",
        "| cell | server | req/s | samples/s | p50 ms | p95 ms | p99 ms | errors "
        "| server CPU % | worker RSS MiB | client CPU % |",
        "|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|",
    ]
    for c in doc.get("cells", []):
        m = c["median"]
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(m["errors"].items())) or "0"
        lines.append(
            f"| {c['id']} | {c['server']} | {_fmt(m['req_per_s'])} | {_fmt(m['samples_per_s'])} "
            f"| {_fmt(m['p50_ms'], 2)} | {_fmt(m['p95_ms'], 2)} | {_fmt(m['p99_ms'], 2)} "
            f"| {errors} | {_fmt(m['server_cpu_percent'], 0)} | {_fmt(m['worker_rss_mib'])} "
            f"| {_fmt(m['client_cpu_percent'], 0)} |"
        )
    if h:
        startup, c = doc["startup"], h["concurrency"]
        lines += ["", "## Headline", ""]
        for model in (CNN, MLP):
            r = h["req_per_s_ratio"][model]
            lines.append(
                f"- req/s slimserve / FastAPI, {model} JSON c={c}: **{_fmt(r[FASTAPI], 2)}x**; "
                f"/ BentoML plain **{_fmt(r[BENTOML_PLAIN], 2)}x**; "
                f"/ BentoML batched **{_fmt(r[BENTOML_BATCHED], 2)}x**"
            )
        for model in (CNN, MLP):
            p99 = ", ".join(f"{k} {_fmt(v, 2)}" for k, v in h["p99_ms"][model].items())
            lines.append(f"- p99 ms at c={c} ({model} JSON): {p99}")
        low = dict(h["cnn_p50_ms_at_lowest_concurrency"])
        c1 = low.pop("concurrency")
        p50 = ", ".join(f"{k} {_fmt(v, 2)}" for k, v in low.items())
        lines += [
            f"- p50 ms at c={c1} ({CNN} JSON): {p50}",
            f"- binary {MLP}, {BINARY_BATCH} samples/request, c=8: "
            f"{_fmt(h['binary_samples_per_s'], 0)} samples/s = "
            f"**{_fmt(h['binary_percent_of_ceiling'])}%** of in-process onnxruntime "
            f"({_fmt(doc['ceilings'][MLP][str(BINARY_BATCH)]['samples_per_s'], 0)} samples/s "
            f"at batch {BINARY_BATCH})",
            "",
            f"Served (slimserve, one-sample JSON requests, c={c}) against in-process onnxruntime "
            "(back-to-back `run()`, same session settings, same run):",
            "",
            "| model | served samples/s | in-process b1 | in-process b32 | % of b1 | % of b32 |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for target, r in h["served_vs_ceiling"].items():
            lines.append(
                f"| {target} | {_fmt(r['served_samples_per_s'], 0)} | "
                f"{_fmt(r['in_process_b1'], 0)} | {_fmt(r['in_process_b32'], 0)} | "
                f"{_fmt(r['percent_of_b1'], 0)}% | {_fmt(r['percent_of_b32'], 0)}% |"
            )
        if "skipped" in startup:
            lines.append(f"- start-to-ready: skipped ({startup['skipped']})")
        else:
            lines.append(
                f"- start-to-ready with {startup['models']} models ({startup['repository']}): "
                f"**{_fmt(startup['seconds'], 2)} s** (runs: "
                + ", ".join(f"{r['seconds']:.2f}" for r in startup["runs"])
                + f"); worker RSS {_fmt(startup['worker_rss_mib'])} MiB"
            )
        rss = ", ".join(f"{k} {_fmt(v)} MiB" for k, v in h["bench_worker_rss_mib"].items())
        lines.append(f"- worker RSS with the benchmark models: {rss}")
    if doc.get("plots"):
        lines += ["", *(f"![{p}]({p})" for p in doc["plots"])]
    left = [p for srv in doc.get("servers", []) for p in srv["left_behind"]]
    lines += ["", f"Servers started: {len(doc.get('servers', []))}; left behind: {left or 'none'}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# command line


def _stop_all(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _concurrency(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        levels = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated integers, got {value!r}") from exc
    if not levels or min(levels) < 1:
        raise typer.BadParameter(f"expected positive integers, got {value!r}")
    return levels


@app.command()
def main(
    quick: Annotated[
        bool, typer.Option(help="0.5 s cells, c=1,16,64, 1 repeat, one start-up run.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Results folder [default: loadtest/results/<UTC time>].")
    ] = None,
    cell_seconds: Annotated[
        float | None, typer.Option(help="Measured seconds per cell [default: 3, quick 0.5].")
    ] = None,
    warmup_seconds: Annotated[
        float | None, typer.Option(help="Warm-up seconds per cell [default: 1, quick 0.25].")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(help="Rounds over every server [default: 2, quick 1].")
    ] = None,
    concurrency: Annotated[
        str | None,
        typer.Option(help="Comma-separated sweep [default: 1,4,16,64,128, quick 1,16,64]."),
    ] = None,
    skip_startup: Annotated[
        bool, typer.Option(help="Do not measure start-to-ready with the whole zoo.")
    ] = False,
    zoo: Annotated[
        Path, typer.Option(help="The repository whose start-to-ready time is measured.")
    ] = DEFAULT_ZOO,
) -> None:
    """Run every cell against slimserve and the baselines; write results.json/.md and plots."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    opts = Options(
        out=out or ROOT / "loadtest" / "results" / stamp,
        cell_seconds=cell_seconds or (0.5 if quick else 3.0),
        warmup_seconds=warmup_seconds if warmup_seconds is not None else (0.25 if quick else 1.0),
        repeats=repeats or (1 if quick else 2),
        startup=not skip_startup,
        zoo=zoo,
        quick=quick,
        concurrency=_concurrency(concurrency) or (QUICK_CONCURRENCY if quick else CONCURRENCY),
    )
    signal.signal(signal.SIGTERM, _stop_all)
    doc = run(opts)
    print((opts.out / "results.md").read_text())
    print(f"results in {opts.out}")
    if any(srv["left_behind"] for srv in doc["servers"]):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

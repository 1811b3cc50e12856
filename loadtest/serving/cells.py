"""The benchmark's cells, and running them: every server, every repeat, plus in-process ceilings.

A cell is one model, encoding, samples per request and concurrency, against the servers that
run it: a concurrency sweep of one-sample JSON requests per model against all four servers,
32-sample binary requests against slimserve, and slimserve alone on each compressed variant
(``name@variant``) at the headline concurrency. Each repeat starts the servers one at a time,
in an order that rotates between repeats (a baseline once per model), checks one answer per
cell, then runs the closed loop. After slimserve's phase, onnxruntime's in-process throughput
for every model and variant at batch 1 and 32 gives the ceiling the served numbers are read
against. ``measure_startup`` times slimserve from start to ready with a whole zoo.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from loadtest import samples
from loadtest.serving.load import GRPC_INFER, LoadResult, Payloads, closed_loop
from loadtest.serving.servers import (
    BENTOML_SERVICES,
    CNN,
    FASTAPI,
    LOCAL_SERVERS,
    MLP,
    MLP_SHAPE,
    SERVERS,
    SLIMSERVE,
    START_SECONDS_ESTIMATE,
    VARIANTS,
    ServerProcess,
    bentoml_baseline,
    fastapi_baseline,
    infer_url,
    mlp_inputs,
    slimserve,
)
from service.core.repository import ModelRepository

__all__ = [
    "BINARY_BATCH",
    "BINARY_CELL",
    "CEILING_BATCHES",
    "CONCURRENCY",
    "Ceilings",
    "HEADLINE_CONCURRENCY",
    "QUICK_CONCURRENCY",
    "Cell",
    "Options",
    "alternate",
    "baseline",
    "budget",
    "ceiling_round",
    "ceiling_seconds",
    "ceiling_summary",
    "ceiling_targets",
    "check_response",
    "headline_concurrency",
    "measure",
    "measure_startup",
    "ort_ceiling",
    "ort_ceiling_cost",
    "payloads",
    "run_phase",
    "summarise",
    "sweep_cells",
    "variant_cells",
]

BINARY_BATCH = 32
CONCURRENCY = (1, 4, 16, 64, 128)
QUICK_CONCURRENCY = (1, 16, 64)
HEADLINE_CONCURRENCY = 64
CEILING_BATCHES = (1, 32)


# --------------------------------------------------------------------------------------------
# the cells


@dataclass(frozen=True)
class Cell:
    """One measured configuration; ``id`` is how results, logs and tables name it."""

    model: str
    encoding: str  # "json", "binary" (HTTP, Triton's binary extension) or "grpc" (raw contents)
    concurrency: int
    samples_per_request: int = 1
    servers: tuple[str, ...] = SERVERS

    @property
    def id(self) -> str:
        return f"{self.model}/{self.encoding}/b{self.samples_per_request}/c{self.concurrency}"


BINARY_CELL = Cell(MLP, "binary", 8, BINARY_BATCH, servers=(SLIMSERVE,))


def headline_concurrency(concurrency: tuple[int, ...] | list[int]) -> int:
    """The concurrency the headline and the variant cells use: 64, or the highest measured."""
    return HEADLINE_CONCURRENCY if HEADLINE_CONCURRENCY in concurrency else max(concurrency)


def variant_cells(concurrency: tuple[int, ...] = CONCURRENCY) -> list[Cell]:
    """slimserve only: each compressed variant at the headline concurrency."""
    c = headline_concurrency(concurrency)
    return [
        Cell(f"{m}@{v}", "json", c, servers=(SLIMSERVE,)) for m, vs in VARIANTS.items() for v in vs
    ]


def sweep_cells(
    concurrency: tuple[int, ...] = CONCURRENCY, servers: tuple[str, ...] = SERVERS
) -> list[Cell]:
    """One-sample JSON requests at each concurrency, per model, against ``servers``, then the
    binary cell, then the compressed variants (those two slimserve only)."""
    base = [Cell(m, "json", c, servers=servers) for m in (CNN, MLP) for c in concurrency]
    return base + [BINARY_CELL] + variant_cells(concurrency)


@cache
def _digits() -> np.ndarray:
    """The digits test split as images, the rows the CNN cells send."""
    return samples.load()["digits"].reshape(-1, 1, 8, 8)


def payloads(cell: Cell, seed: int = 0, bentoml: bool = False) -> Payloads:
    """v2 bodies, or with ``bentoml`` the baselines' ``{"x": [...]}`` body."""
    if cell.model.split("@")[0] == CNN:
        x = _digits()
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
    if cell.encoding == "grpc":
        return Payloads([_grpc_body(cell.model, name, b) for b in batches], {}, expect)
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


def _grpc_body(model: str, name: str, x: np.ndarray) -> bytes:
    """A serialized v2 ``ModelInferRequest`` carrying ``x`` in ``raw_input_contents`` (what
    ``tritonclient.grpc`` sends)."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return request.SerializeToString()


def _grpc_outputs(url: str, body: bytes) -> dict[str, list[int]]:
    """One gRPC request's output shapes."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    target = url.removeprefix("grpc://").partition("/")[0]
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(GRPC_INFER)(body, timeout=30)
    response = pb.ModelInferResponse.FromString(raw)
    if len(response.raw_output_contents) != len(response.outputs):
        raise RuntimeError(f"{url}: {len(response.outputs)} outputs, raw contents for fewer")
    return {o.name: _column(list(o.shape)) for o in response.outputs}


def _column(shape: list[int]) -> list[int]:
    """``[n, 1]`` read as ``[n]``: MLServer's and Triton's way to return a 1-D output."""
    return shape[:1] if len(shape) == 2 and shape[1] == 1 else shape


def check_response(url: str, cell: Cell, load: Payloads) -> None:
    """One request before the load: the server must answer the cell's request correctly."""
    if cell.encoding == "grpc":
        got = _grpc_outputs(url, load.bodies[0])
        if got != load.expect:
            raise RuntimeError(f"{cell.id} at {url}: outputs {got}, expected {load.expect}")
        return
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
        got = {o["name"]: _column(o["shape"]) for o in doc["outputs"]}
    if got != load.expect:
        raise RuntimeError(f"{cell.id} at {url}: outputs {got}, expected {load.expect}")


# --------------------------------------------------------------------------------------------
# in-process ceilings


def ort_ceiling(model_path: Path, batch: int, warmup_s: float, duration_s: float) -> float:
    """Samples/s of back-to-back ``run()`` calls in this process, with slimserve's session
    settings (the same ``SLIMSERVE_*`` environment the server gets)."""
    return ort_ceiling_cost(model_path, batch, warmup_s, duration_s)[0]


def ort_ceiling_cost(
    model_path: Path, batch: int, warmup_s: float, duration_s: float
) -> tuple[float, float]:
    """:func:`ort_ceiling`, and the CPU microseconds per sample it took (this process's
    CPU time, every onnxruntime thread included): what a sample costs with no server at all."""
    from service.core.runtime import OrtSession, RuntimeOptions
    from service.core.settings import Settings

    session = OrtSession(model_path, "ceiling", RuntimeOptions.from_settings(Settings()))
    spec = session.inputs[0]
    x = np.random.default_rng(1).random((batch, *spec.shape[1:]), dtype=np.float32)
    feeds = {spec.name: x}
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        session.run(feeds)
    runs, start, cpu = 0, time.perf_counter(), time.process_time()
    while (now := time.perf_counter()) - start < duration_s:
        session.run(feeds)
        runs += 1
    spent = time.process_time() - cpu
    return runs * batch / (now - start), 1e6 * spent / (runs * batch)


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class Options:
    """What the command line chose: where results go, how long and how often to measure."""

    out: Path
    cell_seconds: float
    warmup_seconds: float
    repeats: int
    startup: bool
    zoo: Path
    quick: bool
    concurrency: tuple[int, ...] = CONCURRENCY
    #: the servers measured, slimserve first
    servers: tuple[str, ...] = SERVERS


def run_and_save(
    suffix: str,
    run: Callable[[Options], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
    repeats: int,
    cell_seconds: float,
    warmup_seconds: float,
    out: Path | None,
) -> None:
    """A focused bench's command: ``run`` into ``out`` (or a fresh results folder named with
    ``suffix``), then its results.json and results.md."""
    from loadtest.serving.report import results_folder, save

    folder = results_folder(out, suffix)
    opts = Options(folder, cell_seconds, warmup_seconds, repeats, False, Path("."), False)
    doc = run(opts)
    save(folder, doc, markdown(doc))


def ceiling_seconds(opts: Options) -> tuple[float, float]:
    """Warm-up and measuring time of one in-process ceiling: short, there are many of them."""
    return min(opts.warmup_seconds, 0.5), min(opts.cell_seconds, 2.0)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def summarise(runs: list[LoadResult]) -> dict[str, Any]:
    """The medians of a cell's repeats; errors, requests and successes summed."""
    keys = ["req_per_s", "samples_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms"]
    keys += ["server_cpu_percent", "client_cpu_percent"]
    keys += ["server_cpu_us_per_request", "server_cpu_us_per_sample"]
    out: dict[str, Any] = {k: _median([getattr(r, k, math.nan) for r in runs]) for k in keys}
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


def run_phase(
    server: ServerProcess, cells: list[Cell], opts: Options, results: dict[str, list[LoadResult]]
) -> None:
    """Start ``server``, check and load each of its ``cells`` in turn, stop it whatever happens."""
    server.start()
    try:
        for cell in cells:
            load = payloads(cell, bentoml=server.kind in BENTOML_SERVICES)
            url = infer_url(server, cell.model, grpc=cell.encoding == "grpc")
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


def baseline(kind: str, repo: Path, model: str, work: Path, log: Path) -> ServerProcess:
    """The server of ``kind`` serving ``model`` alone (not started); a peer's virtual
    environment is made first when it is missing."""
    if kind == FASTAPI:
        return fastapi_baseline(repo, model, log)
    if kind in BENTOML_SERVICES:
        return bentoml_baseline(repo, model, kind, work, log)
    if kind in LOCAL_SERVERS:
        raise ValueError(f"{kind} is not a baseline")
    from loadtest.serving import peers

    return peers.peer(kind, repo, model, work, log)


def alternate(
    opts: Options, cells: list[Cell], sides: dict[str, Callable[[Path], ServerProcess]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every side (label -> its server, given a log path) on every cell, ``opts.repeats``
    times, the order rotated every repeat (flipped, for two sides); returns cell id -> label
    -> the medians. What differs between the sides is what they set up, not the minute."""
    labels = list(sides)
    results: dict[str, list[LoadResult]] = {f"{k}|{c.id}": [] for k in labels for c in cells}
    for r in range(opts.repeats):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        print(f"repeat {r + 1} of {opts.repeats}: {' | '.join(order)}", flush=True)
        for i, label in enumerate(order):
            run_phase(sides[label](opts.out / "logs" / f"{r}-{i}.log"), cells, opts, results)
    return {c.id: {k: summarise(results[f"{k}|{c.id}"]) for k in labels} for c in cells}


def ceiling_targets() -> list[str]:
    """Every model and compressed variant with an in-process ceiling, as ``name@variant``."""
    return [m for m in (CNN, MLP)] + [f"{m}@{v}" for m, vs in VARIANTS.items() for v in vs]


#: target (``name`` or ``name@variant``) -> batch -> (samples/s, CPU us per sample) per round
Ceilings = dict[str, dict[int, list[tuple[float, float]]]]


def ceiling_round(repo: ModelRepository, opts: Options, ceilings: Ceilings) -> None:
    """One round of in-process ceilings, every target at every batch size."""
    for target in ceilings:
        name, _, variant = target.partition("@")
        path = repo.get(name).variant_path(variant or "fp32")
        for b in CEILING_BATCHES:
            value, cpu = ort_ceiling_cost(path, b, *ceiling_seconds(opts))
            ceilings[target][b].append((value, cpu))
            print(f"  in-process {target:24} b{b:<3} {value:10.0f} samples/s  {cpu:7.1f} us/sample")


@dataclass
class _Round:
    """What every repeat shares: the repository, the cells, and where results accumulate."""

    repo: Path
    work: Path
    opts: Options
    cells: list[Cell]
    servers: list[ServerProcess]
    results: dict[str, list[LoadResult]]
    ceilings: Ceilings

    def run(self, r: int) -> None:
        """Repeat ``r``: every server in turn, starting one further along than the last."""
        kinds = self.opts.servers
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
        print(f"repeat {r + 1} of {self.opts.repeats}: {', '.join(order)}", flush=True)
        logs = self.opts.out / "logs"
        for kind in order:
            if kind == SLIMSERVE:
                server = slimserve(self.repo, self.work, logs / f"slimserve-{r}.log")
                self.servers.append(server)
                cells = [c for c in self.cells if kind in c.servers]
                run_phase(server, cells, self.opts, self.results)
                ceiling_round(ModelRepository(self.repo), self.opts, self.ceilings)
                continue
            for model in (CNN, MLP):
                cells = [c for c in self.cells if kind in c.servers and c.model == model]
                log = logs / f"{kind}-{model}-{r}.log"
                server = baseline(kind, self.repo, model, self.work, log)
                self.servers.append(server)
                run_phase(server, cells, self.opts, self.results)


def measure(
    opts: Options, repo: Path, work: Path, servers: list[ServerProcess]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every repeat of every cell and ceiling against the benchmark repository ``repo``;
    returns what results.json holds under ``cells`` and ``ceilings``. Each server started is
    appended to ``servers`` (so that the caller can stop and record it whatever happens)."""
    all_cells = sweep_cells(opts.concurrency, opts.servers)
    results: dict[str, list[LoadResult]] = {f"{s}|{c.id}": [] for c in all_cells for s in c.servers}
    ceilings: Ceilings = {t: {b: [] for b in CEILING_BATCHES} for t in ceiling_targets()}
    rounds = _Round(repo, work, opts, all_cells, servers, results, ceilings)
    for r in range(opts.repeats):
        rounds.run(r)
    cells = [
        {
            "id": cell.id,
            "server": s,
            **asdict(cell),
            "median": summarise(results[f"{s}|{cell.id}"]),
            "runs": [asdict(x) for x in results[f"{s}|{cell.id}"]],
        }
        for cell in all_cells
        for s in cell.servers
    ]
    return cells, ceiling_summary(ceilings)


def ceiling_summary(ceilings: Ceilings) -> dict[str, dict[str, dict[str, Any]]]:
    """Target -> batch (as text) -> every round's samples/s, and the medians."""
    return {
        t: {
            str(b): {
                "runs": [r for r, _ in runs],
                "samples_per_s": _median([r for r, _ in runs]),
                "cpu_us_per_sample": _median([c for _, c in runs]),
            }
            for b, runs in per.items()
        }
        for t, per in ceilings.items()
    }


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
    ceiling_s = targets * len(CEILING_BATCHES) * sum(ceiling_seconds(opts)) * opts.repeats
    starts = {k: 1 if k == SLIMSERVE else 2 for k in opts.servers}  # baselines: per model
    start_s = opts.repeats * sum(n * START_SECONDS_ESTIMATE[k] for k, n in starts.items())
    startup_s = (1 if opts.quick else 2) * 15.0 if opts.startup else 0.0
    return {
        "cell_runs_per_repeat": cell_runs,
        "load_seconds": round(load_s + ceiling_s, 1),
        "server_start_seconds_estimate": start_s,
        "startup_seconds_estimate": startup_s,
        "total_seconds_estimate": round(load_s + ceiling_s + start_s + startup_s + 10, 1),
    }

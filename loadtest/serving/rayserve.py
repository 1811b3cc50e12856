"""slimserve alone against the same service on Ray Serve with 1 and 2 replicas: ``make bench-ray``.

Three servers per repeat, in an order that rotates between repeats: ``python -m service``
(one worker) and ``python -m service.rayserve`` on a local Ray of this machine's CPUs with one
replica (1 CPU reserved) and with two (1 CPU each, one onnxruntime thread each). Every cell is
HTTP with Triton's binary tensors, from the same load generator on the same machine (its CPU
share is in the table). Server CPU counts every process of the server's tree: for Ray, the GCS,
raylet, proxy, controller, router, metrics board and replicas. The proxy's cost is read at one
client, where nothing batches: the latency and server CPU per request Ray adds to slimserve
alone. Results in ``--out`` (default ``loadtest/results/<UTC time>-ray``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest.serving.cells import Cell, Options, run_and_save, run_phase, summarise
from loadtest.serving.load import LoadResult
from loadtest.serving.servers import (
    CNN,
    MLP,
    ServerProcess,
    build_repository,
    free_port,
    slimserve,
    stop_live,
)
from service.core.settings import usable_cpus

__all__ = ["app", "cells", "run", "markdown", "SERVERS"]

app = typer.Typer(add_completion=False, help=(__doc__ or "").splitlines()[0])

ALONE, RAY1, RAY2 = "slimserve", "ray-1-replica", "ray-2-replicas"
SERVERS = (ALONE, RAY1, RAY2)
#: (model, samples per request, clients): one client for the per-request cost, many for
#: throughput
SHAPES = ((CNN, 1, 1), (CNN, 1, 16), (MLP, 32, 1), (MLP, 32, 16))


def cells() -> list[Cell]:
    return [Cell(model, "binary", c, b, SERVERS) for model, b, c in SHAPES]


def ray_server(repo: Path, log: Path, replicas: int, kind: str) -> ServerProcess:
    """``python -m service.rayserve`` on a local Ray of this machine's CPUs."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {
        "SLIMSERVE_MODEL_REPOSITORY": str(repo),
        "SLIMSERVE_RAY_PORT": str(port),
        "SLIMSERVE_RAY_NUM_CPUS": str(usable_cpus()),
        "SLIMSERVE_RAY_NUM_REPLICAS": str(replicas),
        "SLIMSERVE_RAY_REPLICA_CPUS": "1",
    }
    cmd = [sys.executable, "-m", "service.rayserve"]
    return ServerProcess(kind, None, cmd, env, port, log)


def run(opts: Options) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="slimserve-ray-"))
    repo = work / "models"
    doc: dict[str, Any] = {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": usable_cpus(),
        "loadavg_start": os.getloadavg(),
        "repeats": opts.repeats,
        "cell_seconds": opts.cell_seconds,
        "warmup_seconds": opts.warmup_seconds,
    }
    results: dict[str, list[LoadResult]] = defaultdict(list)
    ready: dict[str, list[float]] = defaultdict(list)
    try:
        build_repository(repo)
        for r in range(opts.repeats):
            print(f"repeat {r + 1} of {opts.repeats}", flush=True)
            for kind in SERVERS[r % 3 :] + SERVERS[: r % 3]:
                log = opts.out / "logs" / f"{kind}-{r}.log"
                if kind == ALONE:
                    server = slimserve(repo, work, log)
                else:
                    server = ray_server(repo, log, 1 if kind == RAY1 else 2, kind)
                run_phase(server, cells(), opts, results)
                ready[kind].append(server.ready_seconds)
    finally:
        stop_live()
        shutil.rmtree(work, ignore_errors=True)
    doc["cells"] = {
        f"{kind}|{cell.id}": summarise(results[f"{kind}|{cell.id}"])
        for kind in SERVERS
        for cell in cells()
    }
    doc["ready_seconds"] = {kind: sorted(v)[len(v) // 2] for kind, v in ready.items()}
    doc["loadavg_end"] = os.getloadavg()
    return doc


def headline(doc: dict[str, Any]) -> dict[str, Any]:
    """Ray's added latency and server CPU per request at one client (CNN, one sample), and
    2 replicas against 1 on every cell."""
    one = Cell(CNN, "binary", 1, 1, SERVERS).id
    alone, ray1 = doc["cells"][f"{ALONE}|{one}"], doc["cells"][f"{RAY1}|{one}"]
    return {
        "added_p50_ms": ray1["p50_ms"] - alone["p50_ms"],
        "added_cpu_us_per_request": ray1["server_cpu_us_per_request"]
        - alone["server_cpu_us_per_request"],
        "two_over_one": {
            c.id: doc["cells"][f"{RAY2}|{c.id}"]["samples_per_s"]
            / doc["cells"][f"{RAY1}|{c.id}"]["samples_per_s"]
            for c in cells()
        },
    }


def markdown(doc: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in doc["loadavg_start"])
    h = headline(doc)
    lines = [
        f"# slimserve alone and on Ray Serve, 1 and 2 replicas ({doc['started_utc']})",
        "",
        f"{doc['cpus']} usable CPUs, client on the same machine; {doc['repeats']} repeats of "
        f"{doc['cell_seconds']} s per cell after {doc['warmup_seconds']} s warm-up, servers in "
        f"a rotating order, medians; HTTP with binary tensors; load average {load} at start. "
        "Server CPU is every process of the server: for Ray, its GCS, raylet, proxy, "
        "controller, router, metrics board and replicas.",
        "",
        "One model group, so Ray Serve's proxy hands requests straight to the replicas (no "
        f"router). Ray Serve adds **{h['added_p50_ms']:.2f} ms** to the median latency "
        f"and **{h['added_cpu_us_per_request']:,.0f} us** of server CPU per request (CNN, one "
        "sample, one client). 2 replicas / 1 replica, samples/s: "
        + ", ".join(f"{k}: {v:.2f}x" for k, v in h["two_over_one"].items())
        + ". Ready after: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in doc["ready_seconds"].items())
        + ".",
        "",
        "| model | samples/request | clients | server | samples/s | vs alone | p50 ms "
        "| p99 ms | server CPU us/request | client CPU % | errors |",
        "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for cell in cells():
        base = doc["cells"][f"{ALONE}|{cell.id}"]["samples_per_s"]
        for kind in SERVERS:
            m = doc["cells"][f"{kind}|{cell.id}"]
            lines.append(
                f"| {cell.model} | {cell.samples_per_request} | {cell.concurrency} | {kind} | "
                f"{m['samples_per_s']:,.0f} | {m['samples_per_s'] / base:.2f}x | "
                f"{m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                f"{m['server_cpu_us_per_request']:,.0f} | {m['client_cpu_percent']:.0f} | "
                f"{m['errors'] or '-'} |"
            )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    repeats: Annotated[int, typer.Option(help="Rounds over every server.")] = 3,
    cell_seconds: Annotated[float, typer.Option(help="Measured seconds per cell.")] = 3.0,
    warmup_seconds: Annotated[float, typer.Option(help="Warm-up seconds per cell.")] = 1.0,
    out: Annotated[Path | None, typer.Option(help="Results folder.")] = None,
) -> None:
    """Run every cell on each server; write results.json/.md."""
    run_and_save("ray", run, markdown, repeats, cell_seconds, warmup_seconds, out)


if __name__ == "__main__":
    app()

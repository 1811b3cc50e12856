"""gRPC beside HTTP binary, against in-process onnxruntime: ``make bench-grpc``.

One slimserve (default settings) per repeat serves both protocols. Every cell is one model,
samples per request (1 and 32) and client count (1 to 64), measured over HTTP with Triton's
binary tensor extension and over the v2 gRPC service with ``raw_input_contents`` (one
``grpc.aio`` channel, every client's calls multiplexed on it), back to back, the order of the
two flipped every repeat. After each repeat's server stops, onnxruntime's in-process
throughput at batch 1 and 32 (slimserve's session settings) gives the ceiling each cell is
read against. The load generator shares the machine: its CPU share is in the table. Results
in ``--out`` (default ``loadtest/results/<UTC time>-grpc``).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest.serving.cells import (
    CEILING_BATCHES,
    Ceilings,
    Cell,
    Options,
    ceiling_round,
    ceiling_summary,
    run_and_save,
    run_phase,
    summarise,
)
from loadtest.serving.load import LoadResult
from loadtest.serving.servers import CNN, MLP, build_repository, slimserve, stop_live
from service.core.repository import ModelRepository
from service.core.settings import usable_cpus

__all__ = ["app", "cells", "run", "markdown"]

app = typer.Typer(add_completion=False, help=(__doc__ or "").splitlines()[0])

ENCODINGS = ("binary", "grpc")
CONCURRENCY = {MLP: (1, 4, 8, 16, 64), CNN: (1, 16, 64)}
BATCHES = CEILING_BATCHES  # samples per request: 1 and 32, read against the same ceilings


def cells() -> list[tuple[Cell, Cell]]:
    """(HTTP binary, gRPC) pairs of the same model, samples per request and clients."""
    return [
        (Cell(model, "binary", c, b, ("slimserve",)), Cell(model, "grpc", c, b, ("slimserve",)))
        for model, clients in CONCURRENCY.items()
        for b in BATCHES
        for c in clients
    ]


def run(opts: Options) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="slimserve-grpc-"))
    repo = work / "models"
    doc: dict[str, Any] = {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": usable_cpus(),
        "loadavg_start": os.getloadavg(),
        "repeats": opts.repeats,
        "cell_seconds": opts.cell_seconds,
        "warmup_seconds": opts.warmup_seconds,
    }
    pairs = cells()
    results: dict[str, list[LoadResult]] = defaultdict(list)
    ceilings: Ceilings = {m: {b: [] for b in CEILING_BATCHES} for m in CONCURRENCY}
    try:
        build_repository(repo)
        for r in range(opts.repeats):
            print(f"repeat {r + 1} of {opts.repeats}", flush=True)
            order = [cell for pair in pairs for cell in (pair if r % 2 == 0 else pair[::-1])]
            server = slimserve(repo, work, opts.out / "logs" / f"slimserve-{r}.log")
            run_phase(server, order, opts, results)
            ceiling_round(ModelRepository(repo), opts, ceilings)
    finally:
        stop_live()
        shutil.rmtree(work, ignore_errors=True)
    doc["cells"] = {
        cell.id: summarise(results[f"slimserve|{cell.id}"]) for pair in pairs for cell in pair
    }
    doc["ceilings"] = ceiling_summary(ceilings)
    doc["loadavg_end"] = os.getloadavg()
    return doc


def _share(doc: dict[str, Any], cell: Cell) -> float:
    ceiling = doc["ceilings"][cell.model][str(cell.samples_per_request)]["samples_per_s"]
    return doc["cells"][cell.id]["samples_per_s"] / ceiling if ceiling else math.nan


def headline(doc: dict[str, Any]) -> dict[str, Any]:
    """The MLP's 32-sample cells: each protocol's best share of in-process at batch 32, and
    gRPC against HTTP binary at each client count."""
    pairs = [p for p in cells() if p[0].model == MLP and p[0].samples_per_request == 32]
    shares = {e: max(_share(doc, p[i]) for p in pairs) for i, e in enumerate(ENCODINGS)}
    ratio = {
        p[0].concurrency: doc["cells"][p[1].id]["samples_per_s"]
        / doc["cells"][p[0].id]["samples_per_s"]
        for p in pairs
    }
    return {"best_share": shares, "grpc_over_http": ratio}


def markdown(doc: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in doc["loadavg_start"])
    h = headline(doc)
    lines = [
        f"# slimserve: v2 gRPC beside HTTP binary ({doc['started_utc']})",
        "",
        f"{doc['cpus']} usable CPUs, one worker, client on the same machine; "
        f"{doc['repeats']} repeats of {doc['cell_seconds']} s per cell after "
        f"{doc['warmup_seconds']} s warm-up, HTTP and gRPC back to back (order flipped each "
        f"repeat), medians; load average {load} at start. In-process: onnxruntime `run()` "
        "back to back in the benchmark's process, slimserve's session settings.",
        "",
        "MLP 784-2048-2048-10, 32 samples per request: best share of in-process at batch 32 "
        f"**{h['best_share']['grpc']:.0%} over gRPC, {h['best_share']['binary']:.0%} over HTTP "
        "binary**; gRPC / HTTP samples/s by clients: "
        + ", ".join(f"c={c}: {v:.2f}x" for c, v in h["grpc_over_http"].items())
        + ".",
        "",
        "| model | samples/request | clients | protocol | samples/s | share of in-process "
        "| gRPC / HTTP | p50 ms | p99 ms | server CPU us/request | client CPU % | errors |",
        "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for http, grpc in cells():
        base = doc["cells"][http.id]["samples_per_s"]
        for cell in (http, grpc):
            m = doc["cells"][cell.id]
            ratio = f"{m['samples_per_s'] / base:.2f}x" if cell is grpc and base else ""
            lines.append(
                f"| {cell.model} | {cell.samples_per_request} | {cell.concurrency} | "
                f"{'gRPC' if cell is grpc else 'HTTP binary'} | {m['samples_per_s']:,.0f} | "
                f"{_share(doc, cell):.0%} | {ratio} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                f"{m['server_cpu_us_per_request']:,.0f} | {m['client_cpu_percent']:.0f} | "
                f"{m['errors'] or '-'} |"
            )
    lines += [
        "",
        "| in-process onnxruntime | batch | samples/s | CPU us/sample |",
        "|---|--:|--:|--:|",
    ]
    for model, by in doc["ceilings"].items():
        for b, c in by.items():
            lines.append(
                f"| {model} | {b} | {c['samples_per_s']:,.0f} | {c['cpu_us_per_sample']:.1f} |"
            )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    repeats: Annotated[int, typer.Option(help="Rounds over every cell.")] = 3,
    cell_seconds: Annotated[float, typer.Option(help="Measured seconds per cell.")] = 3.0,
    warmup_seconds: Annotated[float, typer.Option(help="Warm-up seconds per cell.")] = 1.0,
    out: Annotated[Path | None, typer.Option(help="Results folder.")] = None,
) -> None:
    """Run every cell over both protocols and the in-process ceilings; write results.json/.md."""
    run_and_save("grpc", run, markdown, repeats, cell_seconds, warmup_seconds, out)


if __name__ == "__main__":
    app()

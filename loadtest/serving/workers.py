"""How many workers, and how many onnxruntime threads each: ``make bench-workers``.

Runs slimserve under several ``SLIMSERVE_WORKERS`` / ``SLIMSERVE_INTRA_OP_THREADS`` settings,
alternately (the order rotates every repeat), on the headline cells (the digits CNN with
one-sample JSON requests at 1 and 64 clients, the 784-2048-2048-10 MLP at 64, 32-sample binary
requests). The load generator runs on the same machine: its CPU share is in the table, since
on a small machine every core a worker takes is one the client does not have. The settings
compared are the usable CPUs' sensible splits, and ``auto``; the results say which
``SLIMSERVE_WORKERS=auto`` should pick here. Results in ``--out`` (default
``loadtest/results/<UTC time>-workers``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest.serving.ab import CELLS
from loadtest.serving.cells import Options, alternate
from loadtest.serving.report import results_folder, save
from loadtest.serving.servers import ROOT, ServerProcess, build_repository, slimserve, stop_live
from service.core.settings import Settings, usable_cpus

__all__ = ["app", "configurations", "run"]

app = typer.Typer(add_completion=False, help=(__doc__ or "").splitlines()[0])


def configurations(cpus: int) -> dict[str, dict[str, str]]:
    """Label -> settings: one worker with onnxruntime's own thread count and with one thread,
    then 2, 4, ... workers up to one per CPU (threads divided), and ``auto``."""
    out = {
        "1 worker": {"SLIMSERVE_WORKERS": "1"},
        "1 worker, 1 thread": {"SLIMSERVE_WORKERS": "1", "SLIMSERVE_INTRA_OP_THREADS": "1"},
    }
    n = 2
    while n <= cpus:
        out[f"{n} workers"] = {"SLIMSERVE_WORKERS": str(n)}
        n *= 2
    auto = Settings(workers="auto")
    out[f"auto ({auto.worker_count()} x {auto.session_threads() or 'ort'} threads)"] = {
        "SLIMSERVE_WORKERS": "auto"
    }
    return out


def run(opts: Options, configs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Every configuration on every cell, ``opts.repeats`` times, rotating the order."""
    work = Path(tempfile.mkdtemp(prefix="slimserve-workers-"))
    doc: dict[str, Any] = {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": usable_cpus(),
        "loadavg_start": os.getloadavg(),
        "configurations": configs,
        "repeats": opts.repeats,
        "cell_seconds": opts.cell_seconds,
    }
    repo = work / "models"

    def side(label: str) -> Callable[[Path], ServerProcess]:
        return lambda log: slimserve(repo, work, log, ROOT, label, configs[label])

    try:
        build_repository(repo)
        doc["cells"] = alternate(opts, CELLS, {label: side(label) for label in configs})
    finally:
        stop_live()
        shutil.rmtree(work, ignore_errors=True)
    doc["loadavg_end"] = os.getloadavg()
    return doc


def markdown(doc: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in doc["loadavg_start"])
    first = next(iter(doc["configurations"]))
    lines = [
        f"# slimserve workers and threads ({doc['started_utc']})",
        "",
        f"{doc['cpus']} usable CPUs, client on the same machine; {doc['repeats']} repeats of "
        f"{doc['cell_seconds']} s per cell, the order rotated every repeat, medians; load "
        f"average {load} at start. Settings: "
        + "; ".join(
            f"{k}: {' '.join(f'{n}={v}' for n, v in env.items())}"
            for k, env in doc["configurations"].items()
        )
        + ".",
        "",
        f"| cell | settings | req/s | vs {first} | p50 ms | p99 ms | server CPU us/request "
        "| server CPU % | client CPU % |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell, by in doc["cells"].items():
        base = by[first]["req_per_s"]
        for label, m in by.items():
            lines.append(
                f"| {cell} | {label} | {m['req_per_s']:,.0f} | {m['req_per_s'] / base:.2f}x "
                f"| {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                f"{m['server_cpu_us_per_request']:,.0f} | {m['server_cpu_percent']:.0f} "
                f"| {m['client_cpu_percent']:.0f} |"
            )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    repeats: Annotated[int, typer.Option(help="Rounds over every configuration.")] = 3,
    cell_seconds: Annotated[float, typer.Option(help="Measured seconds per cell.")] = 3.0,
    warmup_seconds: Annotated[float, typer.Option(help="Warm-up seconds per cell.")] = 1.0,
    out: Annotated[Path | None, typer.Option(help="Results folder.")] = None,
) -> None:
    """Run slimserve under each worker/thread setting, alternately; write results.json/.md."""
    folder = results_folder(out, "workers")
    opts = Options(folder, cell_seconds, warmup_seconds, repeats, False, ROOT, False)
    doc = run(opts, configurations(usable_cpus()))
    save(folder, doc, markdown(doc))


if __name__ == "__main__":
    app()

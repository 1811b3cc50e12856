"""slimserve against FastAPI and plain BentoML baselines, on this machine, with real clients.

``python -m loadtest.serving [--quick] [--out DIR]`` (``make bench``) builds a small model
repository (the digits CNN and a 784-2048-2048-10 MLP), then, for each repeat, starts each
server in turn (the order rotates between repeats) and runs its cells: a concurrency sweep of
one-sample JSON requests per model against slimserve, the FastAPI baseline and BentoML without
and with adaptive batching (one baseline process per model), and 32-sample binary requests
against slimserve. Only one server runs at a time. Load is closed-loop: ``concurrency`` asyncio
clients, each sending its next request when the previous one answered, for a fixed time after a
warm-up. Per cell it records req/s, latency percentiles, errors by status, the server process
tree's CPU and RSS and the client's own CPU. Compressed variants (the zoo CNN's pruned and INT8
graphs, the MLP's INT8 graphs from ``export.compress``) get slimserve cells of their own,
addressed as ``name@variant``. It also measures onnxruntime's in-process ceiling for every model
and variant at batch 1 and 32, and slimserve's start-to-ready time with a whole zoo. Results go
to ``results.json``, ``results.md`` and two PNG plots in ``--out``.

The client shares the machine with the server: on 2 cores its CPU is reported, not removed.
This module is the command line and the run from options to files; ``servers``, ``load``,
``cells`` and ``report`` beside it do the work.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest.serving import peers, report
from loadtest.serving.cells import (
    CONCURRENCY,
    QUICK_CONCURRENCY,
    Options,
    budget,
    measure,
    measure_startup,
    sweep_cells,
)
from loadtest.serving.servers import (
    DEFAULT_ZOO,
    ROOT,
    SERVERS,
    SLIMSERVE,
    ServerProcess,
    build_repository,
    stop_live,
)

__all__ = ["app", "main", "run"]

app = typer.Typer(add_completion=False, help=(__doc__ or "").splitlines()[0])


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


def _meta(opts: Options, plan: dict[str, Any]) -> dict[str, Any]:
    """This machine, the installed versions and the options, recorded before anything runs."""
    return {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "versions": _versions(),
        "cell_seconds": opts.cell_seconds,
        "warmup_seconds": opts.warmup_seconds,
        "repeats": opts.repeats,
        "quick": opts.quick,
        "concurrency": list(opts.concurrency),
        "servers": list(opts.servers),
        "slimserve_env": {k: v for k, v in os.environ.items() if k.startswith("SLIMSERVE_")},
        "budget": plan,
    }


def _startup(opts: Options, work: Path, servers: list[ServerProcess]) -> dict[str, Any]:
    if not opts.startup:
        return {"skipped": "--skip-startup"}
    print("start-to-ready", flush=True)
    return measure_startup(opts.zoo, work, opts.out / "logs", 1 if opts.quick else 2, servers)


def run(opts: Options) -> dict[str, Any]:
    """The whole benchmark; returns what results.json holds."""
    opts.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="slimserve-bench-"))
    began = time.perf_counter()
    plan = budget(opts, sweep_cells(opts.concurrency, opts.servers))
    print(
        f"budget: {plan['cell_runs_per_repeat']} cell runs x {opts.repeats} repeat(s) x "
        f"({opts.warmup_seconds} + {opts.cell_seconds}) s = {plan['load_seconds']:.0f} s of load, "
        f"about {plan['server_start_seconds_estimate']:.0f} s of server starts, "
        f"{plan['startup_seconds_estimate']:.0f} s start-to-ready: "
        f"about {plan['total_seconds_estimate'] / 60:.1f} min",
        flush=True,
    )
    doc: dict[str, Any] = {"meta": _meta(opts, plan)}
    chosen = [k for k in opts.servers if k in peers.PEERS]
    for kind in chosen:  # before any measuring: a first install takes a minute or so
        print(f"{kind}: virtual environment {peers.ensure_venv(kind).parent.parent}", flush=True)
    doc["meta"]["peer_pins"] = {k: peers.PEER_PINS[k] for k in chosen}
    servers: list[ServerProcess] = []
    try:
        repo = work / "models"
        doc["meta"]["models"] = build_repository(repo)
        doc["cells"], doc["ceilings"] = measure(opts, repo, work, servers)
        doc["startup"] = _startup(opts, work, servers)
        doc["headline"] = report.headline(doc)
    finally:
        stop_live()
        shutil.rmtree(work, ignore_errors=True)
    doc["servers"] = [s.record() for s in servers if s.process is not None]
    doc["meta"]["loadavg_end"] = os.getloadavg()
    doc["meta"]["wall_seconds"] = round(time.perf_counter() - began, 1)
    report.write(doc, opts.out)
    return doc


# --------------------------------------------------------------------------------------------
# command line


def _stop_all(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _servers(value: str | None) -> tuple[str, ...]:
    if value is None:
        return SERVERS
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in SERVERS]
    if unknown or not chosen:
        raise typer.BadParameter(f"expected some of {', '.join(SERVERS)}, got {value!r}")
    return (SLIMSERVE, *(k for k in SERVERS[1:] if k in chosen))  # slimserve always runs


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
    servers: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated servers besides slimserve [default: all: "
            + ",".join(SERVERS[1:])
            + "]; mlserver and kserve run in virtual environments of their own under "
            ".venv-peers/, made on first use."
        ),
    ] = None,
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
        servers=_servers(servers),
    )
    signal.signal(signal.SIGTERM, _stop_all)
    doc = run(opts)
    print((opts.out / "results.md").read_text())
    print(f"results in {opts.out}")
    if any(srv["left_behind"] for srv in doc["servers"]):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

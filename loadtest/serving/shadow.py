"""What a shadow costs the caller: ``make bench-shadow``.

One slimserve (``SLIMSERVE_MODEL_CONTROL=explicit``) serves the digits CNN; the same
closed-loop load (``--clients`` clients, one sample per v2 JSON request) runs in cells that
alternate between no shadow and a shadow of every request on the CNN's INT8 variant (set and
cleared through ``POST /v2/repository/models/digits-cnn/traffic``). It reports each cell's
p50 and p99, the medians per side, the spread between cells of the same side (the run-to-run
noise the difference is to be read against), and what the shadow recorded: samples compared
and the agreement with the primary.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer

from loadtest.serving.cells import Cell, payloads
from loadtest.serving.load import closed_loop
from loadtest.serving.report import results_folder, save
from loadtest.serving.servers import CNN, build_repository, slimserve, stop_live

__all__ = ["app", "run"]

SHADOW = {"shadow": {"variant": "int8-static"}, "shadow_fraction": 1.0}

app = typer.Typer(add_completion=False, help=(__doc__ or "").splitlines()[0])


def run(out: Path, clients: int, repeats: int, seconds: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="slimserve-shadow-"))
    doc: dict[str, Any] = {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
        "clients": clients,
        "seconds": seconds,
        "shadow": SHADOW,
        "cells": [],
    }
    os.environ["SLIMSERVE_MODEL_CONTROL"] = "explicit"
    try:
        build_repository(work / "models")
        server = slimserve(work / "models", work, out / "logs" / "slimserve.log").start()
        url = f"{server.url}/v2/models/{CNN}/infer"
        traffic = f"{server.url}/v2/repository/models/{CNN}/traffic"
        load = payloads(Cell(CNN, "json", clients))
        for r in range(repeats):
            for side in ("off", "on") if r % 2 == 0 else ("on", "off"):
                policy = orjson.dumps(SHADOW if side == "on" else None)  # null: no shadow
                httpx.post(traffic, content=policy).raise_for_status()
                result = asyncio.run(closed_loop(server, url, load, clients, 1, 1.0, seconds))
                doc["cells"].append(
                    {
                        "shadow": side,
                        "p50_ms": result.p50_ms,
                        "p99_ms": result.p99_ms,
                        "req_per_s": result.req_per_s,
                        "errors": result.errors,
                    }
                )
                print(
                    f"  shadow {side:3}  p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.2f} ms"
                    f"  {result.req_per_s:,.0f} req/s",
                    flush=True,
                )
        meta = httpx.get(f"{server.url}/v2/models/{CNN}").json()["parameters"]
        doc["recorded"] = meta["shadow"]
        server.stop()
    finally:
        os.environ.pop("SLIMSERVE_MODEL_CONTROL", None)
        stop_live()
        shutil.rmtree(work, ignore_errors=True)
    for side in ("off", "on"):
        p50s = [c["p50_ms"] for c in doc["cells"] if c["shadow"] == side]
        doc[f"p50_{side}_ms"] = statistics.median(p50s)
        doc[f"p50_{side}_spread_ms"] = max(p50s) - min(p50s)
        doc[f"p99_{side}_ms"] = statistics.median(
            c["p99_ms"] for c in doc["cells"] if c["shadow"] == side
        )
    return doc


def markdown(doc: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {c['shadow']} | {c['p50_ms']:.3f} | {c['p99_ms']:.2f} | {c['req_per_s']:,.0f} | "
        f"{c['errors'] or '-'} |"
        for c in doc["cells"]
    )
    rec = doc["recorded"] or {}
    load = ", ".join(f"{x:.2f}" for x in doc["loadavg_start"])
    return f"""# What a shadow costs the caller ({doc["started_utc"]})

digits CNN, v2 JSON, {doc["clients"]} closed-loop clients, {doc["seconds"]:g} s cells alternating
between no shadow and a shadow of every request on `@int8-static`; 2 cores shared with the
client, load average {load} at start.

| shadow | p50 ms | p99 ms | req/s | errors |
|---|--:|--:|--:|---|
{rows}

- p50 without / with the shadow (medians): **{doc["p50_off_ms"]:.3f} / {doc["p50_on_ms"]:.3f} ms**;
  the spread between cells of the same side: {doc["p50_off_spread_ms"]:.3f} ms (off),
  {doc["p50_on_spread_ms"]:.3f} ms (on).
- p99 without / with: {doc["p99_off_ms"]:.2f} / {doc["p99_on_ms"]:.2f} ms.
- The shadow compared {rec.get("compared_samples", 0):,} samples, agreement
  {rec.get("agreement") if rec.get("agreement") is None else f"{rec['agreement']:.4f}"},
  {rec.get("dropped_requests", 0):,} copies dropped (backlog full).
"""


@app.command()
def main(
    clients: Annotated[int, typer.Option(help="Closed-loop clients.")] = 8,
    repeats: Annotated[int, typer.Option(help="Pairs of cells (off, on).")] = 4,
    seconds: Annotated[float, typer.Option(help="Measured seconds per cell.")] = 4.0,
    out: Annotated[Path | None, typer.Option(help="Results folder.")] = None,
) -> None:
    """Cells with and without a shadow, alternating; write results.json/.md."""
    folder = results_folder(out, "shadow")
    save(folder, (doc := run(folder, clients, repeats, seconds)), markdown(doc))


if __name__ == "__main__":
    app()

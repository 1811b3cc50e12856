"""Overload: what slimserve does when clients offer four times what it can serve.

``make bench-overload`` (``python -m loadtest.serving.overload``) serves a heavy model (an MLP
784-2048x5-10 with random weights: milliseconds per sample, so that one Python client on the
other core can offer several times the server's capacity), then

1. **capacity**: 64 closed-loop clients, one sample per JSON request: answered requests/s;
2. **overload**: an open-loop generator offers ``--factor`` (4) x capacity requests/s, arrivals
   at fixed spacing whatever the answers (each a new request; nothing retries), for
   ``--seconds``; every request may wait up to 60 s for its answer.

It reports the goodput (200s per second) against the capacity, how the rest was refused (503
with ``Retry-After`` is the only acceptable refusal; anything else is an error), the accepted
requests' p50/p99, the offered rate the generator really achieved, and the server's CPU.
Results go to ``results.json`` / ``results.md`` in ``--out``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import numpy as np
import orjson
import typer

from loadtest.serving.load import Payloads, closed_loop
from loadtest.serving.servers import ROOT, ServerProcess, slimserve, stop_live, write_mlp_onnx
from service.core.repository import Manifest, ModelRepository, TensorSpec

__all__ = ["HEAVY", "HEAVY_SHAPE", "open_loop", "run", "app"]

HEAVY = "mlp-heavy"
HEAVY_SHAPE = (784, 2048, 2048, 2048, 2048, 2048, 10)

app = typer.Typer(add_completion=False, help=(__doc__ or "").splitlines()[0])


def _repository(root: Path) -> None:
    repo = ModelRepository(root)
    staging = repo.staging_dir(HEAVY)
    write_mlp_onnx(staging / "model.onnx", HEAVY_SHAPE)
    manifest = Manifest(
        name=HEAVY,
        version=0,
        task="classification",
        inputs=[TensorSpec("x", "FP32", (-1, HEAVY_SHAPE[0]))],
        outputs=[TensorSpec("probabilities", "FP32", (-1, HEAVY_SHAPE[-1]))],
        description="MLP 784-2048x5-10, random weights (overload benchmark only)",
    )
    repo.publish(staging, manifest)


def _payloads() -> Payloads:
    rows = np.random.default_rng(0).random((256, HEAVY_SHAPE[0]), dtype=np.float32)
    bodies = [
        orjson.dumps(
            {"inputs": [{"name": "x", "shape": [1, HEAVY_SHAPE[0]], "datatype": "FP32", "data": r}]},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        for r in rows
    ]
    return Payloads(bodies, {"Content-Type": "application/json"}, {})


async def open_loop(
    server: ServerProcess, url: str, load: Payloads, rate: float, seconds: float
) -> dict[str, Any]:
    """``rate`` requests/s for ``seconds``, sent on schedule whatever the answers."""
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    retry_after: Counter[str] = Counter()
    total = int(rate * seconds)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        t0 = time.perf_counter()
        try:
            async with http.post(url, data=load.bodies[i % len(load.bodies)], headers=load.headers) as r:
                await r.read()
                status = str(r.status)
                if r.status == 503:
                    retry_after[r.headers.get("Retry-After", "missing")] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = f"exception:{type(exc).__name__}"
        statuses[status] += 1
        if status == "200":
            latencies.append(time.perf_counter() - t0)

    cpu0 = server.cpu_seconds()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(http, i)))
        sent_in = time.perf_counter() - start
        await asyncio.gather(*tasks)
        ended = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "offered_per_s": rate,
        "achieved_offer_per_s": total / sent_in,
        "requests": total,
        "seconds_until_last_answer": ended,
        "statuses": dict(statuses),
        "retry_after": dict(retry_after),
        "goodput_per_s": statuses["200"] / seconds,
        "accepted_p50_ms": float(np.percentile(lat, 50)),
        "accepted_p99_ms": float(np.percentile(lat, 99)),
        "server_cpu_percent": 100 * (server.cpu_seconds() - cpu0) / ended,
    }


def run(out: Path, factor: float, seconds: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="slimserve-overload-"))
    doc: dict[str, Any] = {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
        "model": f"{HEAVY} {'-'.join(map(str, HEAVY_SHAPE))}",
        "factor": factor,
        "seconds": seconds,
    }
    try:
        _repository(work / "models")
        server = slimserve(work / "models", work, out / "logs" / "slimserve.log")
        server.start()
        url = f"{server.url}/v2/models/{HEAVY}/infer"
        load = _payloads()
        capacity = asyncio.run(closed_loop(server, url, load, 64, 1, 2.0, 5.0))
        doc["capacity"] = {
            "req_per_s": capacity.req_per_s,
            "p99_ms": capacity.p99_ms,
            "errors": capacity.errors,
            "server_cpu_percent": capacity.server_cpu_percent,
        }
        print(f"capacity: {capacity.req_per_s:.0f} req/s (p99 {capacity.p99_ms:.0f} ms)")
        rate = factor * capacity.req_per_s
        doc["overload"] = asyncio.run(open_loop(server, url, load, rate, seconds))
        doc["goodput_share"] = doc["overload"]["goodput_per_s"] / capacity.req_per_s
        server.stop()
        doc["server_left_behind"] = server.left_behind
    finally:
        stop_live()
        shutil.rmtree(work, ignore_errors=True)
    doc["loadavg_end"] = os.getloadavg()
    return doc


def markdown(doc: dict[str, Any]) -> str:
    over, cap = doc["overload"], doc["capacity"]
    refused = {k: v for k, v in over["statuses"].items() if k != "200"}
    load = ", ".join(f"{x:.2f}" for x in doc["loadavg_start"])
    return "\n".join(
        [
            f"# slimserve under {doc['factor']:g}x overload ({doc['started_utc']})",
            "",
            f"Model {doc['model']}, one sample per v2 JSON request, 2 cores shared with the "
            f"client, load average {load} at start.",
            "",
            "| figure | value |",
            "|---|--:|",
            f"| capacity (64 closed-loop clients) | {cap['req_per_s']:,.0f} req/s |",
            f"| offered (open loop, {doc['factor']:g}x) | {over['offered_per_s']:,.0f} req/s "
            f"(achieved {over['achieved_offer_per_s']:,.0f}) for {doc['seconds']:g} s |",
            f"| goodput | {over['goodput_per_s']:,.0f} req/s = "
            f"**{100 * doc['goodput_share']:.0f}%** of capacity |",
            f"| refused | {refused or 'none'} (Retry-After: {over['retry_after'] or '-'}) |",
            f"| accepted p50 / p99 | {over['accepted_p50_ms']:,.0f} / "
            f"{over['accepted_p99_ms']:,.0f} ms |",
            f"| server CPU | {over['server_cpu_percent']:.0f}% of one core |",
            "",
        ]
    )


@app.command()
def main(
    factor: Annotated[float, typer.Option(help="Offered load / capacity.")] = 4.0,
    seconds: Annotated[float, typer.Option(help="How long the overload is offered.")] = 10.0,
    out: Annotated[Path | None, typer.Option(help="Results folder.")] = None,
) -> None:
    """Capacity, then an open-loop overload of FACTOR x capacity; write results.json/.md."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = out or ROOT / "loadtest" / "results" / f"{stamp}-overload"
    folder.mkdir(parents=True, exist_ok=True)
    doc = run(folder, factor, seconds)
    (folder / "results.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    text = markdown(doc)
    (folder / "results.md").write_text(text)
    print(text)
    print(f"results in {folder}")
    if doc.get("server_left_behind"):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

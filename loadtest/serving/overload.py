"""Overload: what slimserve does when clients offer four times what it can serve.

``make bench-overload`` (``python -m loadtest.serving.overload``) serves a heavy model (a deep
MLP, 784 -> 2048 -> 100 x (2048 x 2048, one shared matrix) -> 10, random weights: a few
milliseconds per sample, so that one Python client sharing the machine can offer several times
the server's capacity), then

1. **capacity**: 256 closed-loop clients (a full batch always waiting), one sample per JSON
   request: answered requests/s;
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

from loadtest.serving.cells import ort_ceiling
from loadtest.serving.load import Payloads, closed_loop
from loadtest.serving.report import results_folder, save
from loadtest.serving.servers import ROOT, ServerProcess, slimserve, stop_live
from service.core.repository import Manifest, ModelRepository, TensorSpec

__all__ = ["HEAVY", "open_loop", "run", "app", "write_deep_onnx"]

HEAVY = "mlp-deep"
HEAVY_INPUT, HEAVY_WIDTH, HEAVY_LAYERS = 784, 2048, 100

app = typer.Typer(add_completion=False, help=(__doc__ or "").splitlines()[0])


def write_deep_onnx(path: Path, layers: int = HEAVY_LAYERS, width: int = HEAVY_WIDTH) -> None:
    """x -> MatMul -> Tanh -> ``layers`` x (MatMul by one shared matrix, Tanh) -> MatMul ->
    Softmax: the compute of a deep MLP in a file of one hidden matrix (16 MiB)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    scaled = [
        rng.standard_normal(s) / np.sqrt(s[0])
        for s in ((HEAVY_INPUT, width), (width, width), (width, 10))
    ]
    weights = [
        numpy_helper.from_array(w.astype(np.float32), n) for w, n in zip(scaled, "abc", strict=True)
    ]
    nodes = [helper.make_node("MatMul", ["x", "a"], ["m"]), helper.make_node("Tanh", ["m"], ["h"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [nodes[-1].output[0], "b"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i}"]))
    nodes.append(helper.make_node("MatMul", [nodes[-1].output[0], "c"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes,
        HEAVY,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HEAVY_INPUT])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def _repository(root: Path) -> None:
    repo = ModelRepository(root)
    staging = repo.staging_dir(HEAVY)
    write_deep_onnx(staging / "model.onnx")
    manifest = Manifest(
        name=HEAVY,
        version=0,
        task="classification",
        inputs=[TensorSpec("x", "FP32", (-1, HEAVY_INPUT))],
        outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
        description=f"deep MLP, {HEAVY_LAYERS} shared 2048x2048 layers (overload benchmark)",
    )
    repo.publish(staging, manifest)


def _payloads() -> Payloads:
    rows = np.random.default_rng(0).random((256, HEAVY_INPUT), dtype=np.float32)
    bodies = [
        orjson.dumps(
            {"inputs": [{"name": "x", "shape": [1, HEAVY_INPUT], "datatype": "FP32", "data": r}]},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        for r in rows
    ]
    return Payloads(bodies, {"Content-Type": "application/json"}, {})


async def open_loop(
    server: ServerProcess,
    url: str,
    load: Payloads,
    rate: float,
    seconds: float,
    connections: int = 2048,
) -> dict[str, Any]:
    """``rate`` requests/s for ``seconds``, sent on schedule whatever the answers."""
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    done_at: list[float] = []  # when each 200 came back
    retry_after: Counter[str] = Counter()
    total = int(rate * seconds)
    # a pool of keep-alive connections, like a fleet of clients; arrivals past it wait for a
    # connection (counted in achieved_offer_per_s, which then falls below the offer)
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        t0 = time.perf_counter()
        try:
            async with http.post(
                url, data=load.bodies[i % len(load.bodies)], headers=load.headers
            ) as r:
                await r.read()
                status = str(r.status)
                if r.status == 503:
                    retry_after[r.headers.get("Retry-After", "missing")] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = f"exception:{type(exc).__name__}"
        statuses[status] += 1
        if status == "200":
            latencies.append(time.perf_counter() - t0)
            done_at.append(time.perf_counter())

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
    # goodput in the steady part of the window: answers completed between 2 s and the end of
    # the offer (not the queue's drain after it)
    steady = sum(1 for t in done_at if start + 2.0 <= t <= start + seconds)
    return {
        "offered_per_s": rate,
        "achieved_offer_per_s": total / sent_in,
        "requests": total,
        "seconds_until_last_answer": ended,
        "statuses": dict(statuses),
        "retry_after": dict(retry_after),
        "goodput_per_s": steady / (seconds - 2.0),
        "answered_200": statuses["200"],
        "accepted_p50_ms": float(np.percentile(lat, 50)),
        "accepted_p99_ms": float(np.percentile(lat, 99)),
        "server_cpu_percent": 100 * (server.cpu_seconds() - cpu0) / ended,
    }


def run(out: Path, factor: float, seconds: float, checkout: Path = ROOT) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="slimserve-overload-"))
    doc: dict[str, Any] = {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
        "checkout": str(checkout),
        "slimserve_env": {k: v for k, v in os.environ.items() if k.startswith("SLIMSERVE_")},
        "model": f"{HEAVY} ({HEAVY_INPUT} -> 2048 -> {HEAVY_LAYERS} x 2048 -> 10)",
        "factor": factor,
        "seconds": seconds,
    }
    try:
        _repository(work / "models")
        model_file = ModelRepository(work / "models").get(HEAVY).variant_path()
        doc["in_process_b64_per_s"] = ort_ceiling(model_file, 64, 1.0, 5.0)
        server = slimserve(work / "models", work, out / "logs" / "slimserve.log", checkout)
        server.start()
        url = f"{server.url}/v2/models/{HEAVY}/infer"
        load = _payloads()
        # enough clients that a full batch always waits while one runs: the server's ceiling
        capacity = asyncio.run(closed_loop(server, url, load, 256, 1, 3.0, 8.0))
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
        doc["goodput_share_of_ceiling"] = (
            doc["overload"]["goodput_per_s"] / doc["in_process_b64_per_s"]
        )
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
            f"client, load average {load} at start; slimserve from {doc['checkout']} with "
            f"{doc['slimserve_env'] or 'default settings'}.",
            "",
            "| figure | value |",
            "|---|--:|",
            f"| capacity (256 closed-loop clients) | {cap['req_per_s']:,.0f} req/s "
            f"(p99 {cap['p99_ms']:,.0f} ms) |",
            f"| onnxruntime in-process, batch 64, same threads | "
            f"{doc['in_process_b64_per_s']:,.0f} samples/s |",
            f"| offered (open loop, {doc['factor']:g}x) | {over['offered_per_s']:,.0f} req/s "
            f"(achieved {over['achieved_offer_per_s']:,.0f}) for {doc['seconds']:g} s |",
            f"| goodput (200s completed from 2 s to the end of the offer) | "
            f"{over['goodput_per_s']:,.0f} req/s = **{100 * doc['goodput_share']:.0f}%** of "
            f"capacity, {100 * doc['goodput_share_of_ceiling']:.0f}% of in-process |",
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
    checkout: Annotated[
        Path, typer.Option(help="The slimserve checkout to run (another one for before/after).")
    ] = ROOT,
) -> None:
    """Capacity, then an open-loop overload of FACTOR x capacity; write results.json/.md.
    Run it with SLIMSERVE_INTRA_OP_THREADS=1 (what make bench-overload sets) so that the
    load generator's core is not taken from the model."""
    folder = results_folder(out, "overload")
    doc = run(folder, factor, seconds, checkout.resolve())
    save(folder, doc, markdown(doc))
    if doc.get("server_left_behind"):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

"""Soak: mixed traffic for minutes, and whether the server's memory and descriptors stay flat.

``make soak`` (``python -m loadtest.serving.soak --minutes 5``; not part of ``make test``) starts
slimserve on the benchmark repository (the digits CNN and the MLP with its INT8 variants) and
keeps ``--clients`` closed-loop clients busy with a mix a real deployment sees: v2 JSON and
binary requests, variants, friendly endpoints, metadata, and the careless part (malformed
bodies, unknown models and paths, clients that hang up mid-request). Every ``--sample-s`` it
records the worker's RSS, open file descriptors, threads and connections; after the warm-up
it reports the RSS growth (MiB, and MiB per hour), descriptors at start and end, and the
answers by status. Results go to ``results.json`` / ``results.md`` in ``--out``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
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
import psutil
import typer

from loadtest.serving.report import results_folder, save
from loadtest.serving.servers import (
    CNN,
    MLP,
    ServerProcess,
    build_repository,
    mlp_inputs,
    slimserve,
    stop_live,
)

__all__ = ["MIX", "app", "run"]

app = typer.Typer(add_completion=False, help=(__doc__ or "").splitlines()[0])

_DIGITS = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
_CNN = orjson.dumps(
    {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": _DIGITS[0]}]},
    option=orjson.OPT_SERIALIZE_NUMPY,
)
_X = mlp_inputs(32)
_HEADER = orjson.dumps(
    {
        "inputs": [
            {
                "name": "x",
                "shape": [32, 784],
                "datatype": "FP32",
                "parameters": {"binary_data_size": _X.nbytes},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
)
_ROWS = orjson.dumps(
    {"model": CNN, "rows": _DIGITS[:4].reshape(4, -1)}, option=orjson.OPT_SERIALIZE_NUMPY
)
_JSON = {"Content-Type": "application/json"}

#: (weight, name, method, path, body, headers): what one request of the mix is
MIX: list[tuple[int, str, str, str, bytes, dict[str, str]]] = [
    (40, "v2-json", "POST", f"/v2/models/{CNN}/infer", _CNN, _JSON),
    (10, "v2-variant", "POST", f"/v2/models/{CNN}@int8-static/infer", _CNN, _JSON),
    (
        10,
        "v2-binary",
        "POST",
        f"/v2/models/{MLP}@int8-dynamic/infer",
        _HEADER + _X.tobytes(),
        {"Inference-Header-Content-Length": str(len(_HEADER))},
    ),
    (10, "classify", "POST", "/classify", _ROWS, _JSON),
    (5, "metadata", "GET", f"/v2/models/{CNN}", b"", {}),
    (8, "bad-json", "POST", f"/v2/models/{CNN}/infer", b'{"inputs": [{"name": ', _JSON),
    (
        5,
        "bad-shape",
        "POST",
        f"/v2/models/{CNN}/infer",
        _CNN.replace(b"[1,1,8,8]", b"[2,32]"),
        _JSON,
    ),
    (5, "unknown-model", "POST", "/v2/models/{rand}/infer", _CNN, _JSON),
    (4, "unknown-path", "GET", "/{rand}/x", b"", {}),
    (
        3,
        "hang-up",
        "POST",
        f"/v2/models/{MLP}/infer",
        _HEADER + _X.tobytes(),
        {"Inference-Header-Content-Length": str(len(_HEADER))},
    ),
]


def _sample(server: ServerProcess) -> dict[str, Any]:
    """The worker's RSS (MiB), descriptors, threads and TCP connections now."""
    out = {"t": time.time(), "rss_mib": 0.0, "fds": 0, "threads": 0, "connections": 0}
    for proc in server.tree():
        with contextlib.suppress(psutil.Error):
            if "service.server.worker" not in " ".join(proc.cmdline()):
                continue
            out["rss_mib"] += proc.memory_info().rss / 2**20
            out["fds"] += proc.num_fds()
            out["threads"] += proc.num_threads()
            out["connections"] += len(proc.net_connections(kind="tcp"))
    return out


async def _client(
    http: aiohttp.ClientSession, base: str, until: float, seed: int, statuses: Counter[str]
) -> None:
    rng = random.Random(seed)
    weights = [m[0] for m in MIX]
    while time.monotonic() < until:
        _, name, method, path, body, headers = rng.choices(MIX, weights)[0]
        path = path.replace("{rand}", f"r{rng.randrange(10**9)}")
        timeout = aiohttp.ClientTimeout(total=0.002 if name == "hang-up" else 30)
        try:
            async with http.request(
                method, base + path, data=body or None, headers=headers, timeout=timeout
            ) as r:
                await r.read()
                statuses[f"{name} {r.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            statuses[f"{name} {type(exc).__name__}"] += 1


async def _load(
    server: ServerProcess, clients: int, seconds: float, sample_s: float
) -> tuple[Counter[str], list[dict[str, Any]]]:
    statuses: Counter[str] = Counter()
    samples = [_sample(server)]
    until = time.monotonic() + seconds

    async def sampler() -> None:
        while time.monotonic() < until:
            await asyncio.sleep(sample_s)
            samples.append(_sample(server))

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(
            sampler(), *(_client(http, server.url, until, i, statuses) for i in range(clients))
        )
    return statuses, samples


def run(
    out: Path, minutes: float, warmup_minutes: float, clients: int, sample_s: float
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="slimserve-soak-"))
    doc: dict[str, Any] = {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
        "minutes": minutes,
        "warmup_minutes": warmup_minutes,
        "clients": clients,
        "mix": {m[1]: m[0] for m in MIX},
    }
    try:
        build_repository(work / "models")
        server = slimserve(work / "models", work, out / "logs" / "slimserve.log")
        server.start()
        statuses, samples = asyncio.run(_load(server, clients, minutes * 60, sample_s))
        server.stop()
        doc["server_left_behind"] = server.left_behind
        doc["log_bytes"] = server.log.stat().st_size
    finally:
        stop_live()
        shutil.rmtree(work, ignore_errors=True)
    start = samples[0]["t"]
    after_warmup = [s for s in samples if s["t"] - start >= warmup_minutes * 60] or samples[-1:]
    first, last = after_warmup[0], samples[-1]
    hours = max((last["t"] - first["t"]) / 3600, 1e-9)
    doc.update(
        statuses=dict(sorted(statuses.items())),
        requests=sum(statuses.values()),
        samples=samples,
        rss_after_warmup_mib=round(first["rss_mib"], 1),
        rss_end_mib=round(last["rss_mib"], 1),
        rss_growth_mib=round(last["rss_mib"] - first["rss_mib"], 1),
        rss_growth_mib_per_hour=round((last["rss_mib"] - first["rss_mib"]) / hours, 1),
        rss_max_mib=round(max(s["rss_mib"] for s in after_warmup), 1),
        fds=(first["fds"], last["fds"], max(s["fds"] for s in after_warmup)),
        threads=(first["threads"], last["threads"]),
        server_errors=sum(
            n
            for k, n in statuses.items()
            if k.split()[-1].startswith("5") and not k.endswith(" 503")
        ),
        loadavg_end=os.getloadavg(),
    )
    return doc


def markdown(doc: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in doc["loadavg_start"])
    rows = "\n".join(f"| {k} | {n:,} |" for k, n in doc["statuses"].items())
    rss = f"{doc['rss_after_warmup_mib']} / {doc['rss_end_mib']} / {doc['rss_max_mib']}"
    growth = f"{doc['rss_growth_mib']} MiB ({doc['rss_growth_mib_per_hour']} MiB per hour)"
    return f"""# slimserve soak ({doc["started_utc"]})

{doc["minutes"]:g} minutes of mixed traffic from {doc["clients"]} closed-loop clients on 2 cores
(shared with the client), load average {load} at start; figures after a {doc["warmup_minutes"]:g}
minute warm-up. Mix (weights): {doc["mix"]}.

| figure | value |
|---|--:|
| requests | {doc["requests"]:,} |
| worker RSS after warm-up / at the end / max | {rss} MiB |
| RSS growth after warm-up | {growth} |
| open descriptors after warm-up / end / max | {doc["fds"][0]} / {doc["fds"][1]} / {doc["fds"][2]} |
| threads after warm-up / end | {doc["threads"][0]} / {doc["threads"][1]} |
| 5xx other than 503 | {doc["server_errors"]} |
| server log | {doc["log_bytes"]:,} bytes |

| request, answer | count |
|---|--:|
{rows}
"""


@app.command()
def main(
    minutes: Annotated[float, typer.Option(help="How long the traffic runs.")] = 5.0,
    warmup_minutes: Annotated[float, typer.Option(help="Not counted in the growth.")] = 1.0,
    clients: Annotated[int, typer.Option(help="Closed-loop clients.")] = 32,
    sample_s: Annotated[float, typer.Option(help="Seconds between measurements.")] = 10.0,
    out: Annotated[Path | None, typer.Option(help="Results folder.")] = None,
) -> None:
    """Mixed traffic for MINUTES; the worker's memory and descriptors over time."""
    folder = results_folder(out, "soak")
    doc = run(folder, minutes, warmup_minutes, clients, sample_s)
    save(folder, doc, markdown(doc))
    if doc["server_left_behind"] or doc["server_errors"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

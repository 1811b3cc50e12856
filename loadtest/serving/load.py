"""The load generator: closed-loop aiohttp (or gRPC) clients against one server, for a fixed time.

``concurrency`` asyncio clients each send their next request as soon as the last one answered,
cycling through pre-encoded bodies (so the client spends its CPU on HTTP, not on JSON). A
``grpc://host:port/model`` URL sends the bodies as serialized ``ModelInferRequest`` messages
over one ``grpc.aio`` channel (HTTP/2, every client's calls multiplexed on it, as gRPC clients
do), unparsed both ways, so the client spends its CPU on gRPC, not on protobuf. Only
requests that start and end inside the measured window, after the warm-up, count. Alongside it
records errors by status, latency percentiles, and the CPU seconds of the server's process tree
and of this client process over the same window.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import numpy as np
import psutil

from loadtest.serving.servers import ServerProcess

__all__ = ["LoadResult", "Payloads", "closed_loop", "sender", "GRPC_INFER"]

#: the v2 gRPC inference method (Triton's and KServe's service name)
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Payloads:
    """Pre-encoded request bodies, so the client spends its CPU on HTTP, not on JSON."""

    bodies: list[bytes]
    headers: dict[str, str]
    expect: dict[str, list[int]]  # output name -> shape, checked once before the load


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
    #: CPU time of every server process over the window, per answered request and sample
    server_cpu_us_per_request: float = math.nan
    server_cpu_us_per_sample: float = math.nan


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
    start = time.perf_counter()
    measure_from, measure_to = start + warmup_s, start + warmup_s + duration_s

    async def client(i: int, send: Callable[[bytes], Awaitable[str]]) -> None:
        k = i
        while True:
            t0 = time.perf_counter()
            if t0 >= measure_to:
                return
            body = load.bodies[k % len(load.bodies)]
            k += concurrency
            status = await send(body)
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

    async with sender(url, load.headers, concurrency) as send:
        probing = asyncio.ensure_future(probe())
        await asyncio.gather(*(client(i, send) for i in range(concurrency)))
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
        server_cpu_us_per_request=1e6 * (s1 - s0) / ok if ok else math.nan,
        server_cpu_us_per_sample=1e6 * (s1 - s0) / (ok * samples_per_request) if ok else math.nan,
    )


@contextlib.asynccontextmanager
async def sender(
    url: str, headers: dict[str, str], concurrency: int
) -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    """``send(body) -> status``: ``"200"`` for an answer, the status code otherwise (a gRPC
    error as ``grpc:CODE``), ``exception:Name`` when the call failed outright."""
    if url.startswith("grpc://"):
        target = url.removeprefix("grpc://").partition("/")[0]
        unlimited = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        async with grpc.aio.insecure_channel(target, options=unlimited) as channel:
            infer = channel.unary_unary(GRPC_INFER)  # bytes in, bytes out

            async def send_grpc(body: bytes) -> str:
                try:
                    await infer(body, timeout=60)
                    return "200"
                except grpc.aio.AioRpcError as exc:
                    return f"grpc:{exc.code().name}"

            yield send_grpc
        return
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def send_http(body: bytes) -> str:
            try:
                async with http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    return str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return f"exception:{type(exc).__name__}"

        yield send_http

"""Where a request's microseconds go: ``make profile`` (``python -m loadtest.serving.profile``).

Serves the benchmark repository with slimserve, drives one cell (default the digits CNN, one
sample per v2 JSON request, 64 closed-loop clients) and records the worker with py-spy while
it runs: ``flame.svg`` (the flame graph), ``profile.txt`` (py-spy's raw stacks) and
``breakdown.md`` (the share of the worker's samples spent under each part of the request path,
and the server CPU per request of the same run). py-spy samples from outside the process
(ptrace): the worker runs unmodified; the sampling itself costs a few percent.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest.serving.cells import Cell, payloads
from loadtest.serving.load import closed_loop
from loadtest.serving.report import results_folder
from loadtest.serving.servers import CNN, MLP, build_repository, slimserve, stop_live

__all__ = ["PARTS", "app", "breakdown", "run"]

#: the parts of the request path, each the functions whose frames belong to it (first match,
#: innermost frame first, wins)
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("onnxruntime (inference thread)", ("OrtSession.run", "DynamicBatcher._timed")),
    ("JSON decode (msgspec, numpy)", ("decode_request", "_from_json", "tensor_header")),
    ("validation", ("validate_inputs", "check_tensor", "select_outputs", "expect_tensor")),
    ("JSON encode", ("encode_response", "_pack", "dumps")),
    ("metrics", ("prometheus_client",)),
    ("batching", ("DynamicBatcher",)),
    ("dataplane, store", ("DataPlane", "ModelStore", "store.py")),
    (
        "slimserve HTTP (front, routes, body, answer)",
        ("HttpApp", "V2App", "Front", "read_body", "respond"),
    ),
    ("uvicorn + httptools (HTTP/1.1)", ("httptools", "uvicorn", "GuardedHttpProtocol")),
    ("event loop (uvloop, asyncio)", ("uvloop", "asyncio", "_run_once", "run_forever")),
]

app = typer.Typer(add_completion=False, help=(__doc__ or "").splitlines()[0])


def breakdown(raw: Path) -> dict[str, float]:
    """Share of the worker's samples per part of :data:`PARTS` (``other`` for the rest; idle
    waiting in epoll counted apart)."""
    parts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        leaf = frames[-1]
        if "epoll" in leaf or "select" in leaf or "wait (threading" in stack.split(";")[-1]:
            parts["idle (waiting)"] += n
            continue
        parts[_part(frames)] += n
    return {k: round(100 * v / total, 1) for k, v in parts.most_common()} if total else {}


def _part(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, markers in PARTS:
            if any(m in frame for m in markers):
                return name
    return "other"


def run(out: Path, model: str, concurrency: int, seconds: float, rate: int) -> dict[str, Any]:
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise typer.BadParameter("py-spy is not installed: pip install py-spy (the dev group)")
    work = Path(tempfile.mkdtemp(prefix="slimserve-profile-"))
    try:
        build_repository(work / "models")
        server = slimserve(work / "models", work, out / "logs" / "slimserve.log").start()
        worker = next(p for p in server.tree() if "service.server.worker" in " ".join(p.cmdline()))
        cell = Cell(model, "json", concurrency)
        url = f"{server.url}/v2/models/{model}/infer"
        common = [str(spy), "record", "-p", str(worker.pid), "-r", str(rate), "--threads"]
        common += ["-d", str(int(seconds)), "--nonblocking"]
        svg = subprocess.Popen([*common, "-o", str(out / "flame.svg"), "-f", "flamegraph"])
        raw = subprocess.Popen([*common, "-o", str(out / "profile.txt"), "-f", "raw"])
        result = asyncio.run(closed_loop(server, url, payloads(cell), concurrency, 1, 0.5, seconds))
        svg.wait()
        raw.wait()
        server.stop()
    finally:
        stop_live()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "cell": cell.id,
        "req_per_s": result.req_per_s,
        "server_cpu_us_per_request": result.server_cpu_us_per_request,
        "parts_percent": breakdown(out / "profile.txt"),
    }


def markdown(doc: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v:.1f}% |" for k, v in doc["parts_percent"].items())
    return (
        f"# Where the microseconds go: {doc['cell']}\n\n"
        f"{doc['req_per_s']:,.0f} req/s, server CPU {doc['server_cpu_us_per_request']:.0f} us "
        "per request (py-spy sampling the worker; its own cost is in these figures).\n\n"
        "| part of the path | share of the worker's samples |\n|---|--:|\n" + rows + "\n"
    )


@app.command()
def main(
    model: Annotated[str, typer.Option(help=f"{CNN} or {MLP}.")] = CNN,
    concurrency: Annotated[int, typer.Option(help="Closed-loop clients.")] = 64,
    seconds: Annotated[float, typer.Option(help="How long to record.")] = 10.0,
    rate: Annotated[int, typer.Option(help="py-spy samples per second.")] = 250,
    out: Annotated[Path | None, typer.Option(help="Results folder.")] = None,
) -> None:
    """Record the worker under one cell's load: flame.svg, profile.txt, breakdown.md."""
    folder = results_folder(out, "profile")
    doc = run(folder, model, concurrency, seconds, rate)
    text = markdown(doc)
    (folder / "breakdown.md").write_text(text)
    print(text)
    print(f"results in {folder}")


if __name__ == "__main__":
    app()

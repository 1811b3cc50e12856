"""Text and sequence models served: ``make bench-text``.

1. **Sequence batching.** slimserve with text-minilm under ``SLIMSERVE_SEQUENCE_BATCHING``
   ``bucket``, ``longest`` and ``max``, alternately (the order rotates every repeat): one text
   per ``/embed`` request, drawn from ``loadtest/texts.json.gz`` (pieces of 20 Newsgroups
   posts of 4 to 300 words, cut at the model's 256 tokens), at 16 and 64 clients.
2. **Cells** (``bucket``): ``/embed``, text ``/classify`` (news-minilm), v2 ``text`` BYTES
   requests of 8 texts, ``/forecast`` (sunspots-lstm), at 1 and 16 clients.
3. **In-process ceiling**: onnxruntime on the same texts in one process, sorted by length and
   run 32 at a time, tokenized with the same tokenizer: texts per second and CPU per text.
4. **Batch jobs over text**: ``python -m service.batch`` over a JSONL of 20 Newsgroups test
   documents (``--truncate``) with news-minilm and text-minilm, against in-process onnxruntime
   on the same documents (tokenized, sorted, batches of 32): the job's share of it.
5. **Served accuracy**: every 20 Newsgroups test document through ``/classify`` (news-minilm,
   its default variant) against the accuracy on its card.

Needs the text models in ``--repo`` (``make models``). Results in ``--out`` (default
``loadtest/results/<UTC time>-text``).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import orjson
import typer

from loadtest import texts as text_samples
from loadtest.serving.cells import summarise
from loadtest.serving.load import LoadResult, Payloads, closed_loop
from loadtest.serving.report import results_folder, save
from loadtest.serving.servers import ROOT, ServerProcess, slimserve, stop_live
from service.core.repository import ModelRepository
from service.core.runtime import OrtSession, RuntimeOptions
from service.core.settings import usable_cpus
from service.core.tokenizer import TextEncoder, TokenizerSpec

__all__ = ["app", "run"]

app = typer.Typer(add_completion=False, help=(__doc__ or "").splitlines()[0])

MODELS = ("text-minilm", "news-minilm", "sunspots-lstm")
MODES = ("bucket", "longest", "max")
MODE_CONCURRENCY = (16, 64)
CELL_CONCURRENCY = (1, 16)
CEILING_BATCH = 32


def _body(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


@cache
def _payloads() -> dict[str, tuple[str, Payloads, int]]:
    """Cell name -> (path, bodies, samples per request)."""
    data = text_samples.load()
    mixed, history = data["mixed"], data["sunspots"]
    json_headers = {"content-type": "application/json"}

    def embed(t: str) -> bytes:
        return _body({"model": "text-minilm", "texts": [t], "truncate": True})

    def classify(t: str) -> bytes:
        return _body({"model": "news-minilm", "texts": [t], "truncate": True})

    def v2(i: int) -> bytes:
        batch = [mixed[(i * 8 + k) % len(mixed)] for k in range(8)]
        tensor = {"name": "text", "shape": [8], "datatype": "BYTES", "data": batch}
        return _body({"inputs": [tensor], "parameters": {"truncate": True}})

    windows = [history[s : s + 120] for s in range(0, len(history) - 120, 3)]
    return {
        "embed": ("/embed", Payloads([embed(t) for t in mixed], json_headers, {}), 1),
        "classify text": ("/classify", Payloads([classify(t) for t in mixed], json_headers, {}), 1),
        "v2 text x8": (
            "/v2/models/text-minilm/infer",
            Payloads([v2(i) for i in range(64)], json_headers, {}),
            8,
        ),
        "forecast": (
            "/forecast",
            Payloads(
                [_body({"model": "sunspots-lstm", "history": w}) for w in windows],
                json_headers,
                {},
            ),
            1,
        ),
    }


def _check(url: str, load: Payloads) -> None:
    answer = httpx.post(url, content=load.bodies[0], headers=load.headers, timeout=60)
    if answer.status_code != 200:
        raise RuntimeError(f"{url}: {answer.status_code} {answer.text[:300]}")


def _load(
    server: ServerProcess, path: str, load: Payloads, clients: int, samples: int, opts: dict
) -> LoadResult:
    url = server.url + path
    _check(url, load)
    return asyncio.run(
        closed_loop(server, url, load, clients, samples, opts["warmup"], opts["seconds"])
    )


def _cell(
    server: ServerProcess, name: str, clients: int, opts: dict, out: dict[str, list[LoadResult]]
) -> None:
    """One cell of ``_payloads()`` loaded and recorded under ``<server kind>|name|clients``."""
    path, load, samples = _payloads()[name]
    res = _load(server, path, load, clients, samples, opts)
    out.setdefault(f"{server.kind}|{name}|{clients}", []).append(res)
    print(
        f"  {server.kind:8} {name:14} c={clients:3} {res.samples_per_s:7.1f} samples/s  "
        f"p50 {res.p50_ms:7.1f} ms  p99 {res.p99_ms:7.1f} ms  errors {res.errors or '-'}",
        flush=True,
    )


def _modes(repo: Path, work: Path, opts: dict) -> dict[str, Any]:
    """Every mode on /embed at each concurrency, ``repeats`` times, order rotated."""
    results: dict[str, list[LoadResult]] = {}
    for r in range(opts["repeats"]):
        order = list(MODES[r % 3 :] + MODES[: r % 3])
        print(f"repeat {r + 1}: {' | '.join(order)}", flush=True)
        for mode in order:
            log = work / "logs" / f"modes-{r}-{mode}.log"
            server = slimserve(repo, work, log, ROOT, mode, {"SLIMSERVE_SEQUENCE_BATCHING": mode})
            server.start()
            try:
                for clients in MODE_CONCURRENCY:
                    _cell(server, "embed", clients, opts, results)
            finally:
                server.stop()
    return {k.replace("|embed", ""): summarise(v) for k, v in results.items()}


def _cells(repo: Path, work: Path, opts: dict) -> dict[str, Any]:
    results: dict[str, list[LoadResult]] = {}
    for r in range(opts["repeats"]):
        server = slimserve(repo, work, work / "logs" / f"cells-{r}.log", ROOT, "bucket")
        server.start()
        try:
            for name in _payloads():
                for clients in CELL_CONCURRENCY:
                    _cell(server, name, clients, opts, results)
        finally:
            server.stop()
    return {k.removeprefix("bucket|"): summarise(v) for k, v in results.items()}


def _encoder(repo: ModelRepository, name: str) -> tuple[TextEncoder, Path]:
    model = repo.get(name)
    assert model.manifest.tokenizer is not None
    spec = TokenizerSpec.parse(model.manifest.tokenizer, name)
    return TextEncoder(model.path / spec.file, spec, name), model.variant_path()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def in_process(repo: ModelRepository, name: str, documents: list[str]) -> dict[str, float]:
    """onnxruntime in this process on ``documents``: tokenized (truncated), sorted by length,
    ``CEILING_BATCH`` at a time, each batch padded to its longest."""
    encoder, path = _encoder(repo, name)
    session = OrtSession(path, name, RuntimeOptions(["CPUExecutionProvider"]))
    ids = encoder.encode(documents, truncate=True)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    session.run(encoder.feeds([ids[i] for i in order[:CEILING_BATCH]]))  # warm-up
    start, cpu = time.perf_counter(), _cpu()
    ids = encoder.encode(documents, truncate=True)  # the tokenizer's time counts too
    for lo in range(0, len(order), CEILING_BATCH):
        session.run(encoder.feeds([ids[i] for i in order[lo : lo + CEILING_BATCH]]))
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    session.close()
    return {
        "texts": len(documents),
        "seconds": seconds,
        "texts_per_s": len(documents) / seconds,
        "cpu_ms_per_text": 1000 * cpu / len(documents),
    }


def batch_job(repo: Path, name: str, documents: Path, work: Path) -> dict[str, Any]:
    """``python -m service.batch`` over ``documents`` (JSONL), timed from the outside."""
    out = work / f"{name}.parquet"
    summary = work / f"{name}.summary.json"
    cmd = [sys.executable, "-m", "service.batch", "--model", name, "--repo", str(repo),
           "--input", str(documents), "--output", str(out), "--truncate", "--overwrite",
           "--no-progress", "--summary-json", str(summary)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the batch job failed ({done.returncode}): {done.stderr[-2000:]}")
    doc = json.loads(summary.read_text())
    doc["wall_seconds"] = time.perf_counter() - start
    return doc


def served_accuracy(repo: Path, work: Path, variant: str | None = None) -> dict[str, Any]:
    """Every 20 Newsgroups test document through /classify (news-minilm, ``variant`` or its
    default), against the card's accuracy of that variant."""
    from export.corpora import text_corpus

    test = text_corpus("20newsgroups", "test")
    model = ModelRepository(repo).get("news-minilm").manifest
    variant = variant or model.default_variant
    card = model.variants[variant].details["measurement"]["metrics"]["accuracy"]
    server = slimserve(repo, work, work / "logs" / "accuracy.log", ROOT)
    server.start()
    served: list[str] = []
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for lo in range(0, len(test.texts), 64):
                texts = test.texts[lo : lo + 64]
                body = {"model": f"news-minilm@{variant}", "texts": texts, "truncate": True}
                answer = client.post("/classify", json=body)
                answer.raise_for_status()
                served += [p["label"] for p in answer.json()["predictions"]]
    finally:
        server.stop()
    truth = [test.label_names[y] for y in test.labels]
    accuracy = float(np.mean([s == t for s, t in zip(served, truth, strict=True)]))
    return {
        "documents": len(served),
        "variant": variant,
        "served_accuracy": accuracy,
        "card_accuracy": card,
        "difference_points": 100 * (accuracy - card),
    }


def _documents(work: Path) -> tuple[Path, list[str]]:
    from export.corpora import text_corpus

    test = text_corpus("20newsgroups", "test")
    docs = test.texts[:2000]
    path = work / "news.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in enumerate(docs):
            fh.write(json.dumps({"id": i, "text": t}) + "\n")
    return path, docs


def run(source: Path, opts: dict) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="slimserve-text-"))
    repo = work / "models"
    for name in MODELS:
        shutil.copytree(source / name, repo / name)
    doc: dict[str, Any] = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": usable_cpus(),
        "loadavg_start": os.getloadavg(),
        **opts,
    }
    try:
        doc["modes"] = _modes(repo, work, opts)
        doc["cells"] = _cells(repo, work, opts)
        mixed = text_samples.load()["mixed"]
        doc["ceiling"] = {"text-minilm": in_process(ModelRepository(repo), "text-minilm", mixed)}
        documents, docs = _documents(work)
        doc["batch"] = {}
        for name in ("news-minilm", "text-minilm"):
            job = batch_job(repo, name, documents, work)
            local = in_process(ModelRepository(repo), name, docs)
            doc["batch"][name] = {"job": job, "in_process": local}
        if opts["accuracy"]:  # the default (INT8: scales per batch) and FP32
            doc["accuracy"] = [served_accuracy(repo, work), served_accuracy(repo, work, "fp32")]
    finally:
        stop_live()
        shutil.rmtree(work, ignore_errors=True)
    doc["loadavg_end"] = os.getloadavg()
    return doc


def markdown(doc: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in doc["loadavg_start"])
    lines = [
        f"# slimserve text and sequence models ({doc['started_utc']})",
        "",
        f"{doc['cpus']} CPUs, client on the same machine, load average {load} at start; "
        f"{doc['repeats']} repeats of {doc['seconds']} s per cell, medians. Texts: 512 pieces "
        "of 20 Newsgroups test posts, 4 to 300 words, one per request, cut at 256 tokens.",
        "",
        "## Sequence batching (text-minilm, /embed, one text per request)",
        "",
        "| mode | clients | texts/s | vs max | p50 ms | p99 ms | server CPU ms/text |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for clients in MODE_CONCURRENCY:
        base = doc["modes"][f"max|{clients}"]["samples_per_s"]
        for mode in MODES:
            m = doc["modes"][f"{mode}|{clients}"]
            lines.append(
                f"| {mode} | {clients} | {m['samples_per_s']:.1f} | "
                f"{m['samples_per_s'] / base:.2f}x | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                f"{m['server_cpu_us_per_sample'] / 1000:.1f} |"
            )
    ceiling = doc["ceiling"]["text-minilm"]
    lines += [
        "",
        f"In-process onnxruntime on the same 512 texts (sorted by length, batches of "
        f"{CEILING_BATCH}): {ceiling['texts_per_s']:.1f} texts/s, "
        f"{ceiling['cpu_ms_per_text']:.1f} ms CPU per text.",
        "",
        "## Endpoints (bucket mode)",
        "",
        "| cell | clients | req/s | samples/s | p50 ms | p99 ms | server CPU ms/request |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for key, m in doc["cells"].items():
        name, clients = key.split("|")
        lines.append(
            f"| {name} | {clients} | {m['req_per_s']:.1f} | {m['samples_per_s']:.1f} | "
            f"{m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
            f"{m['server_cpu_us_per_request'] / 1000:.2f} |"
        )
    lines += [
        "",
        "## Batch jobs over text (2,000 20 Newsgroups test posts, --truncate)",
        "",
        "| model | job rows/s | in-process texts/s | share |",
        "|---|--:|--:|--:|",
    ]
    for name, b in doc["batch"].items():
        rate = b["job"]["rows_per_s"]
        local = b["in_process"]["texts_per_s"]
        lines.append(f"| {name} | {rate:.1f} | {local:.1f} | {rate / local:.0%} |")
    if "accuracy" in doc:
        lines += [
            "",
            "## Served accuracy: news-minilm on all 20 Newsgroups test posts",
            "",
            "| variant | posts | served | card | difference |",
            "|---|--:|--:|--:|--:|",
        ]
        for a in doc["accuracy"]:
            lines.append(
                f"| {a['variant']} | {a['documents']:,} | {a['served_accuracy']:.4f} | "
                f"{a['card_accuracy']:.4f} | {a['difference_points']:+.2f} points |"
            )
        lines += [
            "",
            "INT8 quantizes activations with one scale per batch: its answers move with what "
            "shares the batch (the build ran the test posts 32 at a time in file order, the "
            "server batches by length); FP32's do not.",
        ]
    return "\n".join(lines) + "\n"


@app.command()
def main(
    repo: Annotated[Path, typer.Option(help="Repository with the text models.")] = ROOT / "models",
    repeats: Annotated[int, typer.Option(help="Rounds over the batching modes.")] = 3,
    seconds: Annotated[float, typer.Option(help="Measured seconds per cell.")] = 8.0,
    warmup: Annotated[float, typer.Option(help="Warm-up seconds per cell.")] = 2.0,
    accuracy: Annotated[bool, typer.Option(help="Score all 7,528 test posts served.")] = True,
    out: Annotated[Path | None, typer.Option(help="Results folder.")] = None,
) -> None:
    """Run the text benchmark; write results.json/.md."""
    folder = results_folder(out, "text")
    opts = {"repeats": repeats, "seconds": seconds, "warmup": warmup, "accuracy": accuracy}
    doc = run(repo, opts)
    save(folder, doc, markdown(doc))


if __name__ == "__main__":
    app()

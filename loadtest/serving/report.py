"""The benchmark's report: the headline numbers, results.json, results.md and two PNG plots.

``headline`` reads the measured cells for what a reader wants first (slimserve's req/s over
each baseline's at the headline concurrency, p99 and p50 latencies, the binary cell and each
served model against onnxruntime in-process); ``write`` renders the whole document to ``out``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

from loadtest.serving.cells import BINARY_BATCH, BINARY_CELL, Cell, headline_concurrency
from loadtest.serving.servers import CNN, FASTAPI, MLP, SERVERS, SLIMSERVE

__all__ = ["headline", "markdown", "plot", "served_vs_ceiling", "write"]


def _cell(doc: dict[str, Any], cell: Cell, server: str) -> dict[str, Any]:
    for c in doc["cells"]:
        if c["id"] == cell.id and c["server"] == server:
            return dict(c["median"])
    raise KeyError(f"{server} {cell.id}")


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _servers(doc: dict[str, Any]) -> tuple[str, ...]:
    """The servers this run measured, slimserve first."""
    return tuple(doc["meta"].get("servers", SERVERS))


def headline(doc: dict[str, Any]) -> dict[str, Any]:
    """The numbers a reader wants first: slimserve's req/s over each baseline's at c=64 (or
    the highest concurrency measured), per model, and the binary cell against the ceiling."""
    sweep = doc["meta"]["concurrency"]
    c = headline_concurrency(sweep)
    s, servers = SLIMSERVE, _servers(doc)
    ratios, p99, cpu = {}, {}, {}
    for model in (CNN, MLP):
        cell = Cell(model, "json", c)
        mine = _cell(doc, cell, s)["req_per_s"]
        ratios[model] = {k: _ratio(mine, _cell(doc, cell, k)["req_per_s"]) for k in servers[1:]}
        p99[model] = {k: _cell(doc, cell, k)["p99_ms"] for k in servers}
        cpu[model] = {k: _cell(doc, cell, k)["server_cpu_us_per_request"] for k in servers}
    c1 = min(sweep)
    p50 = {k: _cell(doc, Cell(CNN, "json", c1), k)["p50_ms"] for k in servers}
    startup = doc["startup"]
    binary, ceiling = _cell(doc, BINARY_CELL, s), doc["ceilings"][MLP][str(BINARY_BATCH)]
    return {
        "concurrency": c,
        "req_per_s_ratio": ratios,
        "p99_ms": p99,
        "server_cpu_us_per_request": cpu,
        "cnn_p50_ms_at_lowest_concurrency": {"concurrency": c1, **p50},
        "cnn_p50_ratio_to_fastapi_at_lowest_concurrency": (
            _ratio(p50[s], p50[FASTAPI]) if FASTAPI in p50 else None
        ),
        "binary_samples_per_s": binary["samples_per_s"],
        "binary_server_cpu_us_per_sample": binary["server_cpu_us_per_sample"],
        "in_process_cpu_us_per_sample_b32": ceiling.get("cpu_us_per_sample"),
        "binary_percent_of_ceiling": 100
        * _ratio(binary["samples_per_s"], ceiling["samples_per_s"]),
        "served_vs_ceiling": served_vs_ceiling(doc, c),
        "startup_seconds": startup.get("seconds"),
        "startup_models": startup.get("models"),
        "zoo_worker_rss_mib": startup.get("worker_rss_mib"),
        "bench_worker_rss_mib": {
            s: _cell(doc, Cell(MLP, "json", c), s)["worker_rss_mib"],
            **{
                f"{k} ({m})": _cell(doc, Cell(m, "json", c), k)["worker_rss_mib"]
                for k in servers[1:]
                for m in (CNN, MLP)
            },
        },
    }


def served_vs_ceiling(doc: dict[str, Any], c: int) -> dict[str, dict[str, float]]:
    """Per model and variant: slimserve's samples/s with ``c`` one-sample JSON clients, against
    back-to-back in-process ``run()`` at batch 1 and 32, as percentages (the same run)."""
    out = {}
    for target, per_batch in doc["ceilings"].items():
        served = _cell(doc, Cell(target, "json", c), SLIMSERVE)["samples_per_s"]
        out[target] = {
            "served_samples_per_s": served,
            **{f"in_process_b{b}": v["samples_per_s"] for b, v in per_batch.items()},
            **{
                f"percent_of_b{b}": 100 * _ratio(served, v["samples_per_s"])
                for b, v in per_batch.items()
            },
        }
    return out


def plot(doc: dict[str, Any], out: Path) -> list[str]:
    """throughput.png (req/s against concurrency) and latency.png (p99 against req/s): one
    panel per model, one line per server. Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_cells = [c for c in doc["cells"] if c["encoding"] == "json"]
    names = []
    for name, x_of, y_of, xlabel, ylabel in (
        ("throughput.png", "concurrency", "req_per_s", "concurrent clients", "req/s"),
        ("latency.png", "req_per_s", "p99_ms", "req/s", "p99 latency, ms"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
        for ax, model in zip(axes, (CNN, MLP), strict=True):
            for server in _servers(doc):
                rows = sorted(
                    (c for c in json_cells if c["model"] == model and c["server"] == server),
                    key=lambda c: c["concurrency"],
                )
                xs = [c[x_of] if x_of == "concurrency" else c["median"][x_of] for c in rows]
                ys = [c["median"][y_of] for c in rows]
                ax.plot(xs, ys, marker="o", label=server)
            for c in json_cells:
                if c["model"].startswith(f"{model}@"):
                    x = c["concurrency"] if x_of == "concurrency" else c["median"][x_of]
                    ax.scatter(
                        [x],
                        [c["median"][y_of]],
                        marker="*",
                        s=90,
                        zorder=3,
                        label=f"slimserve {c['model'].partition('@')[2]}",
                    )
            ax.set_title(f"{model}, JSON, 1 sample/request")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if x_of == "concurrency":
                ax.set_xscale("log", base=2)
            else:
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _table(doc: dict[str, Any]) -> list[str]:
    """The title, how it was measured, and one row per cell and server."""
    meta = doc["meta"]
    lines = [
        f"# slimserve vs FastAPI and BentoML baselines ({meta['started_utc']})",
        "",
        f"{meta['cpus']} CPUs, load average {meta['loadavg_start'][0]:.2f} at start; "
        f"{meta['cell_seconds']} s per cell after {meta['warmup_seconds']} s warm-up, "
        f"{meta['repeats']} repeat(s), medians; client and server share the machine; "
        f"{meta['wall_seconds']} s in all. "
        "CPU % is of one core (200 = both of 2); server CPU per request and per sample is "
        "utime + stime of every server process over the cell over the answered requests; "
        "RSS is the process that runs the models (slimserve's or BentoML's worker; the whole "
        "process tree for the others). BentoML baselines answer "
        '`POST /predict` with `{"x": [[...]]}`; the others speak v2 JSON.',
        "",
        "| cell | server | req/s | samples/s | p50 ms | p95 ms | p99 ms | errors "
        "| server CPU % | server CPU us/request | us/sample | worker RSS MiB | client CPU % |",
        "|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    for c in doc.get("cells", []):
        m = c["median"]
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(m["errors"].items())) or "0"
        lines.append(
            f"| {c['id']} | {c['server']} | {_fmt(m['req_per_s'])} | {_fmt(m['samples_per_s'])} "
            f"| {_fmt(m['p50_ms'], 2)} | {_fmt(m['p95_ms'], 2)} | {_fmt(m['p99_ms'], 2)} "
            f"| {errors} | {_fmt(m['server_cpu_percent'], 0)} "
            f"| {_fmt(m['server_cpu_us_per_request'], 0)} "
            f"| {_fmt(m['server_cpu_us_per_sample'], 1)} | {_fmt(m['worker_rss_mib'])} "
            f"| {_fmt(m['client_cpu_percent'], 0)} |"
        )
    return lines


def _headline_lines(doc: dict[str, Any], h: dict[str, Any]) -> list[str]:
    """The ratios and latencies at the headline concurrency, the binary cell, the served /
    in-process table, start-to-ready and RSS."""
    c = h["concurrency"]
    lines = ["", "## Headline", ""]
    for model in (CNN, MLP):
        r = h["req_per_s_ratio"][model]
        ratios = "; ".join(f"/ {k} **{_fmt(v, 2)}x**" for k, v in r.items())
        lines.append(f"- req/s slimserve {ratios} ({model} JSON c={c})")
    for model in (CNN, MLP):
        per = h["server_cpu_us_per_request"][model]
        us = ", ".join(f"{k} {_fmt(v, 0)}" for k, v in per.items())
        lines.append(f"- server CPU us per request at c={c} ({model} JSON): {us}")
    for model in (CNN, MLP):
        p99 = ", ".join(f"{k} {_fmt(v, 2)}" for k, v in h["p99_ms"][model].items())
        lines.append(f"- p99 ms at c={c} ({model} JSON): {p99}")
    low = dict(h["cnn_p50_ms_at_lowest_concurrency"])
    c1 = low.pop("concurrency")
    p50 = ", ".join(f"{k} {_fmt(v, 2)}" for k, v in low.items())
    vs = h.get("cnn_p50_ratio_to_fastapi_at_lowest_concurrency")
    lines += [
        f"- p50 ms at c={c1} ({CNN} JSON): {p50}"
        + (f"; slimserve / FastAPI **{_fmt(vs, 2)}x**" if vs is not None else ""),
        f"- binary {MLP}, {BINARY_BATCH} samples/request, c=8: "
        f"{_fmt(h['binary_samples_per_s'], 0)} samples/s = "
        f"**{_fmt(h['binary_percent_of_ceiling'])}%** of in-process onnxruntime "
        f"({_fmt(doc['ceilings'][MLP][str(BINARY_BATCH)]['samples_per_s'], 0)} samples/s "
        f"at batch {BINARY_BATCH}); server CPU per sample "
        f"{_fmt(h['binary_server_cpu_us_per_sample'])} us, in-process "
        f"{_fmt(h.get('in_process_cpu_us_per_sample_b32'))} us",
        "",
        f"Served (slimserve, one-sample JSON requests, c={c}) against in-process onnxruntime "
        "(back-to-back `run()`, same session settings, same run):",
        "",
        "| model | served samples/s | in-process b1 | in-process b32 | % of b1 | % of b32 |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for target, r in h["served_vs_ceiling"].items():
        lines.append(
            f"| {target} | {_fmt(r['served_samples_per_s'], 0)} | "
            f"{_fmt(r['in_process_b1'], 0)} | {_fmt(r['in_process_b32'], 0)} | "
            f"{_fmt(r['percent_of_b1'], 0)}% | {_fmt(r['percent_of_b32'], 0)}% |"
        )
    return lines + _startup_lines(doc["startup"], h)


def _startup_lines(startup: dict[str, Any], h: dict[str, Any]) -> list[str]:
    if "skipped" in startup:
        lines = [f"- start-to-ready: skipped ({startup['skipped']})"]
    else:
        lines = [
            f"- start-to-ready with {startup['models']} models ({startup['repository']}): "
            f"**{_fmt(startup['seconds'], 2)} s** (runs: "
            + ", ".join(f"{r['seconds']:.2f}" for r in startup["runs"])
            + f"); worker RSS {_fmt(startup['worker_rss_mib'])} MiB"
        ]
    rss = ", ".join(f"{k} {_fmt(v)} MiB" for k, v in h["bench_worker_rss_mib"].items())
    return [*lines, f"- worker RSS with the benchmark models: {rss}"]


def markdown(doc: dict[str, Any]) -> str:
    """results.md: the table of every cell, then the headline, the plots and the servers."""
    h = doc.get("headline")
    lines = _table(doc)
    if h:
        lines += _headline_lines(doc, h)
    if doc.get("plots"):
        lines += ["", *(f"![{p}]({p})" for p in doc["plots"])]
    left = [p for srv in doc.get("servers", []) for p in srv["left_behind"]]
    lines += ["", f"Servers started: {len(doc.get('servers', []))}; left behind: {left or 'none'}."]
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], out: Path) -> None:
    """The plots (when there are cells), then results.json and results.md, into ``out``."""
    doc["plots"] = plot(doc, out) if doc.get("cells") else []
    (out / "results.json").write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    (out / "results.md").write_text(markdown(doc))


def results_folder(out: Path | None, suffix: str) -> Path:
    """``out``, or ``loadtest/results/<UTC time>-<suffix>``; created."""
    from datetime import UTC, datetime

    from loadtest.serving.servers import ROOT

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = out or ROOT / "loadtest" / "results" / f"{stamp}-{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save(folder: Path, doc: dict[str, Any], text: str) -> None:
    """``results.json`` and ``results.md`` (``text``) into ``folder``; the text printed."""
    (folder / "results.json").write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    (folder / "results.md").write_text(text)
    print(text)
    print(f"results in {folder}")

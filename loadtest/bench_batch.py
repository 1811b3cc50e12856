"""Batch-job benchmark: ``python -m service.batch`` against onnxruntime run in-process.

``python -m loadtest.bench_batch [--rows 1000000] [--quick] [--repo models] [--out DIR]``
tiles the digits dataset (all 1,797 images, scaled to [0, 1]) into ``--rows`` rows and writes
them as Parquet and CSV (an ``id`` column and 64 float columns ``px_0 .. px_63``, pyarrow's
defaults). For digits-mlp and digits-cnn (the ``--variant`` of each, fp32 by default), it
measures, alternating, repeated, medians:

- the in-process ceiling: one onnxruntime session (the settings the job uses) running the
  same rows already in memory, back to back, at the same batch size;
- the job: ``python -m service.batch --engine local`` from Parquet (and CSV for the MLP) in a
  subprocess, its throughput from the first chunk to the finished output file (the job's own
  summary), its wall time with start-up, and its resident memory sampled every 20 ms;
- what reading costs alone: the job's readers iterating the whole file without a model
  (Parquet decode, CSV parse), and the same job on half the rows (flat memory).

Results go to ``results.json`` and ``results.md`` in ``--out`` (default
``loadtest/results/<UTC time>/``); the markdown is copied to ``loadtest/published/batch.md``.
``--sample PATH`` only writes ``--rows`` digits rows to PATH (.parquet or .csv) and exits.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psutil
import typer

__all__ = ["digits_rows", "write_digits", "ceiling", "run_job", "read_only", "run"]

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("digits-mlp", "digits-cnn")
PUBLISHED = ROOT / "loadtest" / "published" / "batch.md"

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


# --------------------------------------------------------------------------------------------
# data


def digits_rows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows drawn (with a seed) from all 1,797 digits, pixels 0..16 divided by 16."""
    from export.data import load

    ds = load("digits")
    pool = np.concatenate([ds.x_train, ds.x_val, ds.x_test]).astype(np.float32)
    return pool[np.random.default_rng(seed).integers(0, len(pool), n)]


def write_digits(x: np.ndarray, path: Path) -> Path:
    """``id`` and ``px_0 .. px_63`` as Parquet (row groups of 65,536) or CSV, by suffix."""
    import pyarrow as pa

    table = pa.table({"id": np.arange(len(x)), **{f"px_{j}": x[:, j] for j in range(x.shape[1])}})
    if path.suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, path, row_group_size=65_536)
    return path


# --------------------------------------------------------------------------------------------
# measurements


def _session(model_path: Path) -> Any:
    from service.core.runtime import OrtSession, RuntimeOptions
    from service.core.settings import Settings

    return OrtSession(model_path, "ceiling", RuntimeOptions.from_settings(Settings()))


def ceiling(model_path: Path, x: np.ndarray, batch: int) -> float:
    """Samples/s of ``run()`` over every row of ``x`` in this process, batch after batch."""
    session = _session(model_path)
    spec = session.inputs[0]
    x = x.reshape(len(x), *spec.shape[1:])
    for lo in range(0, min(len(x), 8 * batch), batch):  # warm-up
        session.run({spec.name: x[lo : lo + batch]})
    start = time.perf_counter()
    for lo in range(0, len(x), batch):
        session.run({spec.name: x[lo : lo + batch]})
    return len(x) / (time.perf_counter() - start)


def best_batch(model_path: Path, repo: Path, model: str, variant: str) -> int:
    from service.batch.engines import calibrate_batch_size
    from service.batch.model import from_repository
    from service.core.repository import ModelRepository

    spec = from_repository(ModelRepository(repo), model, None, variant)
    return calibrate_batch_size(_session(model_path), spec, seconds_each=0.5)


def run_job(argv: list[str], work: Path) -> dict[str, Any]:
    """``python -m service.batch`` in a subprocess: its summary, wall time, sampled RSS."""
    summary = work / "summary.json"
    summary.unlink(missing_ok=True)
    command = [sys.executable, "-m", "service.batch", *argv, "--no-progress", "--overwrite"]
    command += ["--summary-json", str(summary)]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watched = psutil.Process(process.pid)
    samples: list[tuple[float, float]] = []
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss + sum(
                c.memory_info().rss for c in watched.children(recursive=True)
            )
        except psutil.Error:
            break
        if rss:  # zero once the process has exited
            samples.append((time.perf_counter() - start, rss / 2**20))
        time.sleep(0.02)
    _, err = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{err.decode()}")
    doc = json.loads(summary.read_text())
    peak = max((m for _, m in samples), default=float("nan"))
    return {
        "rows_per_s": doc["rows_per_s"],
        "compute_s": doc["compute_s"],
        "wall_s": wall,
        "peak_rss_mib": peak,
        "peak_rss_mib_self_reported": doc["peak_rss_mib"],
        "rss_quartiles_mib": _quartiles(samples),
        "batch_size": doc["batch_size"],
        "rows": doc["rows"],
        "errors": doc["errors"],
    }


def _quartiles(samples: list[tuple[float, float]]) -> list[float]:
    """Resident memory a quarter, half, three quarters of the way and at the end."""
    if not samples:
        return []
    end = samples[-1][0]
    out = []
    for q in (0.25, 0.5, 0.75, 1.0):
        out.append(round(next(m for t, m in samples if t >= q * end), 1))
    return out


def read_only(path: Path, repo: Path, model: str, variant: str) -> float:
    """Rows/s of the job's reader alone (decode or parse, checks, conversion), no model."""
    from service.batch.model import from_repository
    from service.batch.readers import InputOptions, open_reader
    from service.core.repository import ModelRepository

    spec = from_repository(ModelRepository(repo), model, None, variant)
    reader = open_reader(InputOptions(path), spec)
    start = time.perf_counter()
    rows = sum(c.stop - c.start for c in reader.chunks())
    reader.close()
    return rows / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class Options:
    rows: int
    repeats: int
    repo: Path
    variant: str
    out: Path
    quick: bool
    csv: bool = True


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("onnxruntime", "pyarrow", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _repository(repo: Path, work: Path) -> tuple[Path, list[str]]:
    """``repo`` when it has the digits models, else digits-mlp built into ``work``."""
    from service.core.repository import ModelRepository

    present = [m for m in MODELS if m in ModelRepository(repo).names()]
    if present:
        return repo, present
    built = work / "models"
    subprocess.run(
        [sys.executable, "-m", "export", "build", "--only", "digits-mlp", "--repo", str(built)],
        cwd=ROOT,
        check=True,
    )
    return built, ["digits-mlp"]


def run(opts: Options) -> dict[str, Any]:
    from service.core.repository import ModelRepository

    opts.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        repo, models = _repository(opts.repo, work)
        doc: dict[str, Any] = {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "rows": opts.rows,
            "repeats": opts.repeats,
            "variant": opts.variant,
            "repository": str(repo),
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "versions": _versions(),
            "models": {},
        }
        print(f"{opts.rows:,} digits rows; load average {os.getloadavg()[0]:.2f}", flush=True)
        x = digits_rows(opts.rows)
        parquet = write_digits(x, work / "digits.parquet")
        csv = write_digits(x, work / "digits.csv") if opts.csv else None
        half = write_digits(x[: max(1, opts.rows // 2)], work / "digits-half.parquet")
        doc["input_bytes"] = {"parquet": parquet.stat().st_size}
        if csv:
            doc["input_bytes"]["csv"] = csv.stat().st_size
        for model in models:
            entry = ModelRepository(repo).get(model)
            path = entry.variant_path(opts.variant)
            batch = best_batch(path, repo, model, opts.variant)
            common = ["--model", model, "--variant", opts.variant, "--repo", str(repo)]
            common += ["--batch-size", str(batch)]
            result: dict[str, Any] = {
                "version": entry.version,
                "variant": opts.variant,
                "default_variant": entry.manifest.default_variant,
                "batch_size": batch,
                "ceiling": [],
                "parquet": [],
                "csv": [],
            }
            for r in range(opts.repeats):
                result["ceiling"].append(ceiling(path, x, batch))
                result["parquet"].append(
                    run_job(
                        common + ["--input", str(parquet), "--output", str(work / "o.parquet")],
                        work,
                    )
                )
                if csv and model == "digits-mlp":
                    result["csv"].append(
                        run_job(
                            common + ["--input", str(csv), "--output", str(work / "o.parquet")],
                            work,
                        )
                    )
                print(
                    f"{model} repeat {r + 1}: ceiling {result['ceiling'][-1]:,.0f}/s, parquet job "
                    f"{result['parquet'][-1]['rows_per_s']:,.0f}/s",
                    flush=True,
                )
            if model == "digits-mlp":
                result["half"] = run_job(
                    common + ["--input", str(half), "--output", str(work / "o.parquet")], work
                )
                result["read_only"] = {"parquet": [read_only(parquet, repo, model, opts.variant)]}
                if csv:
                    result["read_only"]["csv"] = [read_only(csv, repo, model, opts.variant)]
            result["summary"] = _summarise(result)
            doc["models"][model] = result
        doc["load_average_at_end"] = os.getloadavg()
        (opts.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
        (opts.out / "results.md").write_text(markdown(doc))
        return doc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _summarise(result: dict[str, Any]) -> dict[str, Any]:
    top = _median(result["ceiling"])
    out: dict[str, Any] = {"ceiling": top}
    for kind in ("parquet", "csv"):
        runs = result[kind]
        if not runs:
            continue
        rate = _median([r["rows_per_s"] for r in runs])
        out[kind] = {
            "rows_per_s": rate,
            "ratio": rate / top,
            "wall_s": _median([r["wall_s"] for r in runs]),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "rss_quartiles_mib": runs[0]["rss_quartiles_mib"],
        }
    return out


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


_HEADER = (
    "| model, input | batch | in-process onnxruntime samples/s | job samples/s | ratio "
    "| job wall time | peak RSS (sampled) | RSS at 25/50/75/100% of the run |"
)


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    start, end = doc["load_average_at_start"][0], doc["load_average_at_end"][0]
    lines = [
        f"# Batch jobs: {rows:,} digits rows, local engine ({doc['started_at']})",
        "",
        f"{doc['cpus']} CPUs, load average {start:.2f} at the start and {end:.2f} at the end; "
        f"{doc['repeats']} repeat(s), medians; variant {doc['variant']}; {versions}.",
        "The job's samples/s run from its first chunk to its finished output file (read, check,",
        "infer, write, commit); wall time adds start-up (imports, model load). The in-process",
        "figure is onnxruntime alone on the same rows already in memory, at the same batch size.",
        "",
        _HEADER,
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for model, result in doc["models"].items():
        s = result["summary"]
        for kind in ("parquet", "csv"):
            if kind not in s:
                continue
            k = s[kind]
            quartiles = " / ".join(_fmt(v) for v in k["rss_quartiles_mib"])
            name = f"{model} v{result['version']} {result['variant']}, {kind}"
            lines.append(
                f"| {name} | {result['batch_size']} | {_fmt(s['ceiling'])} "
                f"| {_fmt(k['rows_per_s'])} | **{k['ratio']:.0%}** | {k['wall_s']:.2f} s "
                f"| {_fmt(k['peak_rss_mib'])} MiB | {quartiles} MiB |"
            )
    mlp = doc["models"].get("digits-mlp")
    if mlp and "read_only" in mlp:
        ro = mlp["read_only"]
        sizes = doc["input_bytes"]
        parquet_rate = ro["parquet"][0]
        lines += [
            "",
            "Reading alone (the job's reader over the whole file without a model: decode or parse,",
            "checks, conversion to the model's rows):",
            "",
            "| input | bytes | rows/s | seconds per 1,000,000 rows |",
            "|---|--:|--:|--:|",
            f"| Parquet | {_fmt(sizes['parquet'])} | {_fmt(parquet_rate)} "
            f"| {1e6 / parquet_rate:.2f} |",
        ]
        if "csv" in ro:
            csv_rate = ro["csv"][0]
            extra = 1e6 / csv_rate - 1e6 / parquet_rate
            lines += [
                f"| CSV | {_fmt(sizes['csv'])} | {_fmt(csv_rate)} | {1e6 / csv_rate:.2f} |",
                "",
                f"CSV parsing costs {extra:.2f} s more per 1,000,000 rows than Parquet decoding "
                f"({parquet_rate / csv_rate:.1f}x slower to read).",
            ]
        half, full = mlp["half"], mlp["summary"]["parquet"]
        lines += [
            "",
            f"Flat memory: the same MLP job on {half['rows']:,} rows peaked at "
            f"{_fmt(half['peak_rss_mib'])} MiB, on {rows:,} rows at "
            f"{_fmt(full['peak_rss_mib'])} MiB (the chunks in flight bound it, not the input).",
        ]
    lines.append("")
    return "\n".join(lines)


@app.command()
def main(
    rows: Annotated[
        int, typer.Option(help="Rows of digits [default: 1,000,000; quick 50,000].")
    ] = 0,
    quick: Annotated[bool, typer.Option(help="50,000 rows, one repeat: a smoke run.")] = False,
    repeats: Annotated[int, typer.Option(help="Measurements per cell [default: 3, quick 1].")] = 0,
    repo: Annotated[
        Path, typer.Option(help="Model repository with digits-mlp / digits-cnn.")
    ] = ROOT / "models",
    variant: Annotated[str, typer.Option(help="The variant of each model to run.")] = "fp32",
    out: Annotated[
        Path | None, typer.Option(help="Results folder [default: loadtest/results/<UTC time>].")
    ] = None,
    publish: Annotated[
        bool, typer.Option(help="Copy results.md to loadtest/published/batch.md.")
    ] = True,
    sample: Annotated[
        Path | None, typer.Option(help="Only write --rows digits rows to this .parquet/.csv.")
    ] = None,
) -> None:
    """Measure, write results.json and results.md, print the markdown."""
    n = rows or (50_000 if quick else 1_000_000)
    if sample is not None:
        sample.parent.mkdir(parents=True, exist_ok=True)
        write_digits(digits_rows(n), sample)
        print(f"{n:,} digits rows -> {sample}")
        return
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    opts = Options(
        rows=n,
        repeats=repeats or (1 if quick else 3),
        repo=repo,
        variant=variant,
        out=out or ROOT / "loadtest" / "results" / stamp,
        quick=quick,
    )
    run(opts)
    text = (opts.out / "results.md").read_text()
    print(text)
    if publish and not quick:
        PUBLISHED.write_text(text)
        print(f"results in {opts.out}; published to {PUBLISHED}")
    else:
        print(f"results in {opts.out}")


if __name__ == "__main__":
    app()

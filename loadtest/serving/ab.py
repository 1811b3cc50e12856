"""slimserve before and after a change, side by side: ``make bench-ab BASE=<git rev>``.

Runs slimserve from a git worktree of ``BASE`` and from this checkout, alternately (the order
flips every repeat), on the headline cells: the digits CNN with one-sample JSON requests at 1
and 64 clients, the 784-2048-2048-10 MLP at 64, and 32-sample binary requests. Same
repository, same load generator, same machine minute: what differs between the two columns is
the code. Per cell it reports medians of req/s, p50/p99, and the server's CPU microseconds per
request, and the ratio after/before. Results go to ``results.json`` and ``results.md`` in
``--out`` (default ``loadtest/results/<UTC time>-ab``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest.serving.cells import BINARY_CELL, Cell, Options, alternate
from loadtest.serving.report import results_folder, save
from loadtest.serving.servers import (
    CNN,
    MLP,
    ROOT,
    ServerProcess,
    build_repository,
    slimserve,
    stop_live,
)

__all__ = ["CELLS", "app", "run"]

CELLS = [Cell(CNN, "json", 1), Cell(CNN, "json", 64), Cell(MLP, "json", 64), BINARY_CELL]
_COLUMNS = ("req_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request")

app = typer.Typer(add_completion=False, help=(__doc__ or "").splitlines()[0])


def _rev(checkout: Path, rev: str = "HEAD") -> str:
    out = subprocess.run(["git", "rev-parse", "--short", rev], cwd=checkout, capture_output=True)
    return out.stdout.decode().strip() or "?"


def run(base: str, opts: Options, head: str | None = None) -> dict[str, Any]:
    """Both checkouts, ``opts.repeats`` times each, alternating; returns what results.json
    holds. ``head`` (a revision) replaces this checkout as the "after" side."""
    work = Path(tempfile.mkdtemp(prefix="slimserve-ab-"))
    trees = {"before": (work / "base", base)}
    if head is not None:
        trees["after"] = (work / "head", head)
    for tree, rev in trees.values():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True)
    labels = {"before": trees["before"][0], "after": trees["after"][0] if head else ROOT}
    doc: dict[str, Any] = {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
        "before": f"{base} ({_rev(labels['before'])})",
        "after": f"{head} ({_rev(labels['after'])})"
        if head
        else f"this checkout ({_rev(ROOT)}{', with changes' if _dirty() else ''})",
        "repeats": opts.repeats,
        "cell_seconds": opts.cell_seconds,
    }
    repo = work / "models"

    def side(label: str) -> Callable[[Path], ServerProcess]:
        return lambda log: slimserve(repo, work, log, labels[label], label)

    try:
        build_repository(repo)
        doc["cells"] = alternate(opts, CELLS, {label: side(label) for label in labels})
    finally:
        stop_live()
        for tree, _ in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
        shutil.rmtree(work, ignore_errors=True)
    doc["loadavg_end"] = os.getloadavg()
    return doc


def _dirty() -> bool:
    out = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True)
    return bool(out.stdout.strip())


def markdown(doc: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in doc["loadavg_start"])
    lines = [
        f"# slimserve before / after ({doc['started_utc']})",
        "",
        f"before: {doc['before']}; after: {doc['after']}. {doc['repeats']} repeats of "
        f"{doc['cell_seconds']} s per cell, the order flipped every repeat, medians; load "
        f"average {load} at start. CPU us/request: utime + stime of every server process over "
        "the window / answered requests.",
        "",
        "| cell | | req/s | p50 ms | p99 ms | server CPU us/request |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for cell, by in doc["cells"].items():
        for label in ("before", "after"):
            m = by[label]
            lines.append(
                f"| {cell} | {label} | {m['req_per_s']:,.0f} | {m['p50_ms']:.2f} | "
                f"{m['p99_ms']:.2f} | {m['server_cpu_us_per_request']:,.0f} |"
            )
        ratios = [by["after"][k] / by["before"][k] for k in _COLUMNS]
        lines.append(
            f"| {cell} | after / before | {ratios[0]:.2f}x | {ratios[1]:.2f}x | "
            f"{ratios[2]:.2f}x | {ratios[3]:.2f}x |"
        )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    base: Annotated[str, typer.Option(help="The git revision to compare against.")],
    head: Annotated[
        str | None, typer.Option(help="A revision for the after side [default: this checkout].")
    ] = None,
    repeats: Annotated[int, typer.Option(help="Rounds over both checkouts.")] = 4,
    cell_seconds: Annotated[float, typer.Option(help="Measured seconds per cell.")] = 3.0,
    warmup_seconds: Annotated[float, typer.Option(help="Warm-up seconds per cell.")] = 1.0,
    out: Annotated[Path | None, typer.Option(help="Results folder.")] = None,
) -> None:
    """Run slimserve at BASE and in this checkout, alternately; write results.json/.md."""
    folder = results_folder(out, "ab")
    opts = Options(folder, cell_seconds, warmup_seconds, repeats, False, ROOT, False)
    doc = run(base, opts, head)
    save(folder, doc, markdown(doc))


if __name__ == "__main__":
    app()

"""``python -m export``: build the zoo into a model repository, import ONNX files, list, verify."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from service.core.repository import TASKS, ModelRepository, RepositoryError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train, export, verify and register slimserve's models.",
)
# a pipe or CI log has no width; rich would then squeeze tables to 80 columns
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)  # never break a path across lines

RepoOption = Annotated[
    Path,
    typer.Option(
        "--repo",
        envvar="SLIMSERVE_MODEL_REPOSITORY",
        help="Model repository folder.",
        show_default=True,
    ),
]


def _quiet() -> None:
    """The exporter's warnings about optional torchvision ops and deprecations are noise here."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _fmt_metric(headline: tuple[str, float] | None) -> str:
    return f"{headline[0]}={headline[1]:.4g}" if headline else "-"


@app.command()
def build(
    repo: RepoOption = Path("models"),
    only: Annotated[
        list[str] | None, typer.Option(help="Build only this model (repeatable).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for splits, initialisation and sampling.")] = 0,
    force: Annotated[bool, typer.Option(help="Rebuild even when nothing changed.")] = False,
    compress: Annotated[
        bool, typer.Option(help="Build, measure and choose compressed variants.")
    ] = True,
    max_accuracy_drop: Annotated[
        float,
        typer.Option(help="Budget: absolute drop allowed in accuracy-like metrics (0.01 = 1 pt)."),
    ] = 0.01,
    max_error_increase: Annotated[
        float, typer.Option(help="Budget: relative increase allowed in RMSE-like errors.")
    ] = 0.02,
    calibration_method: Annotated[
        str, typer.Option(help="Static INT8 calibration: minmax, entropy or percentile.")
    ] = "minmax",
    text_sample: Annotated[
        int | None,
        typer.Option(help="Text models: at most this many documents per split (a quick build)."),
    ] = None,
) -> None:
    """Build the zoo (or --only some models) into REPO; unchanged models are skipped."""
    _quiet()
    from . import build as builder
    from . import zoo
    from .compress import StaticConfig
    from .selection import Budget

    try:
        specs = zoo.plan(only or ())
        options = builder.BuildOptions(
            budget=Budget(max_accuracy_drop, max_error_increase),
            static=StaticConfig(method=calibration_method),
            compress=compress,
            text_sample=text_sample,
        )
    except KeyError as exc:
        err.print(f"[red]error:[/] {escape(str(exc.args[0]))}")
        raise typer.Exit(2) from None
    except ValueError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    repository = ModelRepository(repo)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("building", total=len(specs))

        def on_start(spec: zoo.ModelSpec) -> None:
            progress.update(task, description=f"{spec.name} ({spec.family})")

        def on_done(o: builder.BuildOutcome) -> None:
            mark = "[green]built[/]" if o.status == "built" else "[dim]unchanged[/]"
            progress.console.print(
                f"{mark} {o.name} v{o.version}  {_fmt_metric(o.headline)}  {o.seconds:.1f}s"
            )
            progress.advance(task)

        try:
            outcomes = builder.build(
                repository, only or (), seed, force, on_start, on_done, options
            )
        except (builder.ExportError, RepositoryError) as exc:
            progress.stop()
            err.print(f"[red]build failed:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
    built = sum(o.status == "built" for o in outcomes)
    console.print(f"{built} built, {len(outcomes) - built} unchanged, repository {repo}")


@app.command("import")
def import_model(
    path: Annotated[Path, typer.Argument(help="The ONNX file to register.", show_default=False)],
    name: Annotated[str, typer.Option("--name", help="Model name in the repository.")],
    repo: RepoOption = Path("models"),
    task: Annotated[str, typer.Option(help=f"One of: {', '.join(TASKS)}.")] = "unknown",
    description: Annotated[str, typer.Option(help="A line about the model.")] = "",
    labels: Annotated[
        str | None, typer.Option(help="Class labels, comma-separated (e.g. cat,dog).")
    ] = None,
) -> None:
    """Register an ONNX file as the next version of NAME; an identical file is skipped."""
    from .importer import ModelImportError, import_onnx

    repository = ModelRepository(repo)
    label_list = [s.strip() for s in labels.split(",") if s.strip()] if labels else None
    try:
        before = repository.versions(name)[-1]
    except RepositoryError:
        before = None
    try:
        model = import_onnx(path, name, repository, task, description, label_list)
    except ModelImportError as exc:
        err.print(f"[red]import failed:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    m = model.manifest
    if model.version == before:
        console.print(
            f"unchanged: {escape(str(path))} is already {m.name} v{m.version} "
            f"(same sha256 {m.fingerprint[:12]}...); nothing imported",
            highlight=False,
        )
        return
    signature = ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in m.inputs)
    console.print(
        f"imported {escape(str(path))} as {m.name} v{m.version} into {escape(str(repo))}: "
        f"inputs {escape(signature)}; {len(m.outputs)} output(s)",
        highlight=False,
    )


@app.command("list")
def list_models(repo: RepoOption = Path("models")) -> None:
    """Print the repository: name, version, task, inputs, headline metric, size."""
    repository = ModelRepository(repo)
    entries = repository.scan(verify=False)
    if not entries:
        err.print(f"no models in {repo} (run `make models`)")
        raise typer.Exit(1)
    table = Table(title=f"model repository {repo}")
    for col in ("name", "version", "task", "inputs", "headline metric", "default", "size"):
        table.add_column(
            col, justify="right" if col in ("version", "size") else "left", no_wrap=col != "inputs"
        )
    for e in entries:
        if e.model is None:
            table.add_row(e.name, str(e.version), "[red]unreadable[/]", str(e.error), "", "", "")
            continue
        m = e.model.manifest
        inputs = ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in m.inputs)
        size = sum(f.bytes for f in m.files.values())
        table.add_row(
            m.name,
            str(m.version),
            m.task,
            inputs,
            _fmt_metric(m.headline),
            m.default_variant,
            _human(size),
        )
    console.print(table)


@app.command()
def verify(
    names: Annotated[
        list[str] | None, typer.Argument(help="Models to check (default: all).")
    ] = None,
    repo: RepoOption = Path("models"),
) -> None:
    """Check every file's sha256 and that onnxruntime loads each model; exit 1 on any failure."""
    from .verify import ort_runner

    repository = ModelRepository(repo)
    failures = 0
    for name in names or repository.names():
        try:
            model = repository.get(name)
            model.verify()
            for variant in model.manifest.variants.values():
                if variant.file and variant.available:
                    ort_runner(model.path / variant.file)
        except RepositoryError as exc:
            failures += 1
            err.print(f"[red]FAIL[/] {escape(name)}: {escape(str(exc))}")
        except Exception as exc:  # onnxruntime raises its own types for unloadable graphs
            failures += 1
            err.print(
                f"[red]FAIL[/] {escape(name)}: onnxruntime cannot load it: {escape(str(exc))}"
            )
        else:
            console.print(f"[green]ok[/]   {name} v{model.version}")
    raise typer.Exit(1 if failures else 0)


@app.command()
def report(
    names: Annotated[
        list[str] | None, typer.Argument(help="Models to report (default: all).")
    ] = None,
    repo: RepoOption = Path("models"),
    summary_file: Annotated[
        Path | None,
        typer.Option(
            "--summary", help="Where to write the summary table (default REPO/REPORT.md)."
        ),
    ] = None,
) -> None:
    """Write each model's variant card (markdown) and accuracy-vs-latency plot into its latest
    version folder, and a summary table over the models; print the summary."""
    from .report import CARD_FILE, summary, write_card

    repository = ModelRepository(repo)
    manifests = []
    for name in names or repository.names():
        try:
            model = repository.get(name)
        except RepositoryError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None
        m = model.manifest
        if CARD_FILE not in m.files:
            # the build writes (and hashes) the card; versions built without one get it here,
            # rendered from the manifest, never overwriting a hashed file
            write_card(model.path, m)
        manifests.append(m)
    table = summary(manifests)
    target = summary_file or Path(repo) / "REPORT.md"
    target.write_text("# Compression summary\n\n" + table, encoding="utf-8")
    console.print(table, highlight=False, markup=False)
    console.print(f"cards in each version folder; summary in {target}")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def main() -> None:
    app(prog_name="python -m export")


if __name__ == "__main__":
    main()

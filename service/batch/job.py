"""A batch job: read chunks, run the model, commit each chunk, resume after a crash.

Layout while a job runs (``--output scores.parquet``)::

    scores.parquet.partial/          the work folder
        journal.json                 what is committed: replaced atomically after every chunk
        part-000000.arrow ...        every committed chunk's output rows (Arrow IPC)
        errors.jsonl                 bad rows so far, one JSON object per line
        output.tmp                   the output file, written as chunks are committed

A chunk is committed by writing its part to a temporary name, renaming it into place, appending
its bad rows to ``errors.jsonl`` and then replacing ``journal.json`` (each fsync'ed); then its
rows go to ``output.tmp``. A job killed at any point -- Ctrl-C, SIGTERM, SIGKILL, a power cut
-- resumes with ``--resume`` at the chunk after the last one in the journal: the errors file
is cut back to the journal's length, later parts are dropped, and ``output.tmp`` is written
again from the committed parts, so no row is lost or written twice. When every chunk is
committed ``output.tmp`` is finished and renamed to ``scores.parquet``, the errors move to
``scores.parquet.errors.jsonl``, and the work folder goes.

An output path ending in ``/`` (or an existing folder) keeps the parts as the result: a
dataset folder that pandas, pyarrow, Spark or Ray read as one table, with ``_journal.json``
while the job runs, ``_errors.jsonl``, and ``_SUCCESS`` when it is complete.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .engines import ENGINES, Engine, Result, background_priority
from .errors import AlreadyComplete, Interrupted, JobFailed, SetupError, TooManyErrors
from .model import ModelSpec, from_repository
from .progress import Progress, Summary, peak_rss_mib
from .readers import DEFAULT_CHUNK_ROWS, InputOptions, Reader, open_reader
from .writers import (
    OutputSchema,
    Writer,
    fsync_file,
    output_format,
    read_work_part,
    write_work_part,
    writer_for,
)

__all__ = ["JobConfig", "run_job", "JOURNAL_FORMAT"]

log = logging.getLogger("slimserve.batch")

JOURNAL_FORMAT = "slimserve.batch-journal/1"
_QUEUE_DEPTH = 2


@dataclass
class JobConfig:
    """Everything ``python -m service.batch`` takes; checks itself."""

    model: str
    input: Path
    output: Path
    engine: str = "local"
    repo: Path | None = None  # None: SLIMSERVE_MODEL_REPOSITORY (settings), default models/
    version: int | None = None
    variant: str | None = None
    input_format: str | None = None
    output_format: str | None = None
    features: tuple[str, ...] | None = None
    id_column: str | None = None
    header: bool = True
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    batch_size: int | None = None  # None: the model's best (local, ray) or 512 (http)
    max_error_rate: float = 0.01
    errors_path: Path | None = None  # None: <output>.errors.jsonl
    resume: bool = False
    overwrite: bool = False
    url: str | None = None  # http engine; None: the settings' host and port
    concurrency: int = 4
    retries: int = 5
    timeout_s: float = 60.0
    retry_backoff_s: float = 0.5  # the first wait; doubled at every retry (with jitter)
    ray_address: str | None = None
    ray_actors: int | None = None
    ray_cpus: int | None = None
    threads: int | None = None  # onnxruntime intra-op threads; None: the settings'
    progress: bool = True
    summary_json: Path | None = None
    #: keep one part file per chunk in the folder ``output``; None: when ``output`` is given
    #: as a string ending in "/" or names an existing folder
    folder_output: bool | None = None

    def __post_init__(self) -> None:
        if self.folder_output is None:
            text = str(self.output)  # a Path has already lost a trailing "/"
            self.folder_output = text.endswith(("/", os.sep)) or Path(text).is_dir()
        self.input, self.output = Path(self.input), Path(self.output)
        if self.engine not in ENGINES:
            raise SetupError(f"--engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise SetupError(f"--max-error-rate: expected 0..1, got {self.max_error_rate}")
        for name in ("chunk_rows", "concurrency"):
            if getattr(self, name) < 1:
                raise SetupError(
                    f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}"
                )
        if self.batch_size is not None and self.batch_size < 1:
            raise SetupError(f"--batch-size: expected >= 1, got {self.batch_size}")
        if self.retries < 0:
            raise SetupError(f"--retries: expected >= 0, got {self.retries}")
        if self.resume and self.overwrite:
            raise SetupError("--resume and --overwrite contradict each other; pass one")


# --------------------------------------------------------------------------------------------
# where things go


@dataclass
class _Layout:
    output: Path
    work: Path
    journal: Path
    errors_work: Path
    errors_final: Path
    folder: bool

    @classmethod
    def of(cls, config: JobConfig) -> _Layout:
        out = config.output
        if config.folder_output:
            errors = config.errors_path or out / "_errors.jsonl"
            return cls(out, out, out / "_journal.json", out / "_errors.jsonl", errors, True)
        work = out.with_name(out.name + ".partial")
        errors = config.errors_path or out.with_name(out.name + ".errors.jsonl")
        return cls(out, work, work / "journal.json", work / "errors.jsonl", errors, False)

    def suffix(self, writer: Writer) -> str:
        """Folder output keeps parts in the output format; a file output keeps Arrow IPC."""
        return writer.suffix if self.folder else ".arrow"

    def part(self, index: int, writer: Writer) -> Path:
        return self.work / f"part-{index:06d}{self.suffix(writer)}"

    def parts(self, count: int, writer: Writer) -> list[Path]:
        return [self.part(i, writer) for i in range(count)]

    @property
    def output_tmp(self) -> Path:
        return self.work / "output.tmp"


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_journal(path: Path) -> dict[str, Any]:
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise SetupError(
            f"journal {path} is not readable ({exc}); start over with --overwrite"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != JOURNAL_FORMAT:
        raise SetupError(
            f"journal {path} is not a {JOURNAL_FORMAT} journal; start over with --overwrite"
        )
    return doc


def _check_output(config: JobConfig, layout: _Layout) -> dict[str, Any] | None:
    """Refuse to clobber, find the journal to resume; returns it (or None for a fresh job)."""
    out = layout.output
    anchor = out if layout.folder and out.exists() else out.parent
    if not anchor.is_dir():
        raise SetupError(f"output {out}: the folder {anchor} does not exist")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise SetupError(f"output {out}: the folder {anchor} is not writable (permissions)")
    if not layout.folder and out.is_dir():
        raise SetupError(
            f"output {out} is a folder; end the path with / to write part files into it"
        )
    journal = layout.journal if layout.journal.exists() else None
    if config.resume:
        if journal is not None:
            return _read_journal(journal)
        if layout.folder and (out / "_SUCCESS").exists() or not layout.folder and out.exists():
            return {"complete": True}
        return None
    if journal is not None and not config.overwrite:
        doc = _read_journal(journal)
        raise SetupError(
            f"output {out}: {layout.work} holds an unfinished job ({doc.get('next_chunk', 0)} of "
            f"{doc.get('chunks', '?')} chunks committed); pass --resume to continue it or "
            "--overwrite to start over"
        )
    exists = out.is_dir() and any(out.iterdir()) if layout.folder else out.exists()
    if exists and not config.overwrite:
        raise SetupError(f"output {out} already exists; pass --overwrite to replace it")
    return None


def _prepare_work(layout: _Layout, fresh: bool) -> None:
    """Create the work folder (clearing it for a fresh job); :class:`SetupError` if unwritable."""
    try:
        if fresh and layout.work.exists() and not layout.folder:
            shutil.rmtree(layout.work)
        if fresh and layout.folder and layout.work.exists():
            for entry in layout.work.iterdir():
                if entry.is_file() and (entry.name.startswith(("part-", "_"))):
                    entry.unlink()
        layout.work.mkdir(parents=False, exist_ok=True)
        probe = layout.work / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SetupError(
            f"output {layout.output}: cannot write {layout.work} ({exc.strerror or exc})"
        ) from None


# --------------------------------------------------------------------------------------------
# the job


def _identity(
    config: JobConfig, model: ModelSpec, reader: Reader, fmt: str, schema: OutputSchema
) -> dict[str, Any]:
    """What must not change between a job and its resumption."""
    return {
        "model": model.name,
        "version": model.version,
        "variant": model.variant,
        "input": reader.describe(),
        "chunk_rows": config.chunk_rows,
        "output_format": fmt,
        "columns": schema.to_dict(),
    }


def _compare(old: dict[str, Any], new: dict[str, Any], layout: _Layout) -> None:
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        detail = "; ".join(f"{k}: was {old.get(k)!r}, now {new[k]!r}" for k in changed[:3])
        raise SetupError(
            f"cannot resume {layout.work}: the job changed ({detail}); run the original "
            "command again, or start over with --overwrite"
        )


def _make_engine(config: JobConfig, journal: dict[str, Any] | None) -> tuple[Engine, ModelSpec]:
    from service.core.repository import ModelRepository
    from service.core.runtime import RuntimeOptions
    from service.core.settings import get_settings

    settings = get_settings()
    repo = ModelRepository(config.repo or settings.model_repository)
    job = (journal or {}).get("job", {})
    version, variant = config.version, config.variant
    if job:
        for name, mine in (("version", version), ("variant", variant)):
            if mine is not None and mine != job.get(name):
                raise SetupError(
                    f"cannot resume: the job ran {name} {job.get(name)!r}, this command asks "
                    f"for {mine!r}; start over with --overwrite"
                )
        version, variant = job.get("version"), job.get("variant")
    batch_size = config.batch_size or (journal or {}).get("batch_size")
    if config.engine == "http":
        from .engines import HttpEngine

        local = None
        if (repo.root / config.model).is_dir():
            try:
                local = from_repository(repo, config.model, version, variant)
            except SetupError:
                local = None
        url = config.url or f"http://{settings.host}:{settings.port}"
        engine: Engine = HttpEngine(
            url,
            config.model,
            version,
            variant,
            batch_size,
            config.concurrency,
            config.retries,
            config.timeout_s,
            config.retry_backoff_s,
            local=local,
        )
        return engine, engine.open()
    model = from_repository(repo, config.model, version, variant)
    if config.engine == "ray":
        try:
            from .ray_engine import RayEngine
        except ImportError as exc:
            raise SetupError(
                f"--engine ray needs Ray Data ({exc}): pip install 'slimserve[batch-ray]'"
            ) from None
        engine = RayEngine(
            model, config.ray_address, config.ray_actors, batch_size, config.ray_cpus
        )
    else:
        from .engines import LocalEngine

        options = RuntimeOptions.from_settings(settings)
        if config.threads is not None:
            options.intra_op_threads = config.threads
        engine = LocalEngine(model, options, batch_size)
    return engine, model


def _values(
    result: Result, schema: OutputSchema, model: ModelSpec, id_name: str | None
) -> dict[str, np.ndarray]:
    """The output columns of one result, every one with ``result.predicted`` rows."""
    n = result.predicted
    values: dict[str, np.ndarray] = {"row": result.rows}
    if id_name is not None:
        assert result.ids is not None
        values[id_name] = result.ids
    for out in model.columns():
        v = result.outputs[out.output]
        values[out.column] = v.reshape(n, out.width) if out.width > 1 else v.reshape(n)
    labels = model.label_names()
    if labels is not None:
        index = result.outputs["label"].reshape(n).astype(np.int64)
        names = np.array([*labels, ""], dtype=object)
        index = np.where((index >= 0) & (index < len(labels)), index, len(labels))
        values["label_name"] = names[index]
    for column in schema.columns:
        if column.text:
            values[column.name] = np.asarray(values[column.name], dtype=object)
    return values


class _Committer:
    """Writes results in a background thread (parts, errors, journal) while the model runs."""

    def __init__(
        self,
        layout: _Layout,
        writer: Writer,
        journal: dict[str, Any],
        progress: Progress,
        schema: OutputSchema,
        model: ModelSpec,
        id_name: str | None,
        run_started: float,
    ) -> None:
        self.layout, self.writer, self.journal = layout, writer, journal
        self.progress, self.schema, self.model, self.id_name = progress, schema, model, id_name
        self.run_started = run_started
        self.error: BaseException | None = None
        self._queue: queue.Queue[Result | None] = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._errors = open(layout.errors_work, "ab")  # noqa: SIM115 - closed in join()
        self._thread = threading.Thread(
            target=self._run, name="slimserve-batch-commit", daemon=True
        )
        self._thread.start()

    def put(self, result: Result) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._queue.put(result, timeout=0.2)
                return
            except queue.Full:
                continue

    def join(self) -> None:
        """Commit what is queued, then stop; raise what went wrong in the thread."""
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._errors.close()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        background_priority()
        try:
            while (result := self._queue.get()) is not None:
                self._commit(result)
        except BaseException as exc:  # handed to the main thread
            self.error = exc
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break

    def _commit(self, result: Result) -> None:
        journal = self.journal
        if result.index != journal["next_chunk"]:
            raise JobFailed(f"chunk {result.index} arrived, chunk {journal['next_chunk']} was due")
        part = self.layout.part(result.index, self.writer)
        tmp = part.with_name(part.name + ".tmp")
        values = _values(result, self.schema, self.model, self.id_name)
        table = None
        try:
            if self.layout.folder:
                self.writer.write_part(values, tmp)
            else:
                table = write_work_part(values, self.schema, tmp)
            fsync_file(tmp)
            os.replace(tmp, part)
            if result.errors:
                self._errors.write(
                    b"".join(
                        orjson.dumps(
                            {"row": e.row, "id": e.id, "reason": e.reason},
                            option=orjson.OPT_APPEND_NEWLINE,
                        )
                        for e in result.errors
                    )
                )
                self._errors.flush()
                os.fsync(self._errors.fileno())
        except OSError as exc:
            raise JobFailed(f"cannot write {self.layout.work}: {exc}") from None
        rows = result.stop - result.start
        journal["next_chunk"] = result.index + 1
        journal["rows"] += rows
        journal["predicted"] += result.predicted
        journal["errors"] += len(result.errors)
        journal["errors_bytes"] = self._errors.tell()
        journal["elapsed_s"] = journal["elapsed_before_s"] + time.perf_counter() - self.run_started
        journal["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        _write_json_atomic(self.layout.journal, journal)
        if not self.layout.folder and self.writer.streaming:
            self.writer.add(values, table)
        self.progress.advance(rows, journal["errors"])


@contextmanager
def _signals_raise() -> Any:
    """SIGTERM raises :class:`Interrupted` in the main thread (as Ctrl-C raises
    KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted("terminated (SIGTERM)", signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_job(config: JobConfig, stream: Any = None) -> Summary:
    """Run (or resume) one job; raises a :class:`BatchError` subclass when it cannot finish."""
    started = time.perf_counter()
    stream = stream or sys.stderr
    layout = _Layout.of(config)
    with _signals_raise():
        try:
            if not config.input.exists():  # before any model or server is looked at
                raise SetupError(f"input {config.input} does not exist")
            journal = _check_output(config, layout)
            if journal and journal.get("complete"):
                raise AlreadyComplete(f"{layout.output} is complete; nothing to resume")
            engine, model = _make_engine(config, journal)
            try:
                return _run(config, layout, journal, engine, model, started, stream)
            finally:
                engine.close()
        except KeyboardInterrupt:  # Ctrl-C before the first chunk: nothing to keep
            raise Interrupted("interrupted (Ctrl-C)", signal.SIGINT) from None


def _run(
    config: JobConfig,
    layout: _Layout,
    journal: dict[str, Any] | None,
    engine: Engine,
    model: ModelSpec,
    started: float,
    stream: Any,
) -> Summary:
    options = InputOptions(
        config.input,
        config.input_format,
        config.features,
        config.id_column,
        config.header,
        config.chunk_rows,
    )
    reader = open_reader(options, model)
    try:
        fmt = output_format(layout.output, config.output_format, layout.folder)
        schema = OutputSchema.build(model, reader.id_name, reader.id_kind)
        writer = writer_for(fmt, schema)
        identity = _identity(config, model, reader, fmt, schema)
        if journal is not None:
            _compare(journal["job"], identity, layout)
        if config.engine != "http":
            engine.open()
        _prepare_work(layout, fresh=journal is None)
        if journal is None:
            journal = {
                "format": JOURNAL_FORMAT,
                "job": identity,
                "chunks": reader.n_chunks,
                "batch_size": engine.batch_size,
                "engine": engine.describe(),
                "next_chunk": 0,
                "rows": 0,
                "predicted": 0,
                "errors": 0,
                "errors_bytes": 0,
                "elapsed_s": 0.0,
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            layout.errors_work.write_bytes(b"")
            _write_json_atomic(layout.journal, journal)
        else:
            _rewind(layout, journal, writer)
        if not layout.folder:
            writer.open(layout.output_tmp)
            if writer.streaming:  # the output file again, from the committed parts
                for part in layout.parts(journal["next_chunk"], writer):
                    writer.add(read_work_part(part, schema))
        first = journal["next_chunk"]
        rows_at_start = journal["rows"]
        journal["elapsed_before_s"] = journal.get("elapsed_s", 0.0)
        label = (
            model.label
            if config.engine != "http"
            else f"{model.name}@{engine.describe().get('url')}"
        )
        progress = Progress(reader.total_rows, journal["rows"], model.name, config.progress, stream)
        compute_started = time.perf_counter()
        committer = _Committer(
            layout, writer, journal, progress, schema, model, reader.id_name, compute_started
        )
        try:
            try:
                if first < reader.n_chunks:
                    for result in engine.results(reader, first):
                        committer.put(result)
            except KeyboardInterrupt:
                raise Interrupted("interrupted (Ctrl-C)", signal.SIGINT) from None
            finally:
                committer.join()
        except Interrupted as exc:
            writer.discard()
            progress.close()
            raise Interrupted(
                f"{exc.message}: {journal['rows']:,} of {reader.total_rows:,} rows committed "
                f"({journal['next_chunk']} of {reader.n_chunks} chunks) in {layout.work}; run the "
                "same command with --resume to continue",
                exc.exit_code - 128,
            ) from None
        except BaseException:
            writer.discard()
            progress.close()
            raise
        progress.close()
        if journal["next_chunk"] != reader.n_chunks:
            raise JobFailed(
                f"the engine stopped after chunk {journal['next_chunk']} of {reader.n_chunks}"
            )
        _finish(layout, writer, schema, reader.n_chunks)
        compute_s = time.perf_counter() - compute_started
        summary = Summary(
            model=label,
            engine=config.engine,
            input=str(config.input),
            output=str(layout.output),
            errors_file=str(layout.errors_final),
            rows=journal["rows"],
            predicted=journal["predicted"],
            errors=journal["errors"],
            rows_this_run=journal["rows"] - rows_at_start,
            wall_s=time.perf_counter() - started,
            compute_s=compute_s,
            batch_size=journal["batch_size"],
            chunk_rows=config.chunk_rows,
            chunks=reader.n_chunks,
            resumed_from_chunk=first,
            peak_rss_mib=peak_rss_mib(),
            max_error_rate=config.max_error_rate,
        )
    finally:
        reader.close()
    print(summary.text(), file=stream)
    if config.summary_json:
        config.summary_json.write_bytes(orjson.dumps(summary.to_dict(), option=orjson.OPT_INDENT_2))
    if summary.error_share > config.max_error_rate:
        raise TooManyErrors(
            f"{summary.errors:,} of {summary.rows:,} rows were bad ({summary.error_share:.2%}), "
            f"more than --max-error-rate {config.max_error_rate:.2%} allows; the output is "
            f"complete, the reasons are in {layout.errors_final}"
        )
    return summary


def _rewind(layout: _Layout, journal: dict[str, Any], writer: Writer) -> None:
    """Undo whatever was written after the journal's last commit."""
    committed = journal["next_chunk"]
    with open(layout.errors_work, "ab") as fh:
        fh.truncate(journal["errors_bytes"])
    for entry in layout.work.iterdir():
        name = entry.name
        later_part = name.startswith("part-") and name.endswith(layout.suffix(writer))
        if name.endswith(".tmp") or later_part and int(name[5:11]) >= committed:
            entry.unlink()
    missing = [p for p in layout.parts(committed, writer) if not p.exists()]
    if missing:
        raise SetupError(
            f"cannot resume {layout.work}: committed part {missing[0].name} is missing; "
            "start over with --overwrite"
        )


def _finish(layout: _Layout, writer: Writer, schema: OutputSchema, chunks: int) -> None:
    """Finish the output file (or the folder) and move the errors into place."""
    parts = layout.parts(chunks, writer)
    try:
        if layout.folder:
            if not parts:  # an input without rows still gives a (header-only) part
                writer.write_part(schema.empty(), layout.part(0, writer))
            if layout.errors_final != layout.errors_work:
                shutil.move(layout.errors_work, layout.errors_final)
            (layout.work / "_SUCCESS").write_bytes(b"")
            layout.journal.unlink()
            return
        writer.close(parts)
        fsync_file(layout.output_tmp)
        os.replace(layout.output_tmp, layout.output)
        if layout.errors_final.parent.resolve() == layout.work.parent.resolve():
            os.replace(layout.errors_work, layout.errors_final)
        else:
            shutil.move(layout.errors_work, layout.errors_final)
        shutil.rmtree(layout.work)
    except OSError as exc:
        raise JobFailed(f"cannot write {layout.output}: {exc}; --resume writes it again") from None

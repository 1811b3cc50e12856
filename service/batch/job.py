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
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from .config import JobConfig
from .engines import Engine, Result, background_priority
from .errors import AlreadyComplete, Interrupted, JobFailed, SetupError, TooManyErrors
from .journal import (
    JOURNAL_FORMAT,
    Layout,
    check_output,
    check_unchanged,
    fsync,
    prepare_work,
    rewind,
    write_json_atomic,
)
from .model import ModelSpec, from_repository
from .progress import Progress, Summary, peak_rss_mib
from .readers import InputOptions, Reader, open_reader
from .writers import (
    OutputSchema,
    Writer,
    output_format,
    read_work_part,
    write_work_part,
    writer_for,
)

__all__ = ["JobConfig", "run_job"]

log = logging.getLogger("slimserve.batch")

_QUEUE_DEPTH = 2


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
            truncate=config.truncate,
        )
        return engine, engine.open()
    model = from_repository(repo, config.model, version, variant)
    model = replace(model, truncate=config.truncate)
    if config.engine == "ray":
        try:
            from .engines.ray import RayEngine
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
        layout: Layout,
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
            fsync(tmp)
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
        write_json_atomic(self.layout.journal, journal)
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
    layout = Layout.of(config)
    with _signals_raise():
        try:
            if not config.input.exists():  # before any model or server is looked at
                raise SetupError(f"input {config.input} does not exist")
            journal = check_output(config, layout)
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
    layout: Layout,
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
            check_unchanged(journal["job"], identity, layout)
        if config.engine != "http":
            engine.open()
        journal = _open_work(layout, journal, identity, reader.n_chunks, engine, writer, schema)
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
        _stream(engine, reader, first, committer, writer, progress, layout)
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


def _open_work(
    layout: Layout,
    journal: dict[str, Any] | None,
    identity: dict[str, Any],
    chunks: int,
    engine: Engine,
    writer: Writer,
    schema: OutputSchema,
) -> dict[str, Any]:
    """The work folder ready for the first uncommitted chunk: a new journal for a fresh job,
    everything after the last commit undone for a resumed one; the journal."""
    prepare_work(layout, fresh=journal is None)
    if journal is None:
        journal = {
            "format": JOURNAL_FORMAT,
            "job": identity,
            "chunks": chunks,
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
        write_json_atomic(layout.journal, journal)
    else:
        rewind(layout, journal, writer)
    if not layout.folder:
        writer.open(layout.output_tmp)
        if writer.streaming:  # the output file again, from the committed parts
            for part in layout.parts(journal["next_chunk"], writer):
                writer.add(read_work_part(part, schema))
    return journal


def _stream(
    engine: Engine,
    reader: Reader,
    first: int,
    committer: _Committer,
    writer: Writer,
    progress: Progress,
    layout: Layout,
) -> None:
    """Every chunk from ``first`` on through the engine into the committer; on an interrupt,
    the message says how far the job got and how to resume it."""
    journal = committer.journal
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


def _finish(layout: Layout, writer: Writer, schema: OutputSchema, chunks: int) -> None:
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
        fsync(layout.output_tmp)
        os.replace(layout.output_tmp, layout.output)
        if layout.errors_final.parent.resolve() == layout.work.parent.resolve():
            os.replace(layout.errors_work, layout.errors_final)
        else:
            shutil.move(layout.errors_work, layout.errors_final)
        shutil.rmtree(layout.work)
    except OSError as exc:
        raise JobFailed(f"cannot write {layout.output}: {exc}; --resume writes it again") from None

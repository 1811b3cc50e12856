"""The ``ray`` engine: Ray Data reads the input, an actor pool of onnxruntime sessions runs it.

- Reading is a Ray Data :class:`~ray.data.Datasource` whose read tasks run this package's own
  chunked readers, so row numbers, row errors and resuming are exactly those of the local
  engine; a block is one chunk (every input row, with its error when it has one).
- ``map_batches`` sends each block to a fixed-size pool of actors
  (``compute=ray.data.ActorPoolStrategy(size=n)``, Ray 2.51+; ``concurrency=`` is deprecated).
  Each actor holds one :class:`service.core.runtime.OrtSession` on the ONNX bytes shipped to it (no
  shared file system needed for the model) and runs :meth:`LocalEngine.predict`, the local
  engine's own validate -> batch -> run path.
- The driver iterates the results in input order (``preserve_order``) and the job writes them
  through the same part files, journal and errors file as every engine.

On a cluster (``--ray-address``) the input path must be readable from every node (a shared
or cloud file system), and the workers need slimserve installed.

Imported only when ``--engine ray`` is asked for: Ray is the optional ``batch-ray`` extra.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray

from service.core.runtime import RuntimeOptions

from ..errors import JobFailed, SetupError
from ..model import ModelSpec
from ..readers import Chunk, Reader, RowError
from .base import Engine, Result
from .local import LocalEngine, calibrate_batch_size

__all__ = ["RayEngine", "ChunkDatasource", "OrtPredictor"]

log = logging.getLogger("slimserve.batch")

_READ_CPUS = 0.5  # what one read task reserves (parsing a chunk)


def _pa() -> Any:
    import pyarrow

    return pyarrow


def chunk_to_table(chunk: Chunk, width: int) -> Any:
    """Every input row of a chunk, in row order: ``chunk``, ``row``, ``id``, ``error``, ``x``."""
    pa = _pa()
    n = chunk.stop - chunk.start
    rows = np.arange(chunk.start, chunk.stop, dtype=np.int64)
    good = chunk.rows - chunk.start
    x = np.zeros((n, width), chunk.x.dtype)
    x[good] = chunk.x.reshape(len(good), width)
    error: list[str | None] = [None] * n
    ids: list[Any] = [None] * n
    for e in chunk.errors:
        error[e.row - chunk.start] = e.reason
        ids[e.row - chunk.start] = e.id
    columns = {
        "chunk": pa.array(np.full(n, chunk.index, np.int64)),
        "row": pa.array(rows),
        "error": pa.array(error, pa.string()),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), width),
    }
    if chunk.ids is not None:
        for i, value in zip(good.tolist(), chunk.ids.tolist(), strict=True):
            ids[i] = value
        columns["id"] = pa.array(ids)
    return pa.table(columns)


def table_to_chunk(table: Any, model: ModelSpec) -> Chunk:
    """The good rows of a :func:`chunk_to_table` block (or of a slice of one: Ray may split
    blocks), back as a :class:`Chunk`."""
    index = table["chunk"][0].as_py()
    good, rows, ids, errors = _split(table)
    n = len(table)
    x = table["x"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
    shaped = x[good].astype(model.dtype, copy=False).reshape(len(rows), *model.row_shape)
    start = table["row"][0].as_py() if n else 0
    return Chunk(index, start, start + n, rows, shaped, ids, errors)


def _split(table: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[RowError]]:
    """A block's good-row mask, the good rows' numbers and ids, and the row errors."""
    pa = _pa()
    error = table["error"]
    good = error.is_null().to_numpy(zero_copy_only=False)
    rows = table["row"].to_numpy()
    all_ids: list[Any] = table["id"].to_pylist() if "id" in table.column_names else []
    errors = [
        RowError(int(rows[i]), all_ids[i] if all_ids else None, error[i].as_py())
        for i in np.flatnonzero(~good).tolist()
    ]
    ids = None
    if "id" in table.column_names:
        kept = [v for v, g in zip(all_ids, good, strict=True) if g]
        is_int = pa.types.is_integer(table.schema.field("id").type)
        ids = np.array(kept, dtype=np.int64) if is_int else np.array(kept, dtype=object)
    return good, rows[good], ids, errors


class ChunkDatasource(ray.data.Datasource):
    """Chunks ``first`` .. ``stop - 1`` of an input, read by this package's readers in Ray tasks."""

    def __init__(self, reader: Reader, first: int, stop: int) -> None:
        super().__init__()
        self._reader = reader
        self._first = first
        self._stop = stop

    def get_name(self) -> str:
        return f"slimserve-{self._reader.format}"

    def estimate_inmemory_data_size(self) -> int | None:
        rows = (self._stop - self._first) * self._reader.chunk_rows
        return rows * self._reader.model.width * 4

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: Any = None,
    ) -> list[Any]:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        count = self._stop - self._first
        if count <= 0:
            return []
        groups = max(1, min(parallelism, count))
        per_group = math.ceil(count / groups)
        reader = self._reader
        width = reader.model.width
        tasks = []
        for a in range(self._first, self._stop, per_group):
            b = min(a + per_group, self._stop)
            rows = reader.bounds(b - 1)[1] - reader.bounds(a)[0]

            def read(a: int = a, b: int = b) -> Iterator[Any]:
                try:
                    for chunk in reader.chunks(a, b):
                        yield chunk_to_table(chunk, width)
                finally:
                    reader.close()

            meta = BlockMetadata(
                num_rows=rows,
                size_bytes=int(rows * width * 4),
                input_files=(str(reader.path),),
                exec_stats=None,
            )
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


class OrtPredictor:
    """A Ray actor holding one onnxruntime session; runs the local engine's predict path."""

    def __init__(self, model: ModelSpec, batch_size: int, onnx: bytes | None = None) -> None:
        if onnx is not None:  # on a cluster: the bytes came with the actor, no shared disk needed
            path = Path(tempfile.mkdtemp(prefix="slimserve-ray-")) / "model.onnx"
            path.write_bytes(onnx)
            model = replace(model, path=path)
        options = RuntimeOptions(intra_op_threads=1, inter_op_threads=1)
        self.engine = LocalEngine(model, options, batch_size)
        self.engine.open()

    def __call__(self, table: Any) -> Any:
        pa = _pa()
        chunk = table_to_chunk(table, self.engine.model)
        result = self.engine.predict(chunk)
        n = len(table)
        rows = table["row"].to_numpy()
        error = table["error"].to_pylist()
        for e in result.errors:
            error[int(np.searchsorted(rows, e.row))] = e.reason
        good = np.zeros(n, bool)
        good[np.searchsorted(rows, result.rows)] = True
        out = table.drop_columns(["x", "error"]).append_column(
            "error", pa.array(error, pa.string())
        )
        for spec in self.engine.model.outputs:
            values = result.outputs[spec.name]
            width = int(np.prod(values.shape[1:])) if values.ndim > 1 else 1
            full = np.zeros((n, width), values.dtype)
            full[good] = values.reshape(len(values), width)
            column = (
                pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), width)
                if values.ndim > 1
                else pa.array(full.reshape(-1))
            )
            out = out.append_column(f"out:{spec.name}", column)
        return out


class RayEngine(Engine):
    name = "ray"

    def __init__(
        self,
        model: ModelSpec,
        address: str | None = None,
        actors: int | None = None,
        batch_size: int | None = None,
        num_cpus: int | None = None,
    ) -> None:
        self.model = model
        self.address = address
        self.actors = actors
        self.requested_batch = batch_size
        self.batch_size = batch_size or 0
        self.num_cpus = num_cpus
        self._started = False

    def open(self) -> ModelSpec:
        assert self.model.path is not None
        if not self.batch_size:
            probe = LocalEngine(self.model, RuntimeOptions(intra_op_threads=1), None)
            probe.open()
            assert probe.session is not None
            self.batch_size = probe.batch_size or calibrate_batch_size(probe.session, self.model)
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # the job draws its own progress bar; Ray would warn that its own are off
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address, log_to_driver=False, configure_logging=False)
                else:
                    ray.init(
                        num_cpus=self.num_cpus or os.cpu_count(),
                        include_dashboard=False,
                        log_to_driver=False,
                        configure_logging=False,
                    )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f" at {self.address}" if self.address else ""
                raise SetupError(f"cannot start or reach Ray{where}: {exc}") from None
            self._started = True
        cpus = float(ray.cluster_resources().get("CPU", 1))
        self.actors = self.actors or max(1, int(cpus) - 1)
        # every actor holds a CPU's worth, but reading must still find room: a pool that
        # takes every CPU leaves the read tasks unscheduled and the job waits for ever
        self.actor_cpus = min(1.0, max(0.05, (cpus - _READ_CPUS) / self.actors))
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        return self.model

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "actors": self.actors,
            "actor_cpus": self.actor_cpus,
            "address": self.address or "local",
        }

    def results(self, reader: Reader, first: int) -> Iterator[Result]:
        pa = _pa()
        model_path = self.model.path
        assert model_path is not None
        dataset = ray.data.read_datasource(
            ChunkDatasource(reader, first, reader.n_chunks), num_cpus=_READ_CPUS
        )
        dataset = dataset.map_batches(
            OrtPredictor,
            fn_constructor_kwargs={
                "model": self.model,
                "batch_size": self.batch_size,
                # a local Ray reads the model file; a cluster gets its bytes
                "onnx": model_path.read_bytes() if self.address else None,
            },
            batch_size=None,  # one block is one chunk
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=self.actor_cpus,
        )
        pending: list[Any] = []
        have = 0
        expected = first
        try:
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                pending.append(table)
                have += len(table)
                while pending:
                    start, stop = reader.bounds(expected)
                    if have < stop - start:
                        break
                    merged = pa.concat_tables(pending)
                    yield self._result(merged.slice(0, stop - start), expected, start, stop)
                    rest = merged.slice(stop - start)
                    pending = [rest] if len(rest) else []
                    have = len(rest)
                    expected += 1
        except ray.exceptions.RayError as exc:
            raise JobFailed(f"Ray failed: {exc}") from None
        if expected != reader.n_chunks:
            raise JobFailed(f"Ray returned {expected} of {reader.n_chunks} chunks")

    def _result(self, table: Any, index: int, start: int, stop: int) -> Result:
        if table["chunk"][0].as_py() != index or table["chunk"][-1].as_py() != index:
            raise JobFailed(f"Ray returned rows out of order at chunk {index}")
        good, rows, ids, errors = _split(table)
        outputs = {}
        for spec in self.model.outputs:
            column = table[f"out:{spec.name}"].combine_chunks()
            if _pa().types.is_fixed_size_list(column.type):
                values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), -1)
                values = values.reshape(len(table), *spec.shape[1:])
            else:
                values = column.to_numpy(zero_copy_only=False)
            outputs[spec.name] = values[good]
        return Result(index, start, stop, rows, ids, errors, outputs)

    def close(self) -> None:
        if self._started:
            ray.shutdown()
            self._started = False

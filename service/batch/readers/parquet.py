"""Parquet files, read record batch by record batch into chunks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import JobFailed, SetupError
from ..model import ModelSpec
from .base import (
    PARQUET_BATCH,
    Chunk,
    InputOptions,
    Reader,
    arrow_kind,
    ids_from_arrow,
    pyarrow_module,
    widths,
)


class ParquetReader(Reader):
    format = "parquet"

    def __init__(self, options: InputOptions, model: ModelSpec) -> None:
        super().__init__(options, model)
        pa = pyarrow_module()
        import pyarrow.parquet as pq

        try:
            self._file = pq.ParquetFile(self.path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise SetupError(f"input {self.path}: not a readable Parquet file ({exc})") from None
        schema = self._file.schema_arrow
        types = {f.name: f.type for f in schema}
        columns = list(schema.names)
        kinds = {n: arrow_kind(t) for n, t in types.items()}
        features, id_col = self._select(columns, kinds)
        self.column_widths = widths(self, features, types)
        self.features = tuple(features)
        self.id_column = id_col
        self.id_name = id_col
        self.id_kind = "str"
        if id_col is not None:
            kind = types[id_col]
            if arrow_kind(kind) == "other" or arrow_kind(kind) == "list":
                raise SetupError(f"input {self.path}: id column {id_col!r} holds {kind}")
            self.id_kind = "int" if pa.types.is_integer(kind) else "str"
        self.total_rows = self._file.metadata.num_rows
        self._group_starts = np.cumsum(
            [0]
            + [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        )

    _handles = ("_file",)

    def chunks(self, first: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        if self._file is None:
            import pyarrow.parquet as pq

            self._file = pq.ParquetFile(self.path)
        last = min(stop if stop is not None else self.n_chunks, self.n_chunks)
        if first >= last:
            return
        begin, _ = self.bounds(first)
        group = int(np.searchsorted(self._group_starts, begin, side="right")) - 1
        skip = begin - int(self._group_starts[group])
        columns = list(self.features) + ([self.id_column] if self.id_column else [])
        batches = self._file.iter_batches(
            batch_size=min(self.chunk_rows, PARQUET_BATCH),
            row_groups=list(range(group, self._file.num_row_groups)),
            columns=columns,
            use_threads=False,
        )
        # Small Arrow batches are converted straight into the chunk's array: Arrow never
        # holds more than one batch, whatever the row groups' size.
        index, part = first, None
        for batch in batches:
            if skip:
                if batch.num_rows <= skip:
                    skip -= batch.num_rows
                    continue
                batch, skip = batch.slice(skip), 0
            while batch.num_rows:
                if part is None:
                    part = _ChunkBuilder(self, index)
                take = min(batch.num_rows, part.size - part.filled)
                part.add(batch.slice(0, take))
                batch = batch.slice(take)
                if part.filled == part.size:
                    yield part.finish()
                    index, part = index + 1, None
                    if index >= last:
                        return
        if index < last:
            got = self.bounds(index)[0] + (part.filled if part else 0)
            raise JobFailed(
                f"input {self.path}: ended at row {got}, but its metadata says "
                f"{self.total_rows} rows; the file changed or is truncated"
            )


class _ChunkBuilder:
    """One chunk of a Parquet file, filled batch by batch."""

    def __init__(self, reader: ParquetReader, index: int) -> None:
        self.reader = reader
        self.index = index
        self.start, self.stop = reader.bounds(index)
        self.size = self.stop - self.start
        self.x = reader.converter.empty(self.size)
        self.reasons: dict[int, str] = {}
        self.ids: list[np.ndarray] = []
        self.filled = 0

    def add(self, batch: Any) -> None:
        reader = self.reader
        n = batch.num_rows
        view = self.x[self.filled : self.filled + n]
        reasons: dict[int, str] = {}
        offset = 0
        for name, width in reader.column_widths:
            reader.converter.fill_arrow(view, offset, width, batch.column(name), name, reasons)
            offset += width
        if reader.id_column:
            column = batch.column(reader.id_column)
            self.ids.append(ids_from_arrow(column, reader.id_kind, reader.id_column, reasons))
        for i, reason in reasons.items():
            self.reasons[self.filled + i] = reason
        self.filled += n

    def finish(self) -> Chunk:
        reader = self.reader
        ids = np.concatenate(self.ids) if self.ids else None
        rows = np.arange(self.start, self.stop, dtype=np.int64)
        return reader.converter.finish(
            self.index, self.start, self.stop, rows, self.x, self.reasons, ids, reader.column_widths
        )

"""CSV files, parsed chunk by chunk with pyarrow's CSV reader."""

from __future__ import annotations

import csv
from typing import Any

import numpy as np

from ..errors import JobFailed, SetupError
from ..model import ModelSpec
from .base import (
    Chunk,
    InputOptions,
    LineIndex,
    LineReader,
    RowError,
    ids_from_arrow,
    pyarrow_module,
    widths,
)


class CsvReader(LineReader):
    format = "csv"

    def __init__(self, options: InputOptions, model: ModelSpec) -> None:
        super().__init__(options, model)
        pa = pyarrow_module()
        with open(self.path, "rb") as fh:
            first = fh.readline()
        if not first.strip():
            raise SetupError(f"input {self.path}: the first line is empty; expected a CSV header")
        try:
            text = first.decode("utf-8-sig").rstrip("\r\n")
        except UnicodeDecodeError:
            raise SetupError(f"input {self.path}: the first line is not UTF-8 text") from None
        fields = next(csv.reader([text]))
        if options.header:
            columns, data_start = [f.strip() for f in fields], len(first)
            dupes = sorted({c for c in columns if columns.count(c) > 1})
            if dupes:
                raise SetupError(f"input {self.path}: the header repeats columns {dupes}")
        else:
            columns, data_start = [f"column_{i}" for i in range(len(fields))], 0
        self.columns = columns
        features, id_col = self._select(columns, {})
        self.column_widths = widths(self, features, {})
        self.features = tuple(features)
        self.id_column = id_col
        self.id_name = id_col
        self.index = LineIndex(self.path, data_start, self.chunk_rows)
        self.total_rows = self.index.total_rows
        include = ([id_col] if id_col else []) + features
        self._include = include
        self._fast_types = {f: pa.float64() for f in features}
        self._text_types = {f: pa.string() for f in include}
        if id_col:
            self._fast_types[id_col] = pa.string()

    def _read(self, block: bytes, types: dict[str, Any], threads: bool) -> tuple[Any, list[Any]]:
        pa = pyarrow_module()
        from pyarrow import csv as pacsv

        invalid: list[Any] = []

        def on_invalid(row: Any) -> str:
            invalid.append(row)
            return "skip"

        table = pacsv.read_csv(
            pa.py_buffer(block),
            read_options=pacsv.ReadOptions(
                column_names=self.columns,
                use_threads=threads,
                block_size=max(1 << 20, len(block) + 1),
            ),
            parse_options=pacsv.ParseOptions(
                invalid_row_handler=on_invalid, ignore_empty_lines=False
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=self._include,
                column_types=types,
                quoted_strings_can_be_null=False,
            ),
        )
        return table, invalid

    def _parse(self, index: int, block: bytes) -> Chunk:
        pa = pyarrow_module()
        start, stop = self.bounds(index)
        try:
            table, invalid = self._read(block, self._fast_types, threads=True)
            if invalid:  # row numbers are known only to the single-threaded parser
                table, invalid = self._read(block, self._fast_types, threads=False)
        except pa.ArrowInvalid:  # a value that is not a number: read text, judge each row
            try:
                table, invalid = self._read(block, self._text_types, threads=False)
            except pa.ArrowInvalid as exc:
                raise JobFailed(f"input {self.path}: rows {start}-{stop - 1}: {exc}") from None
        errors = []
        skipped = []
        for row in invalid:
            number = start + row.number - 1
            skipped.append(row.number - 1)
            reason = (
                "empty line"
                if not row.text.strip()
                else f"{row.actual_columns} columns, expected {row.expected_columns}"
            )
            errors.append(RowError(number, None, reason))
        rows = np.delete(np.arange(start, stop, dtype=np.int64), skipped)
        if len(rows) != table.num_rows:
            raise JobFailed(
                f"input {self.path}: rows {start}-{stop - 1} parse into "
                f"{table.num_rows + len(skipped)} records, not {stop - start} lines; a quoted "
                "field spans lines (a CSV row must be one line)"
            )
        return self._convert(index, start, stop, rows, table, errors)

    def _convert(
        self,
        index: int,
        start: int,
        stop: int,
        rows: np.ndarray,
        table: Any,
        errors: list[RowError],
    ) -> Chunk:
        reasons: dict[int, str] = {}
        x = self.converter.empty(table.num_rows)
        offset = 0
        for name, width in self.column_widths:
            self.converter.fill_arrow(x, offset, width, table.column(name), name, reasons)
            offset += width
        ids = None
        if self.id_column:
            ids = ids_from_arrow(table.column(self.id_column), "str", self.id_column, reasons)
        empty = [i for i, r in reasons.items() if r.startswith("column") and r.endswith("is empty")]
        for i in empty:
            if _blank_row(table, i, self._include):
                reasons[i] = "empty line"
                if ids is not None:
                    ids[i] = None
        return self.converter.finish(
            index, start, stop, rows, x, reasons, ids, self.column_widths, errors
        )


def _blank_row(table: Any, i: int, columns: list[str]) -> bool:
    return all(table.column(c)[i].as_py() in (None, "") for c in columns)

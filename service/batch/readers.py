"""Chunked readers: CSV, Parquet, JSON Lines, NPY, NPZ, and folders of PNG digit images.

Every reader cuts its input into chunks of ``chunk_rows`` consecutive input rows (the last one
shorter), so chunk ``k`` always covers rows ``[k * chunk_rows, (k + 1) * chunk_rows)``: that is
what lets a job resume after its last committed chunk, and lets Ray read chunks anywhere. A
chunk carries the good rows as one array in the model's input shape and dtype, and every bad
row as a :class:`RowError` (row index, id, reason); ``len(rows) + len(errors)`` is always the
number of input rows it covers. Only one chunk (plus the format's own buffers) is in memory.

Row numbers are 0-based: for CSV the line after the header is row 0 and every line counts (an
empty line is a row with an error); for JSON Lines, every line; for Parquet, NPY and NPZ the
record; for a PNG folder the file in name order.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .errors import JobFailed, SetupError
from .model import ModelSpec
from .png import PngError, read_png

__all__ = [
    "INPUT_FORMATS",
    "DEFAULT_CHUNK_ROWS",
    "InputOptions",
    "RowError",
    "Chunk",
    "Reader",
    "open_reader",
    "input_format",
]

DEFAULT_CHUNK_ROWS = 65_536
INPUT_FORMATS = ("csv", "parquet", "jsonl", "npy", "npz", "png")
#: file suffix -> format, for inputs and outputs alike
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".npy": "npy",
    ".npz": "npz",
}
_SCAN_BLOCK = 1 << 23
_PARQUET_BATCH = 8192


def _pa() -> Any:
    """pyarrow, from the ``batch`` extra; a clear message when it is not installed."""
    try:
        import pyarrow
        import pyarrow.compute  # noqa: F401
    except ImportError:
        raise SetupError(
            "reading CSV, Parquet and JSON Lines needs pyarrow: pip install 'slimserve[batch]'"
        ) from None
    return pyarrow


def input_format(path: Path, declared: str | None = None) -> str:
    """The input's format: ``declared``, or from the suffix (a folder is PNG images)."""
    if declared:
        if declared not in INPUT_FORMATS:
            raise SetupError(
                f"input format {declared!r} is unknown; expected one of {', '.join(INPUT_FORMATS)}"
            )
        return declared
    if path.is_dir():
        return "png"
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SetupError(
            f"input {path}: cannot tell the format from the suffix {path.suffix!r}; expected "
            f"{', '.join(sorted(SUFFIX_FORMATS))}, a folder of PNG images, or --input-format"
        )
    return fmt


@dataclass(frozen=True)
class InputOptions:
    path: Path
    format: str | None = None  # None: from the suffix
    features: tuple[str, ...] | None = None  # column names or glob patterns, in order
    id_column: str | None = None  # None: a column named "id" when there is one
    header: bool = True  # CSV: the first line names the columns
    chunk_rows: int = DEFAULT_CHUNK_ROWS


@dataclass(frozen=True)
class RowError:
    row: int
    id: Any
    reason: str


@dataclass
class Chunk:
    """Input rows ``[start, stop)``: the good ones ready for the model, the bad ones explained."""

    index: int
    start: int
    stop: int
    rows: np.ndarray  # int64 input row numbers of the good rows, ascending
    x: np.ndarray  # [len(rows), *row_shape] in the model's input dtype
    ids: np.ndarray | None  # ids of the good rows (int64 or str objects)
    errors: list[RowError] = field(default_factory=list)


class Reader(ABC):
    """One input file (or folder), cut into chunks of ``chunk_rows`` input rows."""

    format: str
    total_rows: int
    id_name: str | None = None  # the output column that carries the ids
    id_kind: str = "str"  # "int": ids are int64; "str": text
    features: tuple[str, ...] = ()

    def __init__(self, options: InputOptions, model: ModelSpec) -> None:
        self.options = options
        self.path = options.path
        self.chunk_rows = options.chunk_rows
        self.model = model
        self.converter = _Converter(model, str(self.path))

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.total_rows / self.chunk_rows)

    def bounds(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_rows
        return start, min(start + self.chunk_rows, self.total_rows)

    @abstractmethod
    def chunks(self, first: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        """Chunks ``first`` .. ``stop - 1`` (to the end when ``stop`` is None), in order."""

    def describe(self) -> dict[str, Any]:
        """What identifies this input in a job's journal (a changed file cannot be resumed)."""
        stat = self.path.stat()
        return {
            "path": str(self.path.resolve()),
            "format": self.format,
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "rows": self.total_rows,
            "features": list(self.features),
            "id": self.id_name,
        }

    #: attributes holding open files: dropped when pickled (Ray ships readers to its workers)
    #: and opened again on first use
    _handles: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self._handles:
            state[name] = None
        return state

    def close(self) -> None:
        for name in self._handles:
            handle = getattr(self, name, None)
            if handle is not None:
                handle.close()
                setattr(self, name, None)

    def _select(self, columns: list[str], kinds: dict[str, str]) -> tuple[list[str], str | None]:
        """Feature columns and the id column out of ``columns`` (in file order)."""
        opts = self.options
        id_col = opts.id_column
        if id_col is not None and id_col not in columns:
            raise SetupError(
                f"input {self.path}: no id column {id_col!r}; columns are {_show(columns)}"
            )
        if id_col is None and "id" in columns and not (opts.features and "id" in opts.features):
            id_col = "id"
        if opts.features:
            features: list[str] = []
            for pattern in opts.features:
                hits = [c for c in columns if fnmatch.fnmatchcase(c, pattern)]
                if not hits:
                    raise SetupError(
                        f"input {self.path}: no column matches feature {pattern!r}; "
                        f"columns are {_show(columns)}"
                    )
                features += [c for c in hits if c not in features]
        elif self.model.input.name in columns and kinds.get(self.model.input.name) == "list":
            features = [self.model.input.name]
        else:
            features = [c for c in columns if c != id_col]
        if id_col in features:
            raise SetupError(f"input {self.path}: column {id_col!r} is both the id and a feature")
        return features, id_col


def _show(columns: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(c) for c in columns[:limit])
    return f"[{shown}{', ...' if len(columns) > limit else ''}] ({len(columns)} columns)"


# --------------------------------------------------------------------------------------------
# turning columns into model rows


class _Converter:
    """Columns (Arrow arrays or numpy) -> the model's rows, with a reason for every bad row."""

    def __init__(self, model: ModelSpec, source: str) -> None:
        self.model = model
        self.source = source
        self.width = model.width
        target = model.dtype
        self.work = (
            np.dtype(np.float32)
            if target.kind == "f" and target.itemsize <= 4
            else np.dtype(np.float64)
        )

    def empty(self, n: int) -> np.ndarray:
        return np.empty((n, self.width), self.work)

    def fill_arrow(
        self, x: np.ndarray, offset: int, width: int, arr: Any, name: str, reasons: dict[int, str]
    ) -> None:
        """Write one Arrow column into ``x[:, offset:offset + width]``."""
        pa = _pa()
        pc = pa.compute
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
        kind = arr.type
        if pa.types.is_dictionary(kind):
            arr = arr.dictionary_decode()
            kind = arr.type
        if pa.types.is_null(kind):
            for i in range(len(arr)):
                reasons.setdefault(i, f"column {name!r} is empty")
            return
        if (
            pa.types.is_list(kind)
            or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind)
        ):
            self._fill_list(x, offset, width, arr, name, reasons)
            return
        if arr.null_count:
            for i in np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)).tolist():
                reasons.setdefault(i, f"column {name!r} is empty")
            arr = arr.fill_null(0)
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            try:
                arr = pc.cast(arr, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                x[:, offset] = self._parse_strings(arr.to_pylist(), name, reasons)
                return
        elif pa.types.is_boolean(kind) or pa.types.is_decimal(kind):
            arr = pc.cast(arr, pa.float64())
        elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise JobFailed(f"input {self.source}: column {name!r} holds {kind}; expected numbers")
        x[:, offset] = arr.to_numpy(zero_copy_only=False)

    def _fill_list(
        self, x: np.ndarray, offset: int, width: int, arr: Any, name: str, reasons: dict[int, str]
    ) -> None:
        pa = _pa()
        pc = pa.compute
        lengths = pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)
        good = lengths == width
        if not good.all():
            for i in np.flatnonzero(~good).tolist():
                got = int(lengths[i])
                reasons.setdefault(
                    int(i),
                    f"column {name!r} is empty"
                    if got < 0
                    else f"column {name!r} holds {got} values, expected {width}",
                )
            arr = arr.filter(pa.array(good))
        values = arr.flatten()
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            try:
                values = pc.cast(values, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise JobFailed(
                    f"input {self.source}: column {name!r} holds lists of {values.type}; "
                    "expected lists of numbers"
                ) from None
        flat = values.to_numpy(zero_copy_only=False).reshape(-1, width)  # nulls became NaN
        if good.all():
            x[:, offset : offset + width] = flat
        else:
            x[good, offset : offset + width] = flat

    @staticmethod
    def _parse_strings(values: list[Any], name: str, reasons: dict[int, str]) -> np.ndarray:
        out = np.zeros(len(values))
        for i, v in enumerate(values):
            if v is None or not v.strip():
                reasons.setdefault(i, f"column {name!r} is empty")
                continue
            try:
                out[i] = float(v)
            except ValueError:
                reasons.setdefault(i, f"column {name!r}: {v!r} is not a number")
        return out

    def finish(
        self,
        index: int,
        start: int,
        stop: int,
        rows: np.ndarray,
        x: np.ndarray,
        reasons: dict[int, str],
        ids: np.ndarray | None,
        columns: list[tuple[str, int]],
        errors: list[RowError] | None = None,
    ) -> Chunk:
        """Check finiteness (and integrality), split good from bad rows, shape for the model.

        ``rows[i]`` is the input row number of ``x[i]``; ``columns`` lists (name, width) in
        order, to name the column of a NaN; ``errors`` are rows that never reached ``x``.
        """
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            edges = np.cumsum([w for _, w in columns])
            for i in np.flatnonzero(~finite).tolist():
                j = int(np.flatnonzero(~np.isfinite(x[i]))[0])
                col = columns[int(np.searchsorted(edges, j, side="right"))][0]
                reasons.setdefault(
                    int(i), f"column {col!r}: NaN or infinity; expected a finite number"
                )
        target = self.model.dtype
        if target.kind in "iub":
            fractional = (x != np.round(x)).any(axis=1)
            for i in np.flatnonzero(fractional).tolist():
                reasons.setdefault(
                    int(i),
                    f"a value is not a whole number; input '{self.model.input.name}' is "
                    f"{self.model.input.datatype}",
                )
        all_errors = list(errors or [])
        if reasons:
            bad = np.fromiter(reasons, np.int64, len(reasons))
            keep = np.ones(len(x), bool)
            keep[bad] = False
            for i, reason in reasons.items():
                all_errors.append(RowError(int(rows[i]), _id_value(ids, i), reason))
            x, rows = x[keep], rows[keep]
            ids = ids[keep] if ids is not None else None
        all_errors.sort(key=lambda e: e.row)
        if (
            ids is not None
            and ids.dtype == object
            and len(ids)
            and all(type(v) is int for v in ids)
        ):
            ids = ids.astype(np.int64)  # integer ids that had a missing one among them
        shaped = x.astype(target, copy=False).reshape(len(x), *self.model.row_shape)
        return Chunk(index, start, stop, rows.astype(np.int64, copy=False), shaped, ids, all_errors)


def _id_value(ids: np.ndarray | None, i: int) -> Any:
    if ids is None:
        return None
    value = ids[i]
    return value.item() if isinstance(value, np.generic) else value


def _ids_from_arrow(arr: Any, kind: str, name: str, reasons: dict[int, str]) -> np.ndarray:
    """An id column as int64 (``kind == "int"``) or str objects; a missing id is a bad row."""
    pa = _pa()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if arr.null_count:
        for i in np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)).tolist():
            reasons.setdefault(i, f"id column {name!r} is empty")
        if kind == "int" and pa.types.is_integer(arr.type):
            return np.array(arr.to_pylist(), dtype=object)  # None where missing
    if kind == "int":
        if pa.types.is_integer(arr.type):
            return arr.to_numpy().astype(np.int64, copy=False)
        out = np.zeros(len(arr), np.int64)
        for i, v in enumerate(arr.to_pylist()):
            if v is None:
                continue
            if isinstance(v, int) and not isinstance(v, bool):
                out[i] = v
            else:
                reasons.setdefault(
                    i, f"id column {name!r}: {v!r} is not an integer like the first row's"
                )
        return out
    values = arr.to_pylist()
    return np.array(["" if v is None else str(v) for v in values], dtype=object)


def _arrow_kind(kind: Any) -> str:
    """'number', 'list', 'text' or 'other' for an Arrow type (decides feature defaults)."""
    pa = _pa()
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return "list"
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return "number"
    if pa.types.is_decimal(kind):
        return "number"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        return "text"
    return "other"


def _widths(reader: Reader, features: list[str], types: dict[str, Any]) -> list[tuple[str, int]]:
    """(name, values per row) of every feature column; they must add up to the model's width."""
    pa = _pa()
    fixed: dict[str, int] = {}
    variable = []
    for name in features:
        kind = types.get(name)
        category = _arrow_kind(kind) if kind is not None else "number"
        if category == "other":
            raise SetupError(f"input {reader.path}: column {name!r} holds {kind}; expected numbers")
        if category == "list":
            assert kind is not None
            value_type = kind.value_type if not pa.types.is_dictionary(kind) else kind
            if pa.types.is_fixed_size_list(kind):
                fixed[name] = kind.list_size
            else:
                variable.append(name)
            if _arrow_kind(value_type) not in ("number", "text"):
                raise SetupError(
                    f"input {reader.path}: column {name!r} holds {kind}; expected numbers"
                )
        else:
            fixed[name] = 1
    known = sum(fixed.values())
    need = reader.model.width
    spec = reader.model.input
    expectation = (
        f"model '{reader.model.name}' takes {need} numbers per row (input '{spec.name}' "
        f"{spec.datatype}{list(spec.shape)})"
    )
    if len(variable) > 1:
        raise SetupError(
            f"input {reader.path}: feature columns {variable} hold lists of varying length; "
            f"{expectation}: pass the columns in order with --features, at most one list column"
        )
    if variable:
        rest = need - known
        if rest < 1:
            raise SetupError(
                f"input {reader.path}: {expectation}; the scalar columns alone give {known}"
            )
        fixed[variable[0]] = rest
    elif known != need:
        shown = _show(features)
        raise SetupError(
            f"input {reader.path}: {expectation}; the feature columns {shown} give {known}"
            + ("" if reader.options.features else "; choose them with --features or --id-column")
        )
    return [(name, fixed[name]) for name in features]


# --------------------------------------------------------------------------------------------
# line-based text files: CSV and JSON Lines


class _LineIndex:
    """Byte offset of every chunk's first line, counted once: seeks and a known total."""

    def __init__(self, path: Path, data_start: int, chunk_rows: int) -> None:
        offsets = [data_start]
        rows, pos, mark = 0, data_start, chunk_rows
        last = b""
        with open(path, "rb") as fh:
            fh.seek(data_start)
            while block := fh.read(_SCAN_BLOCK):
                ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
                while mark <= rows + len(ends):
                    offsets.append(pos + int(ends[mark - 1 - rows]) + 1)
                    mark += chunk_rows
                rows += len(ends)
                pos += len(block)
                last = block[-1:]
        if pos > data_start and last != b"\n":
            rows += 1  # a last line without a newline
        self.total_rows = rows
        self.size = pos
        n_chunks = math.ceil(rows / chunk_rows)
        self.offsets = offsets[:n_chunks] + [pos]

    def span(self, index: int) -> tuple[int, int]:
        return self.offsets[index], self.offsets[index + 1]


class _LineReader(Reader):
    """A text file read chunk by chunk: seek to the chunk's first line (``self.index``), parse."""

    index: _LineIndex
    _fh: Any = None
    _handles = ("_fh",)

    def chunks(self, first: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        for index in range(first, min(stop if stop is not None else self.n_chunks, self.n_chunks)):
            begin, end = self.index.span(index)
            self._fh.seek(begin)
            yield self._parse(index, self._fh.read(end - begin))

    @abstractmethod
    def _parse(self, index: int, block: bytes) -> Chunk: ...


class CsvReader(_LineReader):
    format = "csv"

    def __init__(self, options: InputOptions, model: ModelSpec) -> None:
        super().__init__(options, model)
        pa = _pa()
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
        self.column_widths = _widths(self, features, {})
        self.features = tuple(features)
        self.id_column = id_col
        self.id_name = id_col
        self.index = _LineIndex(self.path, data_start, self.chunk_rows)
        self.total_rows = self.index.total_rows
        include = ([id_col] if id_col else []) + features
        self._include = include
        self._fast_types = {f: pa.float64() for f in features}
        self._text_types = {f: pa.string() for f in include}
        if id_col:
            self._fast_types[id_col] = pa.string()

    def _read(self, block: bytes, types: dict[str, Any], threads: bool) -> tuple[Any, list[Any]]:
        pa = _pa()
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
        pa = _pa()
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
            ids = _ids_from_arrow(table.column(self.id_column), "str", self.id_column, reasons)
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


class JsonLinesReader(_LineReader):
    """One JSON object (features by key) or array (features in order) per line."""

    format = "jsonl"

    def __init__(self, options: InputOptions, model: ModelSpec) -> None:
        super().__init__(options, model)
        self.index = _LineIndex(self.path, 0, self.chunk_rows)
        self.total_rows = self.index.total_rows
        sample = self._first_object()
        self.id_kind = "str"
        if isinstance(sample, dict):
            columns = list(sample)
            kinds = {k: "list" if isinstance(v, list) else "number" for k, v in sample.items()}
            features, id_col = self._select(columns, kinds)
            types = {}
            pa = _pa()
            for f in features:
                if isinstance(sample[f], list):
                    types[f] = pa.list_(pa.float64())
            self.column_widths = _widths(self, features, types)
            self.features = tuple(features)
            self.id_column = id_col
            if id_col is not None:
                value = sample.get(id_col)
                self.id_kind = (
                    "int" if isinstance(value, int) and not isinstance(value, bool) else "str"
                )
        else:
            if self.options.features or self.options.id_column:
                raise SetupError(
                    f"input {self.path}: rows are JSON arrays, which have no names for "
                    "--features or --id-column; write objects or drop those options"
                )
            self.column_widths = [("row", model.width)]
            self.features = ()
            self.id_column = None
        self.id_name = self.id_column

    def _first_object(self) -> Any:
        with open(self.path, "rb") as fh:
            for number, line in enumerate(fh):
                if line.strip():
                    try:
                        value = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise SetupError(
                            f"input {self.path}: line {number + 1} is not JSON ({exc}); "
                            "expected one JSON object or array per line"
                        ) from None
                    if not isinstance(value, dict | list):
                        raise SetupError(
                            f"input {self.path}: line {number + 1} holds a JSON "
                            f"{type(value).__name__}; expected an object or an array per line"
                        )
                    return value
        raise SetupError(f"input {self.path}: no JSON rows; expected one object per line")

    def _parse(self, index: int, block: bytes) -> Chunk:
        return self._fast(index, block) or self._slow(index, block)

    def _fast(self, index: int, block: bytes) -> Chunk | None:
        """pyarrow's JSON reader on the whole chunk; None when any line needs a closer look."""
        if self.id_column is None and not self.features:
            return None
        pa = _pa()
        from pyarrow import json as pajson

        start, stop = self.bounds(index)
        try:
            table = pajson.read_json(
                io.BytesIO(block),
                read_options=pajson.ReadOptions(block_size=max(1 << 20, len(block) + 1)),
                parse_options=pajson.ParseOptions(unexpected_field_behavior="ignore"),
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
        needed = list(self.features) + ([self.id_column] if self.id_column else [])
        if table.num_rows != stop - start or any(c not in table.column_names for c in needed):
            return None
        if any(_arrow_kind(table.schema.field(f).type) == "other" for f in needed):
            return None
        reasons: dict[int, str] = {}
        x = self.converter.empty(table.num_rows)
        offset = 0
        try:
            for name, width in self.column_widths:
                self.converter.fill_arrow(x, offset, width, table.column(name), name, reasons)
                offset += width
        except JobFailed:
            return None
        ids = None
        if self.id_column:
            ids = _ids_from_arrow(
                table.column(self.id_column), self.id_kind, self.id_column, reasons
            )
        rows = np.arange(start, stop, dtype=np.int64)
        return self.converter.finish(index, start, stop, rows, x, reasons, ids, self.column_widths)

    def _slow(self, index: int, block: bytes) -> Chunk:
        start, stop = self.bounds(index)
        lines = block.split(b"\n")[: stop - start]
        x = self.converter.empty(len(lines))
        reasons: dict[int, str] = {}
        ids = np.empty(len(lines), object)  # None where a bad row had no id
        for i, line in enumerate(lines):
            reason = self._row(line, i, x, ids)
            if reason:
                reasons[i] = reason
        rows = np.arange(start, stop, dtype=np.int64)
        x[list(reasons)] = 0.0  # judged already; keep NaN checks quiet
        return self.converter.finish(
            index,
            start,
            stop,
            rows,
            x,
            reasons,
            ids if self.id_column else None,
            self.column_widths,
        )

    def _row(self, line: bytes, i: int, x: np.ndarray, ids: np.ndarray) -> str | None:
        if not line.strip():
            return "empty line"
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return f"not valid JSON ({exc})"
        if isinstance(obj, dict):
            if self.id_column is not None:
                value = obj.get(self.id_column)
                if value is None:
                    return f"id {self.id_column!r} is missing"
                if self.id_kind == "int":
                    if not isinstance(value, int) or isinstance(value, bool):
                        return (
                            f"id {self.id_column!r}: {value!r} is not an integer like the "
                            "first row's"
                        )
                    ids[i] = value
                else:
                    ids[i] = str(value)
            if not self.features:
                return "a JSON object; the first row was an array, so every row must be one"
            values: list[Any] = []
            for name, width in self.column_widths:
                if name not in obj or obj[name] is None:
                    return f"column {name!r} is missing"
                value = obj[name]
                if isinstance(value, list):
                    if len(value) != width:
                        return f"column {name!r} holds {len(value)} values, expected {width}"
                    values += value
                elif width == 1:
                    values.append(value)
                else:
                    return f"column {name!r} holds one value, expected a list of {width}"
        elif isinstance(obj, list):
            if self.features:
                return "a JSON array; the first row was an object, so every row must be one"
            values = _flatten(obj)
            if len(values) != self.model.width:
                return f"{len(values)} values, expected {self.model.width}"
        else:
            return f"a JSON {type(obj).__name__}; expected an object or an array"
        for j, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int | float):
                try:
                    values[j] = float(v)
                except (TypeError, ValueError):
                    return f"value {j}: {v!r} is not a number"
        try:
            x[i] = values
        except (OverflowError, ValueError) as exc:
            return f"values do not fit {x.dtype}: {exc}"
        return None


def _flatten(value: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in value:
        out.extend(_flatten(v) if isinstance(v, list) else [v])
    return out


# --------------------------------------------------------------------------------------------
# Parquet


class ParquetReader(Reader):
    format = "parquet"

    def __init__(self, options: InputOptions, model: ModelSpec) -> None:
        super().__init__(options, model)
        pa = _pa()
        import pyarrow.parquet as pq

        try:
            self._file = pq.ParquetFile(self.path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise SetupError(f"input {self.path}: not a readable Parquet file ({exc})") from None
        schema = self._file.schema_arrow
        types = {f.name: f.type for f in schema}
        columns = list(schema.names)
        kinds = {n: _arrow_kind(t) for n, t in types.items()}
        features, id_col = self._select(columns, kinds)
        self.column_widths = _widths(self, features, types)
        self.features = tuple(features)
        self.id_column = id_col
        self.id_name = id_col
        self.id_kind = "str"
        if id_col is not None:
            kind = types[id_col]
            if _arrow_kind(kind) == "other" or _arrow_kind(kind) == "list":
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
            batch_size=min(self.chunk_rows, _PARQUET_BATCH),
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
            self.ids.append(_ids_from_arrow(column, reader.id_kind, reader.id_column, reasons))
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


# --------------------------------------------------------------------------------------------
# NumPy files


def _check_array(
    path: Path, label: str, shape: tuple[int, ...], dtype: np.dtype, model: ModelSpec
) -> None:
    if dtype.kind not in "biuf":
        raise SetupError(f"input {path}: {label} holds {dtype}; expected numbers")
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    if not shape or per_row != model.width:
        raise SetupError(
            f"input {path}: {label} has shape {list(shape)}; model '{model.name}' takes "
            f"{model.width} numbers per row (input '{model.input.name}' "
            f"{list(model.input.shape)}), "
            f"so expected [rows, {model.width}] or [rows, {', '.join(map(str, model.row_shape))}]"
        )


class NpyReader(Reader):
    """A ``[rows, ...]`` array, memory-mapped; ids are the row numbers."""

    format = "npy"

    def __init__(self, options: InputOptions, model: ModelSpec) -> None:
        super().__init__(options, model)
        if options.id_column or options.features:
            raise SetupError(
                f"input {self.path}: an NPY file is one array without column names; use NPZ "
                "for named arrays, or drop --features and --id-column"
            )
        try:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise SetupError(f"input {self.path}: not a readable NPY array ({exc})") from None
        if not isinstance(self._array, np.ndarray):
            raise SetupError(f"input {self.path}: not an NPY array")
        _check_array(self.path, "the array", self._array.shape, self._array.dtype, model)
        self.total_rows = int(self._array.shape[0])
        self.column_widths = [("array", model.width)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def close(self) -> None:
        self._array = None  # the memory map closes with its last reference

    def chunks(self, first: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        for index in range(first, min(stop if stop is not None else self.n_chunks, self.n_chunks)):
            start, stop_row = self.bounds(index)
            block = np.asarray(self._array[start:stop_row]).reshape(stop_row - start, -1)
            x = block.astype(self.converter.work, copy=False)
            rows = np.arange(start, stop_row, dtype=np.int64)
            yield self.converter.finish(
                index, start, stop_row, rows, x, {}, None, self.column_widths
            )


class _NpyMember:
    """One array of an NPZ file, read row by row from the zip stream (never all at once)."""

    def __init__(self, archive: zipfile.ZipFile, key: str, path: Path) -> None:
        self.key = key
        self._fh = archive.open(f"{key}.npy")
        try:
            version = np.lib.format.read_magic(self._fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._fh)
        except ValueError as exc:
            raise SetupError(
                f"input {path}: array {key!r} is not a readable NPY array ({exc})"
            ) from None
        if dtype.hasobject:
            raise SetupError(
                f"input {path}: array {key!r} holds Python objects; expected numbers or text"
            )
        if fortran and len(shape) > 1:
            raise SetupError(
                f"input {path}: array {key!r} is stored in Fortran order; save it C-ordered "
                "(np.ascontiguousarray) so it can be read in chunks"
            )
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = dtype.itemsize * (math.prod(shape[1:]) if len(shape) > 1 else 1)
        self._data = self._fh.tell()
        self._pos = 0

    def read(self, start: int, stop: int) -> np.ndarray:
        if start != self._pos:
            self._fh.seek(self._data + start * self.row_bytes)
        data = self._fh.read((stop - start) * self.row_bytes)
        self._pos = stop
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:])

    def close(self) -> None:
        self._fh.close()


class NpzReader(Reader):
    """Named arrays: the features (``--features KEY``, the model's input name, or the only
    array) and optionally ids (``--id-column KEY``, or an array named ``id``)."""

    format = "npz"

    def __init__(self, options: InputOptions, model: ModelSpec) -> None:
        super().__init__(options, model)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise SetupError(f"input {self.path}: not a readable NPZ file ({exc})") from None
        keys = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
        id_key = options.id_column
        if id_key is not None and id_key not in keys:
            raise SetupError(
                f"input {self.path}: no array {id_key!r} for the ids; arrays are {keys}"
            )
        if id_key is None and "id" in keys:
            id_key = "id"
        if options.features:
            if len(options.features) != 1 or options.features[0] not in keys:
                raise SetupError(
                    f"input {self.path}: --features names one array of an NPZ file; "
                    f"got {list(options.features)}, arrays are {keys}"
                )
            key = options.features[0]
        elif model.input.name in keys:
            key = model.input.name
        else:
            rest = [k for k in keys if k != id_key]
            if len(rest) != 1:
                raise SetupError(
                    f"input {self.path}: arrays {keys}; expected one named "
                    f"'{model.input.name}' (the model's input) or --features KEY"
                )
            key = rest[0]
        self._keys = (key, id_key)
        self._x = _NpyMember(self._zip, key, self.path)
        _check_array(self.path, f"array {key!r}", self._x.shape, self._x.dtype, model)
        self.total_rows = int(self._x.shape[0])
        self.features = (key,)
        self.column_widths = [(key, model.width)]
        self._ids = None
        if id_key is not None:
            self._ids = _NpyMember(self._zip, id_key, self.path)
            if len(self._ids.shape) != 1 or self._ids.shape[0] != self.total_rows:
                raise SetupError(
                    f"input {self.path}: id array {id_key!r} has shape {list(self._ids.shape)}; "
                    f"expected [{self.total_rows}], one id per row of {key!r}"
                )
            self.id_kind = "int" if self._ids.dtype.kind in "iu" else "str"
            if self._ids.dtype.kind not in "iuUS":
                raise SetupError(
                    f"input {self.path}: id array {id_key!r} holds {self._ids.dtype}; "
                    "expected integers or text"
                )
        self.id_name = id_key

    _handles = ("_x", "_ids", "_zip")

    def chunks(self, first: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        if self._zip is None:
            key, id_key = self._keys
            self._zip = zipfile.ZipFile(self.path)
            self._x = _NpyMember(self._zip, key, self.path)
            self._ids = _NpyMember(self._zip, id_key, self.path) if id_key is not None else None
        for index in range(first, min(stop if stop is not None else self.n_chunks, self.n_chunks)):
            start, stop_row = self.bounds(index)
            x = (
                self._x.read(start, stop_row)
                .reshape(stop_row - start, -1)
                .astype(self.converter.work)
            )
            ids = None
            if self._ids is not None:
                raw = self._ids.read(start, stop_row)
                if raw.dtype.kind in "iu":
                    ids = raw.astype(np.int64)
                else:
                    ids = np.array(
                        [v.decode() if isinstance(v, bytes) else str(v) for v in raw.tolist()],
                        dtype=object,
                    )
            rows = np.arange(start, stop_row, dtype=np.int64)
            yield self.converter.finish(
                index, start, stop_row, rows, x, {}, ids, self.column_widths
            )


# --------------------------------------------------------------------------------------------
# a folder of PNG images


class PngFolderReader(Reader):
    """``*.png`` files of a folder in name order; the id is the file name.

    Grey levels in [0, 1] are mapped onto the model's pixel range (the manifest's
    ``preprocessing.range``). An image whose sides are a whole multiple of the model's image
    size (an upscaled digit, as ``/generate`` writes them) is averaged down block by block.
    """

    format = "png"

    def __init__(self, options: InputOptions, model: ModelSpec) -> None:
        super().__init__(options, model)
        if options.features or options.id_column or not options.header:
            raise SetupError(
                f"input {self.path}: a folder of PNG images has no columns; drop --features, "
                "--id-column and --no-header"
            )
        shape = model.image_shape
        if shape is None:
            raise SetupError(
                f"model '{model.name}' takes {list(model.input.shape)}, which is not an image; "
                f"a folder of PNG images ({self.path}) needs an image model"
            )
        self.image_shape = shape
        self.files = sorted(
            p.name for p in self.path.iterdir() if p.suffix.lower() == ".png" and p.is_file()
        )
        if not self.files:
            raise SetupError(f"input {self.path}: the folder holds no .png files")
        self.total_rows = len(self.files)
        self.id_name = "file"
        self.column_widths = [("image", model.width)]
        low, high = model.pixel_range
        self._low, self._span = low, high - low

    def describe(self) -> dict[str, Any]:
        stats = [os.stat(self.path / f) for f in self.files]
        return {
            "path": str(self.path.resolve()),
            "format": self.format,
            "bytes": sum(s.st_size for s in stats),
            "mtime_ns": max(s.st_mtime_ns for s in stats),
            "rows": self.total_rows,
            "features": [],
            "id": self.id_name,
        }

    def chunks(self, first: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        height, width = self.image_shape
        for index in range(first, min(stop if stop is not None else self.n_chunks, self.n_chunks)):
            start, stop_row = self.bounds(index)
            names = self.files[start:stop_row]
            x = self.converter.empty(len(names))
            reasons: dict[int, str] = {}
            for i, name in enumerate(names):
                try:
                    image = read_png((self.path / name).read_bytes())
                    x[i] = self._fit(image, height, width).ravel() * self._span + self._low
                except (PngError, OSError, ValueError) as exc:
                    reasons[i] = str(exc)
                    x[i] = 0.0
            ids = np.array(names, dtype=object)
            rows = np.arange(start, stop_row, dtype=np.int64)
            yield self.converter.finish(
                index, start, stop_row, rows, x, reasons, ids, self.column_widths
            )

    @staticmethod
    def _fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
        h, w = image.shape
        if (h, w) == (height, width):
            return image
        if h % height == 0 and w % width == 0 and h // height == w // width:
            k = h // height
            return image.reshape(height, k, width, k).mean(axis=(1, 3))
        raise ValueError(
            f"image is {w}x{h} pixels; the model takes {width}x{height} (or a multiple)"
        )


_READERS: dict[str, type[Reader]] = {
    "csv": CsvReader,
    "parquet": ParquetReader,
    "jsonl": JsonLinesReader,
    "npy": NpyReader,
    "npz": NpzReader,
    "png": PngFolderReader,
}


def open_reader(options: InputOptions, model: ModelSpec) -> Reader:
    """The reader for ``options.path``; :class:`SetupError` before any row is read."""
    path = options.path
    if not path.exists():
        raise SetupError(f"input {path} does not exist")
    fmt = input_format(path, options.format)
    if fmt == "png" and not path.is_dir():
        raise SetupError(f"input {path}: PNG input is a folder of .png files, not a file")
    if fmt != "png" and path.is_dir():
        raise SetupError(
            f"input {path} is a folder; only PNG input (--input-format png) is a folder"
        )
    if not os.access(path, os.R_OK):
        raise SetupError(f"input {path} is not readable (permissions)")
    if options.chunk_rows < 1:
        raise SetupError(f"--chunk-rows: expected a positive number, got {options.chunk_rows}")
    return _READERS[fmt](options, model)

"""Output files: CSV, Parquet, JSON Lines, NPY, NPZ, written chunk by chunk.

A job keeps every committed chunk as an Arrow IPC work part (the record it resumes from) and
writes the output file as the chunks come: Parquet one row group per chunk, CSV and JSON
Lines appended. NPY and NPZ, whose headers need the final row count and text widths, are
written at the end from the work parts, one part at a time. Memory stays flat either way. A
folder output instead keeps one standalone file per chunk in the output format
(``part-000042.parquet``): a dataset folder.

Columns: ``row`` (the input row number), the id column when the input has one, then one
column per model output (a classifier's ``label`` and ``probabilities``, a regressor's
``prediction``, a k-means model's ``cluster``...), and ``label_name`` when the manifest names
the classes. A vector output is one list column in Parquet, one JSON array in JSON Lines, one
sub-array field in NPY/NPZ, and ``name_0 .. name_k`` columns in CSV.
"""

from __future__ import annotations

import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service.core.datatypes import V2_TO_NUMPY

from .errors import SetupError
from .model import ModelSpec
from .readers import SUFFIX_FORMATS

__all__ = [
    "OUTPUT_FORMATS",
    "Column",
    "OutputSchema",
    "Writer",
    "output_format",
    "writer_for",
    "write_work_part",
    "read_work_part",
]

OUTPUT_FORMATS = ("csv", "parquet", "jsonl", "npy", "npz")
_SUFFIXES = SUFFIX_FORMATS  # every file format reads and writes (PNG folders only read)
_COPY_BLOCK = 1 << 22


def output_format(path: Path, declared: str | None, folder: bool) -> str:
    """The output format: ``declared``, or from the suffix (a folder output defaults to Parquet)."""
    if declared:
        if declared not in OUTPUT_FORMATS:
            raise SetupError(
                f"output format {declared!r} is unknown; "
                f"expected one of {', '.join(OUTPUT_FORMATS)}"
            )
        return declared
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        if folder:
            return "parquet"
        raise SetupError(
            f"output {path}: cannot tell the format from the suffix {path.suffix!r}; expected "
            f"{', '.join(sorted(_SUFFIXES))} or --output-format"
        )
    return fmt


@dataclass(frozen=True)
class Column:
    name: str
    dtype: np.dtype  # int64, float32, ... or object for text
    width: int = 1  # values per row; > 1 is a vector column

    @property
    def text(self) -> bool:
        return self.dtype.kind == "O"


@dataclass(frozen=True)
class OutputSchema:
    columns: tuple[Column, ...]

    @classmethod
    def build(cls, model: ModelSpec, id_name: str | None, id_kind: str) -> OutputSchema:
        columns = [Column("row", np.dtype(np.int64))]
        if id_name is not None:
            columns.append(Column(id_name, np.dtype(np.int64 if id_kind == "int" else object)))
        for out in model.columns():
            columns.append(Column(out.column, V2_TO_NUMPY[out.datatype], out.width))
        if model.label_names() is not None:
            columns.append(Column("label_name", np.dtype(object)))
        names = [c.name for c in columns]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise SetupError(
                f"output columns {names}: {clash} appear twice (the id column has the name of a "
                "model output); rename it in the input or pass another --id-column"
            )
        return cls(tuple(columns))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def empty(self) -> dict[str, np.ndarray]:
        return {
            c.name: np.empty((0, c.width) if c.width > 1 else (0,), c.dtype) for c in self.columns
        }

    def to_dict(self) -> list[dict[str, Any]]:
        return [{"name": c.name, "dtype": str(c.dtype), "width": c.width} for c in self.columns]


def _pa() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise SetupError(
            "batch jobs write through pyarrow: pip install 'slimserve[batch]'"
        ) from None
    return pyarrow


def _arrow_type(column: Column) -> Any:
    pa = _pa()
    return pa.string() if column.text else pa.from_numpy_dtype(column.dtype)


def arrow_schema(schema: OutputSchema) -> Any:
    """Vector columns as fixed-size lists, text as strings."""
    pa = _pa()
    fields = []
    for c in schema.columns:
        kind = _arrow_type(c)
        fields.append(pa.field(c.name, pa.list_(kind, c.width) if c.width > 1 else kind))
    return pa.schema(fields)


def to_table(values: dict[str, np.ndarray], schema: OutputSchema) -> Any:
    pa = _pa()
    arrays = []
    for c in schema.columns:
        v = values[c.name]
        if c.width > 1:
            flat = pa.array(np.ascontiguousarray(v).reshape(-1), type=_arrow_type(c))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, c.width))
        else:
            arrays.append(pa.array(v, type=_arrow_type(c)))
    return pa.Table.from_arrays(arrays, schema=arrow_schema(schema))


def from_table(table: Any, schema: OutputSchema) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_table`."""
    values = {}
    n = table.num_rows
    for c in schema.columns:
        column = table.column(c.name).combine_chunks()
        if c.text:
            values[c.name] = np.array(column.to_pylist(), dtype=object)
        elif c.width > 1:
            values[c.name] = column.flatten().to_numpy().reshape(n, c.width)
        else:
            values[c.name] = column.to_numpy()
    return values


def write_work_part(values: dict[str, np.ndarray], schema: OutputSchema, path: Path) -> Any:
    """A chunk's rows as an Arrow IPC file: what a resumed job reads back (fast, lossless).
    Returns the Arrow table, for the output writer to reuse."""
    pa = _pa()
    table = to_table(values, schema)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
        out.write_table(table)
    return table


def read_work_part(path: Path, schema: OutputSchema) -> dict[str, np.ndarray]:
    pa = _pa()
    with pa.memory_map(str(path)) as source:
        return from_table(pa.ipc.open_file(source).read_all(), schema)


class Writer(ABC):
    """One output format: standalone part files (folder output) or one file written as the
    chunks come (``open`` / ``add`` / ``close``)."""

    format: str
    suffix: str
    #: False: nothing is written until ``close``, which reads the job's work parts back
    streaming = True

    def __init__(self, schema: OutputSchema) -> None:
        self.schema = schema

    @abstractmethod
    def write_part(self, values: dict[str, np.ndarray], path: Path) -> None:
        """One chunk's rows (every schema column) as a complete file at ``path``."""

    @abstractmethod
    def open(self, target: Path) -> None:
        """Start the one output file."""

    def add(self, values: dict[str, np.ndarray], table: Any = None) -> None:  # noqa: B027
        """Append one chunk's rows (``table``: the same rows as Arrow, when at hand)."""

    @abstractmethod
    def close(self, parts: list[Path]) -> None:
        """Finish the file; ``parts`` are the chunks' work parts (Arrow IPC), in order."""

    def discard(self) -> None:
        """Let go of an unfinished file (a resumed job writes it again)."""
        out = getattr(self, "_out", None)
        if out is not None:
            out.close()


class ParquetWriter(Writer):
    format, suffix = "parquet", ".parquet"

    def _options(self) -> dict[str, Any]:
        # dictionary-encoding probabilities or ids costs 3x the write time for nothing:
        # only the few-valued columns get a dictionary
        few = [c.name for c in self.schema.columns if c.name in ("label", "cluster", "label_name")]
        return {"use_dictionary": few, "compression": "snappy"}

    def write_part(self, values: dict[str, np.ndarray], path: Path) -> None:
        import pyarrow.parquet as pq

        pq.write_table(to_table(values, self.schema), path, **self._options())

    def open(self, target: Path) -> None:
        import pyarrow.parquet as pq

        self._out = pq.ParquetWriter(target, arrow_schema(self.schema), **self._options())

    def add(self, values: dict[str, np.ndarray], table: Any = None) -> None:
        self._out.write_table(table if table is not None else to_table(values, self.schema))

    def close(self, parts: list[Path]) -> None:
        self._out.close()


class CsvWriter(Writer):
    format, suffix = "csv", ".csv"

    def _flat(self, values: dict[str, np.ndarray]) -> Any:
        pa = _pa()
        arrays, names = [], []
        for c in self.schema.columns:
            v = values[c.name]
            kind = _arrow_type(c)
            if c.width > 1:
                names += [f"{c.name}_{i}" for i in range(c.width)]
                arrays += [
                    pa.array(np.ascontiguousarray(v[:, i]), type=kind) for i in range(c.width)
                ]
            else:
                names.append(c.name)
                arrays.append(pa.array(v, type=kind))
        return pa.Table.from_arrays(arrays, names=names)

    def write_part(self, values: dict[str, np.ndarray], path: Path) -> None:
        from pyarrow import csv as pacsv

        pacsv.write_csv(self._flat(values), path)

    def open(self, target: Path) -> None:
        from pyarrow import csv as pacsv

        self._schema = self._flat(self.schema.empty()).schema
        self._out = pacsv.CSVWriter(str(target), self._schema)

    def add(self, values: dict[str, np.ndarray], table: Any = None) -> None:
        self._out.write_table(self._flat(values))

    def close(self, parts: list[Path]) -> None:
        self._out.close()


class JsonLinesWriter(Writer):
    format, suffix = "jsonl", ".jsonl"

    def _lines(self, values: dict[str, np.ndarray]) -> bytes:
        # Each column is serialised by orjson in one call and cut into per-row fragments
        # (numpy floats keep their own precision: 0.1, not 0.10000000149011612); a line is a
        # template filled with one fragment per column. Far faster than a dict per row.
        n = len(values["row"])
        fragments = [_json_fragments(values[c.name], n) for c in self.schema.columns]
        keys = [orjson.dumps(c.name).replace(b"%", b"%%") + b":%b" for c in self.schema.columns]
        template = b"{" + b",".join(keys) + b"}\n"
        return b"".join([template % row for row in zip(*fragments, strict=True)])

    def write_part(self, values: dict[str, np.ndarray], path: Path) -> None:
        path.write_bytes(self._lines(values))

    def open(self, target: Path) -> None:
        self._out = open(target, "wb")  # noqa: SIM115 - closed in close()

    def add(self, values: dict[str, np.ndarray], table: Any = None) -> None:
        self._out.write(self._lines(values))

    def close(self, parts: list[Path]) -> None:
        self._out.close()


def _json_fragments(values: np.ndarray, n: int) -> list[bytes]:
    """The JSON text of every element of ``values`` (rows of a vector column as arrays)."""
    if n == 0:
        return []
    if values.dtype.kind == "O":
        body = orjson.dumps([str(v) for v in values.tolist()])
        return [b'"' + s + b'"' for s in body[2:-2].split(b'","')]
    body = orjson.dumps(np.ascontiguousarray(values), option=orjson.OPT_SERIALIZE_NUMPY)
    if values.ndim == 1:
        return body[1:-1].split(b",")
    return [b"[" + s + b"]" for s in body[2:-2].split(b"],[")]


def _numpy_dtype(column: Column, text_width: int) -> np.dtype:
    base = np.dtype(f"U{max(text_width, 1)}") if column.text else column.dtype
    return np.dtype((base, (column.width,))) if column.width > 1 else base


def _text_width(values: np.ndarray) -> int:
    return max((len(str(v)) for v in values), default=1)


def _write_npy_header(fh: Any, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_2_0(fh, header)


class _FromParts(Writer):
    """Formats written in one go at the end (the width of text columns is known only then)."""

    streaming = False

    def open(self, target: Path) -> None:
        self._target = target

    def _widths(self, parts: list[Path]) -> tuple[dict[str, int], int]:
        """The widest text of every text column, and the number of rows, over all parts."""
        widths = {c.name: 1 for c in self.schema.columns if c.text}
        rows = 0
        for part in parts:
            values = read_work_part(part, self.schema)
            rows += len(values["row"])
            for name in widths:
                widths[name] = max(widths[name], _text_width(values[name]))
        return widths, rows


class NpyWriter(_FromParts):
    """A structured array: one field per column (text as fixed-width unicode)."""

    format, suffix = "npy", ".npy"

    def _dtype(self, widths: dict[str, int]) -> np.dtype:
        fields = [(c.name, _numpy_dtype(c, widths.get(c.name, 1))) for c in self.schema.columns]
        return np.dtype(fields)

    def _records(self, values: dict[str, np.ndarray], dtype: np.dtype) -> np.ndarray:
        out = np.empty(len(values["row"]), dtype)
        for c in self.schema.columns:
            out[c.name] = values[c.name]
        return out

    def write_part(self, values: dict[str, np.ndarray], path: Path) -> None:
        widths = {c.name: _text_width(values[c.name]) for c in self.schema.columns if c.text}
        with open(path, "wb") as fh:  # a path would get ".npy" appended
            np.save(fh, self._records(values, self._dtype(widths)), allow_pickle=False)

    def close(self, parts: list[Path]) -> None:
        widths, rows = self._widths(parts)
        dtype = self._dtype(widths)
        with open(self._target, "wb") as out:
            _write_npy_header(out, dtype, (rows,))
            for part in parts:
                out.write(self._records(read_work_part(part, self.schema), dtype).tobytes())


class NpzWriter(_FromParts):
    """One array per column, named after it."""

    format, suffix = "npz", ".npz"

    def write_part(self, values: dict[str, np.ndarray], path: Path) -> None:
        arrays: dict[str, Any] = {}
        for c in self.schema.columns:
            v = values[c.name]
            arrays[c.name] = v.astype(f"U{_text_width(v)}") if c.text else v
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    def close(self, parts: list[Path]) -> None:
        widths, rows = self._widths(parts)
        with zipfile.ZipFile(self._target, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for c in self.schema.columns:
                base = np.dtype(f"U{widths[c.name]}") if c.text else c.dtype
                shape = (rows, c.width) if c.width > 1 else (rows,)
                with archive.open(f"{c.name}.npy", "w", force_zip64=True) as out:
                    _write_npy_header(out, base, shape)
                    for part in parts:
                        column = read_work_part(part, self.schema)[c.name]
                        out.write(np.ascontiguousarray(column, dtype=base).tobytes())


_WRITERS: dict[str, type[Writer]] = {
    "csv": CsvWriter,
    "parquet": ParquetWriter,
    "jsonl": JsonLinesWriter,
    "npy": NpyWriter,
    "npz": NpzWriter,
}


def writer_for(fmt: str, schema: OutputSchema) -> Writer:
    _pa()
    return _WRITERS[fmt](schema)

"""What every chunked reader shares: the formats, input options, chunks and row errors, column
selection, the conversion of columns into the model's input, and the line index that CSV and
JSON Lines seek by."""

from __future__ import annotations

import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import JobFailed, SetupError
from ..model import ModelSpec

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
PARQUET_BATCH = 8192


def pyarrow_module() -> Any:
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
        elif self.model.is_text:
            features = _text_column(columns, kinds, id_col, str(self.path), self.model.name)
        elif self.model.input.name in columns and kinds.get(self.model.input.name) == "list":
            features = [self.model.input.name]
        else:
            features = [c for c in columns if c != id_col]
        if id_col in features:
            raise SetupError(f"input {self.path}: column {id_col!r} is both the id and a feature")
        return features, id_col


def _text_column(
    columns: list[str], kinds: dict[str, str], id_col: str | None, source: str, model: str
) -> list[str]:
    """A text model's column: ``text``, else the only column of strings."""
    if "text" in columns:
        return ["text"]
    strings = [c for c in columns if c != id_col and kinds.get(c, "text") == "text"]
    if len(strings) != 1:
        raise SetupError(
            f"input {source}: model '{model}' takes one column of text; there is no 'text' "
            f"column and {len(strings)} columns of strings {_show(strings)}: name it with "
            "--features"
        )
    return strings


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
            np.dtype(object)
            if model.is_text
            else np.dtype(np.float32)
            if target.kind == "f" and target.itemsize <= 4
            else np.dtype(np.float64)
        )

    def empty(self, n: int) -> np.ndarray:
        return np.empty((n, self.width), self.work)

    def fill_arrow(
        self, x: np.ndarray, offset: int, width: int, arr: Any, name: str, reasons: dict[int, str]
    ) -> None:
        """Write one Arrow column into ``x[:, offset:offset + width]``."""
        pa = pyarrow_module()
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
        if self.model.is_text:
            self._fill_text(x, offset, arr, name, reasons)
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
        pa = pyarrow_module()
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

    def _fill_text(self, x: np.ndarray, offset: int, arr: Any, name: str, reasons: dict) -> None:
        """A column of strings for a text model (numbers are read as their text)."""
        pa = pyarrow_module()
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            try:
                arr = pa.compute.cast(arr, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise JobFailed(
                    f"input {self.source}: column {name!r} holds {arr.type}; model "
                    f"'{self.model.name}' takes text"
                ) from None
        values = arr.to_pylist()
        for i, v in enumerate(values):
            if v is None:
                reasons.setdefault(i, f"column {name!r} is empty")
                values[i] = ""
        x[:, offset] = values

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
        finite = np.ones(len(x), bool) if self.model.is_text else np.isfinite(x).all(axis=1)
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


def ids_from_arrow(arr: Any, kind: str, name: str, reasons: dict[int, str]) -> np.ndarray:
    """An id column as int64 (``kind == "int"``) or str objects; a missing id is a bad row."""
    pa = pyarrow_module()
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


def arrow_kind(kind: Any) -> str:
    """'number', 'list', 'text' or 'other' for an Arrow type (decides feature defaults)."""
    pa = pyarrow_module()
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


def widths(reader: Reader, features: list[str], types: dict[str, Any]) -> list[tuple[str, int]]:
    """(name, values per row) of every feature column; they must add up to the model's width."""
    pa = pyarrow_module()
    fixed: dict[str, int] = {}
    variable = []
    for name in features:
        kind = types.get(name)
        category = arrow_kind(kind) if kind is not None else "number"
        if category == "other":
            raise SetupError(f"input {reader.path}: column {name!r} holds {kind}; expected numbers")
        if category == "list":
            assert kind is not None
            value_type = kind.value_type if not pa.types.is_dictionary(kind) else kind
            if pa.types.is_fixed_size_list(kind):
                fixed[name] = kind.list_size
            else:
                variable.append(name)
            if arrow_kind(value_type) not in ("number", "text"):
                raise SetupError(
                    f"input {reader.path}: column {name!r} holds {kind}; expected numbers"
                )
        else:
            fixed[name] = 1
    known = sum(fixed.values())
    need = reader.model.width
    spec = reader.model.input
    if reader.model.is_text:
        if len(features) != 1 or variable:
            raise SetupError(
                f"input {reader.path}: model '{reader.model.name}' takes one column of text; "
                f"got feature columns {_show(features)}"
            )
        return [(features[0], 1)]
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


class LineIndex:
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


class LineReader(Reader):
    """A text file read chunk by chunk: seek to the chunk's first line (``self.index``), parse."""

    index: LineIndex
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

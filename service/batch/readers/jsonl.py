"""JSON Lines files: one object (or array) a row, with a fast path for flat rows."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import orjson

from ..errors import JobFailed, SetupError
from ..model import ModelSpec
from .base import (
    Chunk,
    InputOptions,
    LineIndex,
    LineReader,
    arrow_kind,
    ids_from_arrow,
    pyarrow_module,
    widths,
)


class JsonLinesReader(LineReader):
    """One JSON object (features by key) or array (features in order) per line."""

    format = "jsonl"

    def __init__(self, options: InputOptions, model: ModelSpec) -> None:
        super().__init__(options, model)
        self.index = LineIndex(self.path, 0, self.chunk_rows)
        self.total_rows = self.index.total_rows
        sample = self._first_object()
        self.id_kind = "str"
        if isinstance(sample, dict):
            columns = list(sample)
            kinds = {k: "list" if isinstance(v, list) else "number" for k, v in sample.items()}
            features, id_col = self._select(columns, kinds)
            types = {}
            pa = pyarrow_module()
            for f in features:
                if isinstance(sample[f], list):
                    types[f] = pa.list_(pa.float64())
            self.column_widths = widths(self, features, types)
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
        pa = pyarrow_module()
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
        if any(arrow_kind(table.schema.field(f).type) == "other" for f in needed):
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
            ids = ids_from_arrow(
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
        x[list(reasons)] = "" if self.model.is_text else 0.0  # judged already: no NaN checks
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
        if self.model.is_text:
            if not isinstance(values[0], str):
                return f"{values[0]!r} is not text; model '{self.model.name}' takes strings"
            x[i] = values
            return None
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

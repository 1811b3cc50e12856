"""NumPy files: an NPY array memory-mapped, NPZ members read in place."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SetupError
from ..model import ModelSpec
from .base import Chunk, InputOptions, Reader


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

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

import os

from ..errors import SetupError
from ..model import ModelSpec
from .arrays import NpyReader, NpzReader
from .base import (
    DEFAULT_CHUNK_ROWS,
    INPUT_FORMATS,
    SUFFIX_FORMATS,
    Chunk,
    InputOptions,
    Reader,
    RowError,
    input_format,
)
from .csv import CsvReader
from .images import PngFolderReader
from .jsonl import JsonLinesReader
from .parquet import ParquetReader

__all__ = [
    "INPUT_FORMATS",
    "DEFAULT_CHUNK_ROWS",
    "SUFFIX_FORMATS",
    "InputOptions",
    "RowError",
    "Chunk",
    "Reader",
    "open_reader",
    "input_format",
]

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

"""Folders of PNG images: one row a file, in name order."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import SetupError
from ..model import ModelSpec
from ..png import PngError, read_png
from .base import Chunk, InputOptions, Reader


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

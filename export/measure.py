"""One measurement of a model's variants, used by the build, the report and the selection.

Every variant is measured on the same held-out test split as the FP32 reference: the task
metrics, agreement with FP32, size on disk, parameter count, and in-process onnxruntime latency
at batch 1 and 32. Latency is taken in one run with the variants interleaved (variant A, B, C,
A, B, C, ...) after a warm-up, every session with the same thread settings, so drift on a noisy
machine hits all variants alike; speed is reported as ratios to FP32 from that one run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from service.core.runtime import OrtSession, RuntimeOptions

from .spec import CHUNK_ROWS, Feeds, Runner, chunked

__all__ = ["LATENCY_BATCH_SIZES", "MeasureConfig", "Measurement", "count_parameters", "measure"]

LATENCY_BATCH_SIZES = (1, 32)
REFERENCE = "fp32"


@dataclass(frozen=True)
class MeasureConfig:
    """Latency settings: the same for every variant of a run."""

    intra_op_threads: int = 1
    warmup: int = 20
    #: repetitions per (variant, batch size) cell: enough for ``target_seconds``, within bounds
    target_seconds: float = 0.25
    min_repeats: int = 30
    max_repeats: int = 400
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __post_init__(self) -> None:
        if self.min_repeats < 3 or self.max_repeats < self.min_repeats:
            raise ValueError("need 3 <= min_repeats <= max_repeats")


@dataclass
class Measurement:
    variant: str
    metrics: dict[str, float]
    size_bytes: int
    parameters: int
    #: batch size -> {"p50_us", "p95_us", "samples_per_s"}
    latency: dict[int, dict[str, float]]
    #: share of rows whose integer outputs (labels, clusters) equal FP32's; None without any
    label_agreement: float | None
    #: largest |variant - FP32| over float outputs on the test split
    max_abs_diff: float | None
    #: this variant's batch-size throughput divided by FP32's, from the same run
    speedup: dict[int, float] = field(default_factory=dict)
    provider: str = "CPUExecutionProvider"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency"] = {str(k): v for k, v in self.latency.items()}
        data["speedup"] = {str(k): v for k, v in self.speedup.items()}
        return data


def count_parameters(path: Path) -> int:
    """Numbers stored in the graph: initializers, Constant tensors and numeric attribute arrays
    (tree and SVM operators keep theirs in attributes). Shape constants count too: a few."""
    model = onnx.load(str(path), load_external_data=False)
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                total += int(np.prod(attr.t.dims))
            elif attr.type in (onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS):
                total += len(attr.floats) + len(attr.ints)
    return total


def _agreement(
    reference: list[np.ndarray], outputs: list[np.ndarray]
) -> tuple[float | None, float | None]:
    shares, diffs = [], []
    for ref, got in zip(reference, outputs, strict=True):
        ref, got = np.asarray(ref), np.asarray(got)
        rows = ref.shape[0] if ref.ndim else 1
        if ref.dtype.kind in "iub":
            same = (ref.reshape(rows, -1) == got.reshape(rows, -1)).all(axis=1)
            shares.append(float(same.mean()))
        else:
            diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
            diffs.append(float(diff.max()) if diff.size else 0.0)
    return (min(shares) if shares else None), (max(diffs) if diffs else None)


def _repeats(seconds_per_run: float, config: MeasureConfig) -> int:
    wanted = int(config.target_seconds / max(seconds_per_run, 1e-7))
    return max(config.min_repeats, min(config.max_repeats, wanted))


def measure(
    files: dict[str, Path],
    evaluate: Callable[[Callable[[Feeds], list[np.ndarray]]], dict[str, float]],
    test_feeds: Feeds,
    batch_feeds: Callable[[int], Feeds],
    config: MeasureConfig | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> dict[str, Measurement]:
    """Measure ``files`` (variant -> ONNX path; must include ``"fp32"``) in one interleaved run."""
    if REFERENCE not in files:
        raise ValueError(f"measure() needs the {REFERENCE!r} reference among {sorted(files)}")
    config = config or MeasureConfig()
    options = RuntimeOptions(config.providers, intra_op_threads=config.intra_op_threads)
    sessions = {
        v: OrtSession(path, f"{path.parent.name}:{v}", options) for v, path in files.items()
    }
    latency: dict[str, dict[int, dict[str, float]]] = {v: {} for v in sessions}
    for batch in LATENCY_BATCH_SIZES:
        feeds = batch_feeds(batch)
        for session in sessions.values():
            for _ in range(config.warmup):
                session.run(feeds)
        start = time.perf_counter()
        sessions[REFERENCE].run(feeds)
        repeats = _repeats(time.perf_counter() - start, config)
        times: dict[str, list[float]] = {v: [] for v in sessions}
        for _ in range(repeats):
            for variant, session in sessions.items():
                t0 = time.perf_counter()
                session.run(feeds)
                times[variant].append(time.perf_counter() - t0)
        for variant, samples in times.items():
            p50, p95 = np.percentile(samples, [50, 95])
            latency[variant][batch] = {
                "p50_us": float(p50 * 1e6),
                "p95_us": float(p95 * 1e6),
                "samples_per_s": float(batch / p50),
                "repeats": repeats,
            }

    for session in sessions.values():
        session.close()
    # test metrics on sessions with every core: they do not time anything, and a Transformer's
    # pass over thousands of documents on one thread would take the build many minutes
    whole = RuntimeOptions(config.providers, intra_op_threads=0)
    sessions = {v: OrtSession(path, f"{path.parent.name}:{v}", whole) for v, path in files.items()}
    runs = {v: chunked(s.run, chunk_rows) for v, s in sessions.items()}
    reference_outputs = runs[REFERENCE](test_feeds)
    results = {}
    for variant, session in sessions.items():
        outputs = reference_outputs if variant == REFERENCE else runs[variant](test_feeds)
        label_agreement, max_diff = _agreement(reference_outputs, outputs)
        results[variant] = Measurement(
            variant=variant,
            metrics=evaluate(_remembering(runs[variant], test_feeds, outputs)),
            size_bytes=files[variant].stat().st_size,
            parameters=count_parameters(files[variant]),
            latency=latency[variant],
            label_agreement=label_agreement,
            max_abs_diff=max_diff,
            speedup={
                b: latency[REFERENCE][b]["p50_us"] / latency[variant][b]["p50_us"]
                for b in LATENCY_BATCH_SIZES
            },
            provider=session.provider,
        )
    return results


def _remembering(run: Runner, feeds: Feeds, outputs: list[np.ndarray]) -> Runner:
    """``run``, answering ``feeds`` (the very object) with the ``outputs`` it already gave:
    a test split is run once per variant, however often its evaluation asks for it."""

    def remembered(asked: Feeds) -> list[np.ndarray]:
        return outputs if asked is feeds else run(asked)

    return remembered

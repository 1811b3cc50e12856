"""Verification is code: the exported graph is checked, then compared with its source model.

A failure raises an error that names the model, the output, the batch size and the max difference;
the build stops before anything is published.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from service.core.repository import TensorSpec
from service.core.runtime import ModelLoadError, OrtSession, RuntimeOptions

from .spec import CHUNK_ROWS, PARITY_BATCH_SIZES, Feeds, Runner, Trained, chunked

__all__ = ["ExportError", "ParityError", "ort_runner", "graph_signature", "check_parity"]


class ExportError(Exception):
    """An export or its verification failed; the message names the model."""


class ParityError(ExportError):
    """The ONNX model disagrees with its source model beyond the documented tolerance."""


def ort_runner(path: Path, chunk_rows: int = CHUNK_ROWS) -> Runner:
    """A CPU onnxruntime session over ``path`` (the server's own session class), as a function."""
    session = OrtSession(path, path.parent.name, RuntimeOptions(["CPUExecutionProvider"]))
    return chunked(session.run, chunk_rows)


def graph_signature(name: str, path: Path) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """Inputs, outputs and default-domain opset of an ONNX file, with every batch axis dynamic.

    The shapes are what onnxruntime reports (symbolic dimensions become ``-1``), so the manifest
    describes exactly what the server will see.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"model {name!r}: {path.name} is not a valid ONNX graph: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    try:
        session = OrtSession(path, name, RuntimeOptions(["CPUExecutionProvider"]))
    except ModelLoadError as exc:
        raise ExportError(f"model {name!r}: {exc}") from exc
    inputs, outputs = session.inputs, session.outputs
    for kind, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            if not spec.shape or spec.shape[0] != -1:
                raise ExportError(
                    f"model {name!r}: {kind} {spec.name!r} has shape {list(spec.shape)}; "
                    "expected a dynamic batch axis first (export with example batch >= 2 and "
                    "dynamic shapes)"
                )
    return inputs, outputs, opset


def _compare(ref: np.ndarray, got: np.ndarray, trained: Trained) -> tuple[float, np.ndarray]:
    """Max absolute difference, and per row whether it is within tolerance."""
    ref = np.asarray(ref)
    got = np.asarray(got)
    rows = got.shape[0] if got.ndim else 1
    if ref.dtype.kind in "iub":
        row_ok = (ref.reshape(rows, -1) == got.reshape(rows, -1)).all(axis=1)
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    else:
        tol = trained.tolerance
        ref64 = ref.astype(np.float64)
        diff = np.abs(ref64 - got.astype(np.float64))
        ok = diff <= tol.atol + tol.rtol * np.abs(ref64)
        row_ok = ok.reshape(rows, -1).all(axis=1)
    return (float(diff.max()) if diff.size else 0.0), row_ok


def check_parity(
    name: str, trained: Trained, runner: Runner, output_names: list[str]
) -> dict[str, Any]:
    """Compare ONNX and source outputs at batch sizes 1, 7, 64 and on the whole test split.

    Each output must have at least ``tolerance.min_agreement`` of all compared rows within
    tolerance (pooled over the batch sizes, so a rare disagreeing row is judged as a share).
    """
    tol = trained.tolerance
    checks = []
    pooled: dict[str, list[np.ndarray]] = {n: [] for n in output_names}
    worst: dict[str, tuple[float, str | int]] = {n: (0.0, "-") for n in output_names}
    cases: list[tuple[str | int, Feeds]] = [(bs, trained.feeds(bs)) for bs in PARITY_BATCH_SIZES]
    whole = trained.parity_feeds if trained.parity_feeds is not None else trained.test_feeds
    cases.append(("test", whole))
    for batch, feeds in cases:
        ref_outputs = trained.reference(feeds)
        onnx_outputs = runner(feeds)
        if len(ref_outputs) != len(onnx_outputs):
            raise ParityError(
                f"model {name!r}: the source model gives {len(ref_outputs)} outputs, "
                f"the ONNX graph {len(onnx_outputs)} ({output_names})"
            )
        result: dict[str, Any] = {"batch_size": batch, "outputs": {}}
        for out_name, ref, got in zip(output_names, ref_outputs, onnx_outputs, strict=True):
            if np.shape(ref) != np.shape(got):
                raise ParityError(
                    f"model {name!r}: output {out_name!r} at batch size {batch}: ONNX shape "
                    f"{list(np.shape(got))} differs from the source model's {list(np.shape(ref))}"
                )
            max_diff, row_ok = _compare(ref, got, trained)
            result["outputs"][out_name] = {
                "max_abs_diff": max_diff,
                "agreement": float(row_ok.mean()) if row_ok.size else 1.0,
            }
            pooled[out_name].append(row_ok)
            if max_diff >= worst[out_name][0]:
                worst[out_name] = (max_diff, batch)
        checks.append(result)
    agreement = {n: float(np.concatenate(v).mean()) for n, v in pooled.items()}
    for out_name, share in agreement.items():
        if share < tol.min_agreement:
            max_diff, batch = worst[out_name]
            raise ParityError(
                f"model {name!r}: output {out_name!r}: max |onnx - source| = {max_diff:.3g} "
                f"(at batch size {batch}); {share:.2%} of rows within atol={tol.atol:g} + "
                f"rtol={tol.rtol:g}*|source|, {tol.min_agreement:.1%} required"
            )
    return {
        "tolerance": {"atol": tol.atol, "rtol": tol.rtol, "min_agreement": tol.min_agreement},
        "agreement": agreement,
        "checks": checks,
        "passed": True,
    }

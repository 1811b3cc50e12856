"""Compression on the ONNX graph: INT8 dynamic and static (QDQ) quantization, FP16 for GPUs.

Functions go path in -> path out and return the configuration that produced the file (written
into the manifest beside it). Pruning and distillation change the network itself, so they live
with the PyTorch models (:mod:`export.torch_compress`); :func:`build_variants` runs them all for
one model and records, per technique, either a variant file or why there is none.

A compressor that fails raises :class:`CompressionError` naming the model and the cause; the
build records it as the variant's reason and the FP32 model stays the one that is served.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .spec import Feeds, Trained
from .verify import ExportError

__all__ = [
    "TECHNIQUES",
    "CALIBRATION_METHODS",
    "CompressionError",
    "NotApplicable",
    "VariantResult",
    "StaticConfig",
    "quantizable_ops",
    "quantize_dynamic",
    "quantize_static",
    "convert_fp16",
    "build_variants",
]

#: every variant a model may have besides its FP32 reference, in the order they are built
TECHNIQUES = ("int8-dynamic", "int8-static", "pruned", "distilled", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: operators onnxruntime's quantizers turn into integer kernels (with a constant weight)
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
_CONV_OPS = ("Conv", "ConvTranspose")
_CUDA = "CUDAExecutionProvider"

log = logging.getLogger("slimserve.export.compress")


class CompressionError(ExportError):
    """A compressor could not produce a valid variant; the message names the model and cause."""


class NotApplicable(Exception):
    """The technique does not apply to this model; the message says why (kept in the manifest)."""


@dataclass
class VariantResult:
    """One technique's outcome: a file in the version folder, or the reason there is none."""

    technique: str
    file: str | None
    details: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    #: an execution provider the variant needs to run at all (FP16: CUDA)
    requires_provider: str | None = None


@dataclass(frozen=True)
class StaticConfig:
    """Static (QDQ) quantization: how activations are calibrated and weights are scaled.

    Activations are unsigned 8-bit and weights signed (U8S8): on x86 without VNNI, signed
    activations (S8S8) in QDQ graphs measured 0.70x FP32 for the digits CNN, U8S8 1.8x.
    """

    method: str = "minmax"
    per_channel: bool = True
    max_batches: int = 16
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(
                f"calibration method {self.method!r} is unknown; "
                f"expected one of {', '.join(CALIBRATION_METHODS)}"
            )
        if self.max_batches < 1 or self.batch_size < 1:
            raise ValueError("max_batches and batch_size must be >= 1")


def quantizable_ops(path: Path) -> Counter[str]:
    """Default-domain MatMul / Gemm / Conv nodes whose weight is a constant initializer."""
    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    ops: Counter[str] = Counter()
    for node in model.graph.node:
        weighted = len(node.input) > 1 and node.input[1] in constants
        if node.domain in ("", "ai.onnx") and node.op_type in _WEIGHT_OPS and weighted:
            ops[node.op_type] += 1
    return ops


def _ml_ops(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return sorted({n.op_type for n in model.graph.node if n.domain == "ai.onnx.ml"})


@contextlib.contextmanager
def _quiet() -> Any:
    """onnxruntime's quantization tools warn through the root logger once per weight they
    leave alone (a Transformer: dozens of lines per build); the card records what was done."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.tools.symbolic_shape_infer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _preprocess(name: str, src: Path, dst: Path) -> None:
    """onnxruntime's recommended step before quantizing: shape inference and graph folding."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return
    except Exception as exc:  # the tool raises plain Exceptions; name the model and keep cause
        first = exc
    # symbolic shape inference does not know every operator (skl2onnx graphs): retry without
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as exc:
        raise CompressionError(
            f"model {name!r}: onnxruntime's quantization pre-processing failed on {src.name}: "
            f"{type(first).__name__}: {first}; without symbolic shapes: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def quantize_dynamic(
    name: str, src: Path, dst: Path, conv: bool = False, per_channel: bool = False
) -> dict[str, Any]:
    """INT8 weights, activations quantized on the fly per batch (no calibration).

    ``conv=False`` quantizes MatMul / Gemm only: dynamic ConvInteger measured 2.8x slower than
    FP32 on AVX2 CPUs without VNNI, so convolutions stay FP32 unless asked. ``per_channel``
    gives each output channel of a weight its own scale: all-MiniLM-L6-v2's embeddings kept
    a mean cosine of 0.993 to FP32 with it and 0.94 without (20 Newsgroups documents).
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    ops = quantizable_ops(src)
    if not (ops.get("MatMul") or ops.get("Gemm") or (conv and ops.get("Conv"))):
        raise NotApplicable(_no_weights_reason(src, ops))
    src, dst = src.resolve(), dst.resolve()
    # onnxruntime's tools leave temporary files in the working directory: give them a scratch one
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp), _quiet():
        pre = Path(tmp) / "pre.onnx"
        _preprocess(name, src, pre)
        found = quantizable_ops(pre)
        # always both: onnxruntime's dynamic quantizer handles Gemm through its MatMul path
        wanted = ["MatMul", "Gemm", *(["Conv"] if conv else [])]
        try:
            ort_quantize_dynamic(
                str(pre),
                str(dst),
                op_types_to_quantize=wanted,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
            )
        except Exception as exc:
            raise CompressionError(
                f"model {name!r}: dynamic INT8 quantization failed: {type(exc).__name__}: {exc}"
            ) from exc
    return {
        "technique": "onnxruntime quantize_dynamic after quant_pre_process",
        "weights": f"int8, per {'channel' if per_channel else 'tensor'}",
        "activations": "uint8, scale computed per batch at run time",
        "op_types": wanted,
        "nodes_quantized": {op: found[op] for op in wanted if found.get(op)},
    }


class _Calibration:
    """onnxruntime's CalibrationDataReader over a list of feeds, checked against the graph."""

    def __init__(self, batches: list[Feeds]) -> None:
        self._batches = batches
        self._iter = iter(batches)

    def get_next(self) -> Feeds | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def calibration_batches(
    name: str, src: Path, data: Feeds | None, config: StaticConfig
) -> list[Feeds]:
    """Split calibration inputs into batches after checking names, dtypes and shapes."""
    if data is None:
        raise NotApplicable("no calibration data: the trainer provides no training inputs")
    graph = onnx.load(str(src), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    graph_inputs = {
        i.name: [
            d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim
        ]
        for i in graph.input
        if i.name not in initializers
    }
    missing = sorted(set(graph_inputs) - set(data))
    if missing:
        raise CompressionError(
            f"model {name!r}: calibration data lacks input(s) {missing}; "
            f"expected {sorted(graph_inputs)}, got {sorted(data)}"
        )
    lengths = set()
    for key, expected in graph_inputs.items():
        array = np.asarray(data[key])
        fits = array.ndim == len(expected) and all(
            e == -1 or e == a for e, a in zip(expected, array.shape, strict=False)
        )
        if not fits:
            raise CompressionError(
                f"model {name!r}: calibration input {key!r}: expected shape {expected}, "
                f"got {list(array.shape)}"
            )
        lengths.add(array.shape[0])
    if lengths == {0} or not lengths:
        raise CompressionError(
            f"model {name!r}: calibration data is empty; expected at least one sample per input"
        )
    if len(lengths) != 1:
        raise CompressionError(
            f"model {name!r}: calibration inputs have different numbers of samples "
            f"{sorted(lengths)}"
        )
    n = min(lengths.pop(), config.max_batches * config.batch_size)
    if n > config.batch_size:  # whole batches only: histogram calibrators stack them
        n -= n % config.batch_size
    return [
        {k: np.asarray(data[k])[i : i + config.batch_size] for k in graph_inputs}
        for i in range(0, n, config.batch_size)
    ]


def quantize_static(
    name: str,
    src: Path,
    dst: Path,
    calibration: Feeds | None,
    config: StaticConfig | None = None,
    nodes_to_exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """INT8 QDQ graph, activation ranges calibrated on ``calibration`` (training inputs)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    config = config or StaticConfig()
    ops = quantizable_ops(src)
    if not ops:
        raise NotApplicable(_no_weights_reason(src, ops))
    batches = calibration_batches(name, src, calibration, config)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[config.method]
    src, dst = src.resolve(), dst.resolve()
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp), _quiet():
        pre = Path(tmp) / "pre.onnx"
        _preprocess(name, src, pre)

        def run(extra: dict[str, Any]) -> None:
            ort_quantize_static(
                str(pre),
                str(dst),
                _Calibration(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                nodes_to_exclude=list(nodes_to_exclude),
                extra_options={"CalibTensorRangeSymmetric": False, **extra},
            )

        try:
            run({})
        except Exception as exc:
            # onnxruntime's per-channel check that widens weight scales for tiny int32 biases
            # indexes the bias as a vector and fails on a broadcast (1, N) bias (skl2onnx's
            # naive Bayes graphs); the check is optional, so retry once without it.
            try:
                run({"QDQDisableWeightAdjustForInt32Bias": True})
            except Exception:
                raise CompressionError(
                    f"model {name!r}: static INT8 quantization failed: {type(exc).__name__}: {exc}"
                ) from exc
            notes["retry"] = (
                f"weight-scale adjustment for int32 biases disabled "
                f"(onnxruntime failed with it: {type(exc).__name__})"
            )
    return {
        "technique": "onnxruntime quantize_static, QDQ format, after quant_pre_process",
        "weights": "int8, " + ("per channel" if config.per_channel else "per tensor"),
        "activations": "uint8, ranges calibrated ahead of time",
        "calibration": {
            "method": config.method,
            "samples": sum(len(next(iter(b.values()))) for b in batches),
            "source": "training split",
        },
        "nodes_quantized": dict(ops),
        "nodes_kept_fp32": list(nodes_to_exclude),
        **notes,
    }


def convert_fp16(name: str, src: Path, dst: Path) -> dict[str, Any]:
    """Float16 weights and compute, float32 inputs and outputs (a Cast at each end)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    ml = _ml_ops(src)
    if ml:
        raise NotApplicable(
            f"the graph uses ai.onnx.ml operators {ml}, which have no float16 kernels"
        )
    model = onnx.load(str(src))
    try:
        converted = convert_float_to_float16(model, keep_io_types=True)
        _sort_topologically(converted.graph)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise CompressionError(
            f"model {name!r}: float16 conversion failed: {type(exc).__name__}: {exc}"
        ) from exc
    onnx.save(converted, str(dst))
    return {
        "technique": "onnxruntime.transformers.float16.convert_float_to_float16",
        "io_types": "float32 (kept)",
        "compute": "float16",
    }


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its inputs' producers (the FP16 converter appends the
    input casts at the end, which onnx.checker rejects)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or dangling inputs at {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _no_weights_reason(path: Path, ops: Counter[str]) -> str:
    ml = _ml_ops(path)
    if ml:
        return (
            f"no MatMul, Gemm or Conv with constant weights to quantize: the graph is made of "
            f"ai.onnx.ml operators {ml}"
        )
    return "no MatMul, Gemm or Conv with constant weights to quantize"


def cuda_available() -> bool:
    return _CUDA in ort.get_available_providers()


def build_variants(
    name: str,
    trained: Trained,
    folder: Path,
    reference: str = "model.onnx",
    static: StaticConfig | None = None,
) -> list[VariantResult]:
    """Every technique of :data:`TECHNIQUES` for one model, as files in ``folder``.

    Each technique gives a file or a reason; a failing compressor is logged and recorded, and
    the next one runs (the FP32 model is never touched).
    """
    src = folder / reference
    conv_model = any(quantizable_ops(src).get(op) for op in _CONV_OPS)

    def fp16(dst: Path) -> dict[str, Any]:
        return convert_fp16(name, src, dst)

    builders: dict[str, Callable[[Path], dict[str, Any]]] = {
        "int8-dynamic": lambda dst: quantize_dynamic(name, src, dst, conv=False),
        "int8-static": lambda dst: quantize_static(name, src, dst, trained.calibration, static),
        **trained.variants,
        "fp16": fp16,
    }
    results = []
    for technique in TECHNIQUES:
        file = f"model.{technique}.onnx"
        builder = builders.get(technique)
        if builder is None:
            reason = trained.not_applicable.get(technique) or _default_reason(technique, trained)
            results.append(VariantResult(technique, None, reason=f"not applicable: {reason}"))
            continue
        try:
            details = builder(folder / file)
        except NotApplicable as exc:
            results.append(VariantResult(technique, None, reason=f"not applicable: {exc}"))
            continue
        except (CompressionError, ExportError) as exc:
            log.warning("%s", exc)
            (folder / file).unlink(missing_ok=True)
            results.append(VariantResult(technique, None, reason=f"failed: {exc}"))
            continue
        if technique == "int8-dynamic" and conv_model:
            details["note"] = "convolutions kept FP32 (dynamic ConvInteger is slower on AVX2)"
        result = VariantResult(technique, file, details)
        if technique == "fp16":
            result.requires_provider = _CUDA
            if not cuda_available():
                result.reason = (
                    "built but not measured or served here: onnxruntime's CPU build lacks most "
                    f"float16 kernels, and this machine's onnxruntime has no {_CUDA}"
                )
        results.append(result)
    return results


def _default_reason(technique: str, trained: Trained) -> str:
    if technique in ("pruned", "distilled") and trained.producer.get("exporter", "").startswith(
        "skl2onnx"
    ):
        return (
            "a scikit-learn estimator has no neurons or channels to remove"
            if technique == "pruned"
            else "distillation trains a neural student on a neural teacher's soft outputs"
        )
    return f"{technique} is not implemented for this model's architecture"

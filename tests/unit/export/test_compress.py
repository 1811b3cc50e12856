"""Compressors on tiny hand-built graphs: valid output, agreement with FP32, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.compress import (
    CompressionError,
    NotApplicable,
    StaticConfig,
    build_variants,
    convert_fp16,
    quantizable_ops,
    quantize_dynamic,
    quantize_static,
)
from export.measure import count_parameters
from export.spec import Trained

# documented tolerances (README, "Compression"): INT8 label agreement with FP32 on held-out rows
INT8_MIN_LABEL_AGREEMENT = 0.95


def write_mlp(path: Path, sizes=(16, 256, 4), seed: int = 0) -> None:
    """x -> Gemm -> Relu -> Gemm -> (label = ArgMax, probabilities = Softmax)."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes += [
        helper.make_node("Softmax", [prev], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", sizes[-1]]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    write_mlp(path)
    return path


X = np.random.default_rng(1).standard_normal((400, 16)).astype(np.float32)


def test_dynamic_int8_is_smaller_and_agrees(mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "dyn.onnx"
    details = quantize_dynamic("tiny", mlp, out)
    assert details["nodes_quantized"] == {"Gemm": 2}
    onnx.checker.check_model(str(out))
    assert out.stat().st_size < mlp.stat().st_size / 2
    ref, got = run(mlp, X), run(out, X)
    assert np.mean(ref[0] == got[0]) >= INT8_MIN_LABEL_AGREEMENT
    assert np.abs(ref[1] - got[1]).max() < 0.05


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_int8_with_each_calibration_method(mlp: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / "static.onnx"
    details = quantize_static("tiny", mlp, out, {"x": X[:200]}, StaticConfig(method=method))
    # whole batches of 64 only: 3 of them
    assert details["calibration"]["method"] == method and details["calibration"]["samples"] == 192
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    ref, got = run(mlp, X[200:]), run(out, X[200:])
    assert np.mean(ref[0] == got[0]) >= INT8_MIN_LABEL_AGREEMENT


def test_static_int8_on_a_broadcast_bias(tmp_path: Path) -> None:
    """skl2onnx's naive Bayes: MatMul then Add of a (1, N) bias. onnxruntime's int32-bias scale
    check fails on it (ValueError); the retry without that check must give a working model."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    bias = rng.standard_normal((1, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "bias"], ["scores"]),
            helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
        ],
        "nb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    src, out = tmp_path / "nb.onnx", tmp_path / "nb.int8.onnx"
    onnx.save(model, str(src))
    details = quantize_static("nb", src, out, {"x": X[:128]})
    assert "int32 biases disabled" in details["retry"]
    ref, got = run(src, X[200:]), run(out, X[200:])
    assert np.mean(ref[0] == got[0]) >= INT8_MIN_LABEL_AGREEMENT


def test_unknown_calibration_method_is_named() -> None:
    with pytest.raises(
        ValueError,
        match="calibration method 'kl' is unknown; expected one of minmax, entropy, percentile",
    ):
        StaticConfig(method="kl")


def test_empty_calibration_data(mlp: Path, tmp_path: Path) -> None:
    with pytest.raises(CompressionError, match="model 'tiny': calibration data is empty"):
        quantize_static("tiny", mlp, tmp_path / "s.onnx", {"x": X[:0]})
    assert not (tmp_path / "s.onnx").exists()


def test_calibration_data_of_the_wrong_shape(mlp: Path, tmp_path: Path) -> None:
    with pytest.raises(
        CompressionError,
        match=r"model 'tiny': calibration input 'x': expected shape \[-1, 16\], got \[10, 15\]",
    ):
        quantize_static("tiny", mlp, tmp_path / "s.onnx", {"x": X[:10, :15]})


def test_calibration_data_missing_an_input(mlp: Path, tmp_path: Path) -> None:
    with pytest.raises(CompressionError, match=r"calibration data lacks input\(s\) \['x'\]"):
        quantize_static("tiny", mlp, tmp_path / "s.onnx", {"pixels": X})


def test_a_graph_without_weights_is_not_applicable(tmp_path: Path) -> None:
    from tests.conftest import write_identity_onnx

    path = tmp_path / "id.onnx"
    write_identity_onnx(path)
    assert not quantizable_ops(path)
    with pytest.raises(NotApplicable, match="no MatMul, Gemm or Conv"):
        quantize_dynamic("id", path, tmp_path / "d.onnx")


def test_a_file_that_cannot_be_quantized_names_the_model(tmp_path: Path, mlp: Path) -> None:
    broken = tmp_path / "broken.onnx"
    model = onnx.load(str(mlp))
    model.graph.node[0].input[1] = "w1"  # a [256, 4] weight where [16, 256] belongs: shapes clash
    onnx.save(model, str(broken))
    with pytest.raises(CompressionError, match="model 'broken'"):
        quantize_static("broken", broken, tmp_path / "s.onnx", {"x": X[:50]})


def test_fp16_keeps_float32_inputs_and_outputs(mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16.onnx"
    convert_fp16("tiny", mlp, out)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[1].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    assert count_parameters(out) == count_parameters(mlp)


def test_build_variants_records_a_file_or_a_reason_for_every_technique(
    mlp: Path, tmp_path: Path
) -> None:
    folder = mlp.parent
    trained = Trained(
        export=lambda p: None,
        reference=lambda f: [],
        feeds=lambda n: {"x": X[:n]},
        test_feeds={"x": X},
        evaluate=lambda run: {},
        headline="accuracy",
        calibration=None,  # static INT8 cannot run: says so instead of failing the build
        not_applicable={"pruned": "nothing to prune", "distilled": "no student"},
    )
    results = {r.technique: r for r in build_variants("tiny", trained, folder)}
    assert list(results) == ["int8-dynamic", "int8-static", "pruned", "distilled", "fp16"]
    assert results["int8-dynamic"].file == "model.int8-dynamic.onnx"
    assert (folder / "model.int8-dynamic.onnx").is_file()
    assert results["int8-static"].file is None
    assert "no calibration data" in results["int8-static"].reason
    assert results["pruned"].reason == "not applicable: nothing to prune"
    assert results["fp16"].requires_provider == "CUDAExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "has no CUDAExecutionProvider" in results["fp16"].reason

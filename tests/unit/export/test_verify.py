from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.spec import Tolerance, Trained
from export.verify import ExportError, ParityError, check_parity, graph_signature, ort_runner
from tests.conftest import write_identity_onnx


def _trained(reference, tolerance: Tolerance | None = None) -> Trained:
    x = np.linspace(0, 1, 40, dtype=np.float32).reshape(10, 4)
    return Trained(
        export=lambda p: None,
        reference=reference,
        feeds=lambda n: {"x": np.resize(x, (n, 4))},
        test_feeds={"x": x},
        evaluate=lambda run: {},
        headline="none",
        tolerance=tolerance or Tolerance(),
    )


def test_identical_outputs_pass_at_every_batch_size(tmp_path: Path) -> None:
    write_identity_onnx(tmp_path / "m.onnx")
    result = check_parity(
        "id", _trained(lambda f: [f["x"]]), ort_runner(tmp_path / "m.onnx"), ["y"]
    )
    assert [c["batch_size"] for c in result["checks"]] == [1, 7, 64, "test"]
    assert all(c["outputs"]["y"]["max_abs_diff"] == 0.0 for c in result["checks"])
    assert result["passed"] is True


def test_a_difference_beyond_tolerance_names_model_output_and_max_diff(tmp_path: Path) -> None:
    write_identity_onnx(tmp_path / "m.onnx")
    trained = _trained(lambda f: [f["x"] + 0.01], Tolerance(atol=1e-3, rtol=0))
    with pytest.raises(ParityError) as info:
        check_parity("shifty", trained, ort_runner(tmp_path / "m.onnx"), ["y"])
    message = str(info.value)
    assert "model 'shifty'" in message and "output 'y'" in message
    assert "batch size" in message and "0.01" in message


def test_min_agreement_tolerates_rare_rows(tmp_path: Path) -> None:
    """Tree models may disagree on at most 0.1% of rows; a 1-in-64 miss still fails."""
    write_identity_onnx(tmp_path / "m.onnx")

    def one_bad_row(f):
        out = f["x"].copy()
        out[0] += 1.0
        return [out]

    tol = Tolerance(atol=1e-6, rtol=0, min_agreement=0.999)
    with pytest.raises(ParityError, match=r"rows within"):
        check_parity("tree", _trained(one_bad_row, tol), ort_runner(tmp_path / "m.onnx"), ["y"])
    loose = Tolerance(atol=1e-6, rtol=0, min_agreement=0.5)
    check_parity("tree", _trained(one_bad_row, loose), ort_runner(tmp_path / "m.onnx"), ["y"])


def test_shape_mismatch_is_a_parity_error(tmp_path: Path) -> None:
    write_identity_onnx(tmp_path / "m.onnx")
    trained = _trained(lambda f: [f["x"][:, :2]])
    with pytest.raises(ParityError, match=r"ONNX shape \[1, 4\] differs .* \[1, 2\]"):
        check_parity("m", trained, ort_runner(tmp_path / "m.onnx"), ["y"])


def test_graph_signature_reads_dynamic_batch(tmp_path: Path) -> None:
    write_identity_onnx(tmp_path / "m.onnx", width=5)
    inputs, outputs, opset = graph_signature("m", tmp_path / "m.onnx")
    assert [(t.name, t.datatype, t.shape) for t in inputs] == [("x", "FP32", (-1, 5))]
    assert outputs[0].shape == (-1, 5)
    assert opset == 18


def test_static_batch_axis_is_rejected(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "static.onnx"))
    with pytest.raises(
        ExportError, match=r"model 'static': input 'x' has shape \[1, 4\]; expected a dynamic batch"
    ):
        graph_signature("static", tmp_path / "static.onnx")


def test_invalid_onnx_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07not a model")
    with pytest.raises(ExportError, match=r"model 'bad': bad.onnx is not a valid ONNX graph"):
        graph_signature("bad", tmp_path / "bad.onnx")

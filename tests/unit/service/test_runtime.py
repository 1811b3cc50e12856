from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from service.core.errors import InvalidInput
from service.core.runtime import ModelLoadError, OrtSession, RuntimeOptions
from tests.conftest import write_identity_onnx


def test_cpu_session_reports_its_provider_and_signature(tmp_path: Path, caplog) -> None:
    write_identity_onnx(tmp_path / "m.onnx", width=3)
    with caplog.at_level(logging.INFO, logger="slimserve.runtime"):
        session = OrtSession(tmp_path / "m.onnx", "m:1:fp32", RuntimeOptions(intra_op_threads=1))
    assert session.provider == "CPUExecutionProvider"
    assert "model m:1:fp32: onnxruntime" in caplog.text and "on CPUExecutionProvider" in caplog.text
    assert [(t.name, t.shape) for t in session.inputs] == [("x", (-1, 3))]
    x = np.ones((2, 3), np.float32)
    assert np.array_equal(session.run({"x": x})[0], x)


def test_cuda_preference_falls_back_to_cpu_without_a_gpu(tmp_path: Path) -> None:
    write_identity_onnx(tmp_path / "m.onnx")
    options = RuntimeOptions(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    session = OrtSession(tmp_path / "m.onnx", "m", options)
    assert session.provider in ("CUDAExecutionProvider", "CPUExecutionProvider")


@pytest.mark.gpu
def test_cuda_is_used_where_present(tmp_path: Path) -> None:
    write_identity_onnx(tmp_path / "m.onnx")
    session = OrtSession(tmp_path / "m.onnx", "m")
    assert session.provider == "CUDAExecutionProvider"
    x = np.ones((4, 4), np.float32)
    assert np.array_equal(session.run({"x": x})[0], x)


def test_input_onnxruntime_rejects_is_a_400(tmp_path: Path) -> None:
    write_identity_onnx(tmp_path / "m.onnx")
    session = OrtSession(tmp_path / "m.onnx", "m")
    with pytest.raises(InvalidInput, match="model m: onnxruntime rejected the input"):
        session.run({"x": np.ones((2, 4), np.float64)})


def test_unloadable_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"bad.onnx: onnxruntime cannot load it"):
        OrtSession(tmp_path / "bad.onnx", "bad")

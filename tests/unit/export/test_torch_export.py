from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.spec import Tolerance, Trained
from export.torch_zoo import Classifier, ConditionalGenerator, export_module, torch_reference
from export.verify import check_parity, graph_signature, ort_runner


def test_export_has_dynamic_batch_and_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(
        torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    )
    path = tmp_path / "m.onnx"
    export_module(model, [torch.randn(4, 6)], ["features"], ["label", "probabilities"], path)
    inputs, outputs, _ = graph_signature("tiny", path)
    assert [(t.name, t.datatype, t.shape) for t in inputs] == [("features", "FP32", (-1, 6))]
    assert [(t.name, t.datatype, t.shape) for t in outputs] == [
        ("label", "INT64", (-1,)),
        ("probabilities", "FP32", (-1, 3)),
    ]
    assert not (tmp_path / "m.onnx.data").exists()  # one self-contained file
    x = np.random.default_rng(0).standard_normal((70, 6)).astype(np.float32)
    trained = Trained(
        export=lambda p: None,
        reference=torch_reference(model, ["features"]),
        feeds=lambda n: {"features": x[:n]},
        test_feeds={"features": x},
        evaluate=lambda r: {},
        headline="",
        tolerance=Tolerance(1e-5, 1e-4),
    )
    result = check_parity("tiny", trained, ort_runner(path), [o.name for o in outputs])
    assert all(c["outputs"]["probabilities"]["max_abs_diff"] < 1e-5 for c in result["checks"])


def test_two_input_generator_exports_int64_labels(tmp_path: Path) -> None:
    model = ConditionalGenerator(noise_dim=4, width=8).eval()
    path = tmp_path / "g.onnx"
    export_module(
        model, [torch.randn(3, 4), torch.tensor([0, 5, 9])], ["noise", "label"], ["image"], path
    )
    inputs, outputs, _ = graph_signature("g", path)
    assert [(t.name, t.datatype) for t in inputs] == [("noise", "FP32"), ("label", "INT64")]
    assert outputs[0].shape == (-1, 1, 8, 8)
    (image,) = ort_runner(path)({"noise": np.zeros((1, 4), np.float32), "label": np.array([3])})
    assert image.shape == (1, 1, 8, 8)


def test_batch_one_example_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch >= 2"):
        export_module(torch.nn.Linear(2, 2), [torch.randn(1, 2)], ["x"], ["y"], tmp_path / "m.onnx")

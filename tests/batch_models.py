"""Tiny models and input files for the batch-job tests, built by the tests (never committed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from service.core.repository import Manifest, ModelRepository, ModelVersion, TensorSpec


def write_classifier_onnx(
    path: Path, row_shape: tuple[int, ...] = (4,), classes: int = 3, seed: int = 0
) -> None:
    """``probabilities = softmax(x W + b)``, ``label = argmax``: the shape of the zoo's
    classifiers (INT64 label, FP32 probabilities), any row shape (flattened first)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width = math.prod(row_shape)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((width, classes)).astype(np.float32)
    b = rng.standard_normal(classes).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(np.array([-1, width], np.int64), "flat_shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *row_shape])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def publish_classifier(
    repo: ModelRepository,
    name: str,
    row_shape: tuple[int, ...] = (4,),
    classes: int = 3,
    labels: list[str] | None = None,
    task: str = "classification",
    preprocessing: dict | None = None,
) -> ModelVersion:
    staging = repo.staging_dir(name)
    write_classifier_onnx(staging / "model.onnx", row_shape, classes)
    manifest = Manifest(
        name=name,
        version=0,
        task=task,
        inputs=[TensorSpec("x", "FP32", (-1, *row_shape))],
        outputs=[
            TensorSpec("label", "INT64", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, classes)),
        ],
        labels=labels,
        preprocessing=preprocessing or {},
    )
    return repo.publish(staging, manifest)


def reference_outputs(model: ModelVersion, x: np.ndarray) -> dict[str, np.ndarray]:
    """The model's outputs from a plain onnxruntime session, for comparison."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.variant_path()), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"x": x.astype(np.float32)}), strict=True))

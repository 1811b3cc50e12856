"""Fixtures shared by every test layer. Tiny models are built here, never committed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.core.repository import Manifest, ModelRepository, TensorSpec


def write_identity_onnx(path: Path, width: int = 4) -> None:
    """A one-node ONNX graph (y = x) with a dynamic batch axis: the smallest servable model."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def publish_identity(repo: ModelRepository, name: str, width: int = 4):
    return _publish(repo, name, width, write_identity_onnx)


def _publish(repo: ModelRepository, name: str, width: int, write) -> object:
    """``write(path, width)`` a graph x [batch, width] -> y [batch, width], and publish it."""
    staging = repo.staging_dir(name)
    write(staging / "model.onnx", width)
    manifest = Manifest(
        name=name,
        version=0,
        task="unknown",
        inputs=[TensorSpec("x", "FP32", (-1, width))],
        outputs=[TensorSpec("y", "FP32", (-1, width))],
        metrics={"score": 1.0},
        headline_metric="score",
    )
    return repo.publish(staging, manifest)


@pytest.fixture
def tiny_repo(tmp_path: Path) -> ModelRepository:
    """A repository with two identity models, ``alpha`` and ``beta``."""
    repo = ModelRepository(tmp_path / "models")
    publish_identity(repo, "alpha")
    publish_identity(repo, "beta")
    return repo


@pytest.fixture(scope="session")
def zoo_repo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """The whole zoo, built once per test session (five to six minutes on two cores), or the
    one ``SLIMSERVE_TEST_ZOO`` names, built before with ``python -m tests.zoo PATH`` (for
    quick runs of a few tests while working; CI always builds its own)."""
    from export.build import build

    if given := os.environ.get("SLIMSERVE_TEST_ZOO"):
        return ModelRepository(Path(given))
    repo = ModelRepository(tmp_path_factory.mktemp("zoo") / "models")
    build(repo, options=zoo_options())
    return repo


def zoo_options():
    """How the test zoo is built: the text models on a sample of their corpus (the whole of it
    takes a quarter of an hour on two cores), everything else as ``make models`` builds it."""
    from export.build import BuildOptions

    return BuildOptions(text_sample=TEXT_SAMPLE)


#: documents per split the test zoo's text models see
TEXT_SAMPLE = 160


@pytest.fixture
def zoo_copy(zoo_repo: ModelRepository, tmp_path: Path) -> ModelRepository:
    """A private copy of the built zoo that a test may damage."""
    target = tmp_path / "models"
    shutil.copytree(zoo_repo.root, target)
    return ModelRepository(target)


def random_feeds(specs, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs that satisfy declared specs: dynamic axes become ``batch`` (first) or 3 (others)."""
    from service.core.datatypes import to_numpy

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = [batch if i == 0 else (3 if d == -1 else d) for i, d in enumerate(spec.shape)]
        dtype = to_numpy(spec.datatype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.random(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            feeds[spec.name] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` need onnxruntime's CUDA provider; skip them where it is absent."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return
    skip = pytest.mark.skip(reason="needs onnxruntime's CUDAExecutionProvider (no GPU here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_slow_onnx(path: Path, width: int = 2048, layers: int = 24) -> None:
    """``layers`` x (MatMul by one shared [width, width] matrix, Tanh): a model slow enough
    (tens of ms per sample on two cores) to keep a queue waiting in tests."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, current = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [current, "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i}"]))
        current = f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def publish_slow(repo: ModelRepository, name: str = "slow", width: int = 2048):
    return _publish(repo, name, width, write_slow_onnx)


def asgi_post(app, path: str, **kwargs):
    """POST to an ASGI app in-process (httpx), e.g. ``service.http.app.HttpApp``."""
    import asyncio

    import httpx

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(path, **kwargs)

    return asyncio.run(go())


def write_scale_onnx(path: Path, width: int = 4, factor: float = 2.0) -> None:
    """y = factor * x, dynamic batch: a model whose versions answer differently (the factor
    a vector of ``width``, so the file grows with the width)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    k = numpy_helper.from_array(np.full(width, factor, dtype=np.float32), "k")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])], "scale", [x], [y], initializer=[k]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def publish_scale(repo: ModelRepository, name: str, factor: float, width: int = 4, **manifest):
    """The next version of ``name``: y = factor * x (``manifest`` fields added, e.g. serving)."""
    staging = repo.staging_dir(name)
    write_scale_onnx(staging / "model.onnx", width, factor)
    spec = Manifest(
        name=name,
        version=0,
        task="unknown",
        inputs=[TensorSpec("x", "FP32", (-1, width))],
        outputs=[TensorSpec("y", "FP32", (-1, width))],
        **manifest,
    )
    return repo.publish(staging, spec)

"""``python -m export import``: external ONNX files registered, then served by the v2 app."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import REGISTRY

from export.importer import ModelImportError, import_onnx
from service.core.datatypes import from_numpy, to_numpy
from service.core.repository import ModelRepository
from service.core.settings import Settings
from service.http.app import HttpApp
from service.serving.dataplane import DataPlane
from service.serving.store import ModelStore

ROOT = Path(__file__).resolve().parents[2]
Feeds = dict[str, np.ndarray]


def _save(nodes, inputs, outputs, path: Path, initializers=(), opset: int = 18) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="slimserve-tests"
    )
    model.producer_version = "0.1"
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _tensor(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def write_mixed_types(path: Path) -> Path:
    """Five inputs, five outputs: INT64, INT32, BOOL, FP16 and FP64, all with a batch axis."""
    b = "batch"
    nodes = [
        helper.make_node("Cast", ["ints32"], ["ints32_as_64"], to=TensorProto.INT64),
        helper.make_node("Add", ["ints64", "ints32_as_64"], ["sum64"]),
        helper.make_node("Cast", ["ints64"], ["ints64_as_32"], to=TensorProto.INT32),
        helper.make_node("Add", ["ints64_as_32", "ints32"], ["sum32"]),
        helper.make_node("Not", ["flags"], ["negated"]),
        helper.make_node("Add", ["half", "half"], ["doubled_half"]),
        helper.make_node("Cast", ["half"], ["half_as_64"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["wide", "half_as_64"], ["product"]),
    ]
    inputs = [
        _tensor("ints64", TensorProto.INT64, [b, 3]),
        _tensor("ints32", TensorProto.INT32, [b, 3]),
        _tensor("flags", TensorProto.BOOL, [b, 2]),
        _tensor("half", TensorProto.FLOAT16, [b, 2]),
        _tensor("wide", TensorProto.DOUBLE, [b, 2]),
    ]
    outputs = [
        _tensor("sum64", TensorProto.INT64, [b, 3]),
        _tensor("sum32", TensorProto.INT32, [b, 3]),
        _tensor("negated", TensorProto.BOOL, [b, 2]),
        _tensor("doubled_half", TensorProto.FLOAT16, [b, 2]),
        _tensor("product", TensorProto.DOUBLE, [b, 2]),
    ]
    return _save(nodes, inputs, outputs, path)


def write_dynamic_seq(path: Path, factor: float = 2.0) -> Path:
    """``y = factor * x`` over ``[batch, seq]``: a dynamic axis that is not the batch axis."""
    two = numpy_helper.from_array(np.array(factor, np.float32), "factor")
    return _save(
        [helper.make_node("Mul", ["x", "factor"], ["y"])],
        [_tensor("x", TensorProto.FLOAT, ["batch", "seq"])],
        [_tensor("y", TensorProto.FLOAT, ["batch", "seq"])],
        path,
        [two],
    )


def write_static_batch(path: Path) -> Path:
    """``relu(x)`` over a fixed ``[1, 4]``: the batcher must run it one request at a time."""
    return _save(
        [helper.make_node("Relu", ["x"], ["y"])],
        [_tensor("x", TensorProto.FLOAT, [1, 4])],
        [_tensor("y", TensorProto.FLOAT, [1, 4])],
        path,
    )


def _random(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = to_numpy(datatype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 10).astype(dtype)
    return rng.integers(-1000, 1000, shape).astype(dtype)


@dataclass(frozen=True)
class Case:
    write: Callable[[Path], Path]
    inputs: list[tuple[str, str, list[int]]]
    outputs: list[tuple[str, str, list[int]]]
    feeds: Callable[[np.random.Generator], Feeds]


CASES = {
    "mixed-types": Case(
        write_mixed_types,
        inputs=[
            ("ints64", "INT64", [-1, 3]),
            ("ints32", "INT32", [-1, 3]),
            ("flags", "BOOL", [-1, 2]),
            ("half", "FP16", [-1, 2]),
            ("wide", "FP64", [-1, 2]),
        ],
        outputs=[
            ("sum64", "INT64", [-1, 3]),
            ("sum32", "INT32", [-1, 3]),
            ("negated", "BOOL", [-1, 2]),
            ("doubled_half", "FP16", [-1, 2]),
            ("product", "FP64", [-1, 2]),
        ],
        feeds=lambda rng: {
            "ints64": _random("INT64", (4, 3), rng),
            "ints32": _random("INT32", (4, 3), rng),
            "flags": _random("BOOL", (4, 2), rng),
            "half": _random("FP16", (4, 2), rng),
            "wide": _random("FP64", (4, 2), rng),
        },
    ),
    "dynamic-seq": Case(
        write_dynamic_seq,
        inputs=[("x", "FP32", [-1, -1])],
        outputs=[("y", "FP32", [-1, -1])],
        feeds=lambda rng: {"x": _random("FP32", (2, 7), rng)},
    ),
    "static-batch": Case(
        write_static_batch,
        inputs=[("x", "FP32", [1, 4])],
        outputs=[("y", "FP32", [1, 4])],
        feeds=lambda rng: {"x": _random("FP32", (1, 4), rng)},
    ),
}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "export", "import", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``root``, to prove nothing changed."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def body(feeds: Feeds, **extra) -> dict:
    return {
        "inputs": [
            {
                "name": name,
                "shape": list(arr.shape),
                "datatype": from_numpy(arr.dtype),
                "data": arr.ravel().tolist(),  # BOOL as true/false, FP16 as numbers
            }
            for name, arr in feeds.items()
        ],
        **extra,
    }


def reference(path: Path, feeds: Feeds) -> dict[str, np.ndarray]:
    """What onnxruntime gives for ``feeds`` when run directly on the file."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def decoded(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    return {
        o["name"]: np.array(o["data"], dtype=to_numpy(o["datatype"])).reshape(o["shape"])
        for o in response.json()["outputs"]
    }


def serve(repo: ModelRepository, requests: Callable, **settings) -> list:
    """Load ``repo`` into a store and run ``requests(client)`` against the v2 app in-process."""
    store = ModelStore(repo, Settings(model_repository=repo.root, **settings))
    store.load_all()

    async def main():
        transport = httpx.ASGITransport(app=HttpApp(DataPlane(store), dict))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await requests(client)
        finally:
            await store.close()

    return asyncio.run(main())


def specs(tensors) -> list[tuple[str, str, list[int]]]:
    return [(t.name, t.datatype, list(t.shape)) for t in tensors]


@pytest.mark.parametrize("case_name", list(CASES))
def test_import_records_the_graph_and_serves_it(tmp_path: Path, case_name: str) -> None:
    case = CASES[case_name]
    source = case.write(tmp_path / f"{case_name}.onnx")
    cli_repo = ModelRepository(tmp_path / "cli-models")
    out = cli(str(source), "--name", case_name, "--repo", str(cli_repo.root))
    assert out.returncode == 0, out.stderr
    assert f"as {case_name} v1" in out.stdout
    api_repo = ModelRepository(tmp_path / "api-models")
    model = import_onnx(source, case_name, api_repo)

    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    imported = cli_repo.get(case_name)
    imported.verify()
    for m in (imported.manifest, model.manifest):
        assert (m.name, m.version, m.task) == (case_name, 1, "unknown")
        assert specs(m.inputs) == case.inputs
        assert specs(m.outputs) == case.outputs
        assert m.files["model.onnx"].sha256 == sha and m.fingerprint == sha
        assert m.files["model.onnx"].bytes == source.stat().st_size
        assert m.producer["producer_name"] == "slimserve-tests"
        assert m.producer["producer_version"] == "0.1"
        assert (m.producer["opset"], m.producer["onnxruntime"]) == (18, ort.__version__)
        created = datetime.fromisoformat(m.created_at)
        assert created.tzinfo == UTC and abs((datetime.now(UTC) - created).total_seconds()) < 120
    assert (imported.path / "model.onnx").read_bytes() == source.read_bytes()
    cli_dict, api_dict = imported.manifest.to_dict(), model.manifest.to_dict()
    cli_dict.pop("created_at"), api_dict.pop("created_at")
    assert cli_dict == api_dict

    feeds = case.feeds(np.random.default_rng(0))

    async def requests(client: httpx.AsyncClient):
        meta = await client.get(f"/v2/models/{case_name}")
        infer = await client.post(f"/v2/models/{case_name}/infer", json=body(feeds, id="r1"))
        return meta, infer

    meta, response = serve(cli_repo, requests)
    assert meta.status_code == 200
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta.json()["inputs"]] == case.inputs
    assert response.json()["id"] == "r1"
    got = decoded(response)
    expected = reference(source, feeds)
    assert list(got) == [name for name, _, _ in case.outputs]
    for name, datatype, _ in case.outputs:
        assert got[name].dtype == to_numpy(datatype)
        np.testing.assert_array_equal(got[name], expected[name], err_msg=f"output {name!r}")


def test_differing_seq_lengths_are_never_merged_into_one_batch(tmp_path: Path) -> None:
    source = write_dynamic_seq(tmp_path / "seq.onnx")
    repo = ModelRepository(tmp_path / "models")
    import_onnx(source, "seq-model", repo)
    rng = np.random.default_rng(1)
    requests = [_random("FP32", (2, n), rng) for n in (3, 5, 3)]

    async def send(client: httpx.AsyncClient):
        return await asyncio.gather(
            *(client.post("/v2/models/seq-model/infer", json=body({"x": x})) for x in requests)
        )

    labels = {"model": "seq-model", "version": "1", "variant": "fp32"}
    before = REGISTRY.get_sample_value("slimserve_batch_executions_total", labels) or 0.0
    # a queue delay long enough that all three wait together: the two of seq 3 may share a run
    responses = serve(repo, send, max_queue_delay_ms=200)
    for x, response in zip(requests, responses, strict=True):
        y = decoded(response)["y"]
        assert y.shape == x.shape
        np.testing.assert_array_equal(y, x * np.float32(2))
    after = REGISTRY.get_sample_value("slimserve_batch_executions_total", labels)
    assert after - before == 2  # seq 3 + seq 3 together, seq 5 alone


def test_a_static_batch_axis_is_served_as_declared(tmp_path: Path) -> None:
    source = write_static_batch(tmp_path / "static.onnx")
    repo = ModelRepository(tmp_path / "models")
    import_onnx(source, "static", repo)
    rng = np.random.default_rng(2)
    ok = [_random("FP32", (1, 4), rng) for _ in range(3)]
    too_many = _random("FP32", (2, 4), rng)

    async def send(client: httpx.AsyncClient):
        url = "/v2/models/static/infer"
        return await asyncio.gather(
            *(client.post(url, json=body({"x": x})) for x in [*ok, too_many])
        )

    *answers, refused = serve(repo, send, max_queue_delay_ms=50)
    for x, response in zip(ok, answers, strict=True):
        np.testing.assert_array_equal(decoded(response)["y"], np.maximum(x, 0))
    assert refused.status_code == 400
    assert (
        "input 'x' of model 'static': expected shape [1, 4], got [2, 4]" in refused.json()["error"]
    )


def _not_onnx(path: Path) -> Path:
    path.write_text("this is a text file, not a model\n")
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _type_mismatch(path: Path) -> Path:
    """Passes onnx's checker (which infers no types) but onnxruntime refuses to load it."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "n"], ["y"])],
        "mismatch",
        [_tensor("x", TensorProto.FLOAT, ["b", 2]), _tensor("n", TensorProto.INT64, ["b", 2])],
        [_tensor("y", TensorProto.FLOAT, ["b", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _external_data(path: Path) -> Path:
    weight = numpy_helper.from_array(np.ones((1, 2), np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "weight"], ["y"])],
        "external",
        [_tensor("x", TensorProto.FLOAT, ["b", 2])],
        [_tensor("y", TensorProto.FLOAT, ["b", 2])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        location=f"{path.name}.data",
        size_threshold=0,
    )
    return path


def _sequence_output(path: Path) -> Path:
    return _save(
        [helper.make_node("SequenceConstruct", ["x"], ["parts"])],
        [_tensor("x", TensorProto.FLOAT, ["b", 2])],
        [helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, None)],
        path,
    )


def _sequence_input(path: Path) -> Path:
    return _save(
        [helper.make_node("ConcatFromSequence", ["parts"], ["y"], axis=0)],
        [helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, ["b", 2])],
        [_tensor("y", TensorProto.FLOAT, ["b", 2])],
        path,
    )


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("make", "name", "extra", "message"),
    [
        (lambda p: p, "new", [], "no such file; expected an ONNX model file"),
        (_directory, "new", [], "is not a file"),
        (_not_onnx, "new", [], "not an ONNX file (protobuf parsing failed"),
        (_empty, "new", [], "not a valid ONNX model: The model does not have an ir_version"),
        (_type_mismatch, "new", [], "onnxruntime cannot load it: [ONNXRuntimeError] : 1 : FAIL"),
        (
            write_dynamic_seq,
            "../escape",
            [],
            "cannot import it as model '../escape': model name '../escape': expected letters",
        ),
        (write_dynamic_seq, "new", ["--task", "poetry"], "task 'poetry' is not one of"),
        (
            _external_data,
            "new",
            [],
            "1 tensor(s) keep their data in external files ('weight'); expected a self-contained",
        ),
        (
            _sequence_output,
            "new",
            [],
            "output 'parts' has type seq(tensor(float)), which slimserve does not serve",
        ),
        (
            _sequence_input,
            "new",
            [],
            "input 'parts' has type seq(tensor(float)), which slimserve does not serve",
        ),
    ],
    ids=[
        "missing",
        "directory",
        "not-onnx",
        "empty",
        "onnxruntime-refuses",
        "bad-name",
        "bad-task",
        "external-data",
        "sequence-output",
        "sequence-input",
    ],
)
def test_a_refused_file_exits_2_naming_it_and_leaves_the_repository_alone(
    tmp_path: Path, make, name: str, extra: list[str], message: str
) -> None:
    repo = ModelRepository(tmp_path / "models")
    import_onnx(write_dynamic_seq(tmp_path / "existing.onnx"), "existing", repo)
    path = make(tmp_path / "incoming.onnx")
    before = snapshot(repo.root)

    out = cli(str(path), "--name", name, "--repo", str(repo.root), *extra)
    stderr = " ".join(out.stderr.split())
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"import failed: {path}: " in stderr
    assert message in stderr
    assert snapshot(repo.root) == before

    task = extra[1] if extra else "unknown"
    with pytest.raises(ModelImportError) as info:
        import_onnx(path, name, repo, task=task)
    assert str(info.value).startswith(f"{path}: ") and message in " ".join(str(info.value).split())
    assert snapshot(repo.root) == before


def test_a_refused_file_does_not_create_a_missing_repository(tmp_path: Path) -> None:
    out = cli(str(_not_onnx(tmp_path / "x.onnx")), "--name", "x", "--repo", str(tmp_path / "r"))
    assert out.returncode == 2
    assert not (tmp_path / "r").exists()


def test_reimporting_the_same_file_is_a_noop_and_a_changed_file_is_version_2(
    tmp_path: Path,
) -> None:
    source = write_dynamic_seq(tmp_path / "seq.onnx")
    repo = ModelRepository(tmp_path / "models")
    args = ["--name", "seq", "--repo", str(repo.root)]
    first = cli(str(source), *args, "--task", "reconstruction", "--labels", "a, b,,c")
    assert first.returncode == 0, first.stderr
    v1 = repo.get("seq")
    assert (v1.manifest.task, v1.manifest.labels) == ("reconstruction", ["a", "b", "c"])
    before = snapshot(repo.root)

    again = cli(str(source), *args)
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout and "is already seq v1" in again.stdout
    assert snapshot(repo.root) == before
    assert import_onnx(source, "seq", repo).version == 1
    assert snapshot(repo.root) == before

    write_dynamic_seq(source, factor=3.0)
    changed = cli(str(source), *args, "--description", "triples its input")
    assert changed.returncode == 0, changed.stderr
    assert "as seq v2" in changed.stdout
    assert repo.versions("seq") == [1, 2]
    v2 = repo.get("seq")
    assert v2.manifest.fingerprint == hashlib.sha256(source.read_bytes()).hexdigest()
    assert v2.manifest.fingerprint != v1.manifest.fingerprint
    assert (v2.manifest.task, v2.manifest.description) == ("unknown", "triples its input")
    assert snapshot(repo.root / "seq" / "1") == {
        k.removeprefix("seq/1/"): v for k, v in before.items() if k.startswith("seq/1/")
    }

    # the same file again, but the latest version's copy is corrupt: imported as version 3
    (v2.path / "model.onnx").write_bytes(b"\0" * 8)
    assert import_onnx(source, "seq", repo).version == 3
    repo.get("seq", 3).verify()

"""Register an external ONNX file into the model repository as a new version of a model.

The manifest comes from the graph itself (inputs, outputs, producer, opsets); every check runs
before anything is written, so a refused file leaves the repository as it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx.external_data_helper import uses_external_data

from service.core.repository import (
    Manifest,
    ModelRepository,
    ModelVersion,
    RepositoryError,
    TensorSpec,
)
from service.core.runtime import ModelLoadError, OrtSession, RuntimeOptions

__all__ = ["IMPORTER", "ModelImportError", "import_onnx"]

#: recorded in ``producer.importer`` of every imported version
IMPORTER = "python -m export import"
_MODEL_FILE = "model.onnx"


class ModelImportError(Exception):
    """The file cannot be imported; the message names the file and the reason."""


def import_onnx(
    path: str | Path,
    name: str,
    repo: ModelRepository,
    task: str = "unknown",
    description: str = "",
    labels: Sequence[str] | None = None,
) -> ModelVersion:
    """Publish ``path`` as the next version of ``name``, or return the latest if identical.

    "Identical" means the latest version's fingerprint (the file's sha256) equals this file's.
    """
    path = Path(path)
    try:
        manifest = Manifest(
            name=name,
            version=0,  # assigned by publish()
            task=task,
            inputs=[],
            outputs=[],
            description=description,
            labels=list(labels) if labels is not None else None,
        )
    except ValueError as exc:
        raise ModelImportError(f"{path}: cannot import it as model {name!r}: {exc}") from exc
    if not path.is_file():
        what = "is not a file" if path.exists() else "no such file"
        raise ModelImportError(f"{path}: {what}; expected an ONNX model file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelImportError(f"{path}: cannot read it: {exc}") from exc
    fingerprint = hashlib.sha256(data).hexdigest()
    unchanged = _latest_if_identical(repo, name, fingerprint)
    if unchanged is not None:
        return unchanged

    model = _check_graph(path, data)
    manifest.inputs, manifest.outputs = _signature(path)
    manifest.producer = _producer(path, model)
    manifest.fingerprint = fingerprint
    manifest.created_at = datetime.now(UTC).isoformat(timespec="seconds")

    try:
        return _publish(repo, manifest, data)
    except (OSError, RepositoryError) as exc:
        raise ModelImportError(
            f"{path}: cannot publish it into the repository {repo.root}: {exc}"
        ) from exc


def _publish(repo: ModelRepository, manifest: Manifest, data: bytes) -> ModelVersion:
    """Write the file into a staging folder and move it in as the next version."""
    staging = repo.staging_dir(manifest.name)
    try:
        (staging / _MODEL_FILE).write_bytes(data)
        return repo.publish(staging, manifest)
    finally:
        if staging.exists():
            repo.discard(staging)


def _latest_if_identical(repo: ModelRepository, name: str, fingerprint: str) -> ModelVersion | None:
    """The latest version when it holds this very file intact; a corrupt one does not count."""
    try:
        latest = repo.get(name)
        if latest.manifest.fingerprint != fingerprint:
            return None
        latest.verify()
    except RepositoryError:
        return None
    return latest


def _check_graph(path: Path, data: bytes) -> onnx.ModelProto:
    """Parse and check the graph; refuse external data, which a version folder would not hold."""
    try:
        model = onnx.load_model_from_string(data, format="protobuf")
    except DecodeError as exc:
        raise ModelImportError(
            f"{path}: not an ONNX file (protobuf parsing failed: {exc})"
        ) from exc
    external = [t.name for t in _tensors(model) if uses_external_data(t)]
    if external:
        shown = ", ".join(repr(n) for n in external[:5]) + (", ..." if len(external) > 5 else "")
        raise ModelImportError(
            f"{path}: {len(external)} tensor(s) keep their data in external files ({shown}); "
            "expected a self-contained ONNX file (save it with save_as_external_data=False)"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelImportError(f"{path}: not a valid ONNX model: {exc}") from exc
    return model


def _signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs as the server's own session sees them on CPU."""
    try:
        session = OrtSession(path, f"import:{path.name}", RuntimeOptions(["CPUExecutionProvider"]))
    except ModelLoadError as exc:
        raise ModelImportError(str(exc)) from exc
    if not session.inputs:
        raise ModelImportError(f"{path}: the graph has no inputs; expected at least one")
    return session.inputs, session.outputs


def _producer(path: Path, model: onnx.ModelProto) -> dict[str, Any]:
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {
        "importer": IMPORTER,
        "source_file": path.name,
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "ir_version": model.ir_version,
        "opset": opsets.get("ai.onnx", 0),
        "opset_imports": opsets,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the model: initializers and attribute tensors, subgraphs included."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
        yield from (t for s in attr.sparse_tensors for t in (s.values, s.indices))
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)

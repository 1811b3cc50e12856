"""data -> train -> export -> verify -> register: builds zoo models into a model repository.

A model whose fingerprint (its code, seed, library versions and the models it depends on) equals
that of its latest published version is not rebuilt; anything else becomes a new version.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import onnxruntime as ort

from service.repository import Manifest, ModelRepository, ModelVersion, RepositoryError

from . import zoo
from .data import DEFAULT_SEED, load
from .spec import BuildContext, ModelSpec, Runner
from .verify import ExportError, check_parity, graph_signature, ort_runner

__all__ = ["BuildOutcome", "fingerprint", "build_model", "build"]

_CODE_ROOT = Path(__file__).resolve().parent.parent
#: the files whose content decides what a build produces (not the CLI, not the importer)
_NOT_BUILD_CODE = ("__main__.py", "importer.py")
_CODE_FILES = sorted(
    [
        *(p for p in (_CODE_ROOT / "export").glob("*.py") if p.name not in _NOT_BUILD_CODE),
        _CODE_ROOT / "service" / "repository.py",
        _CODE_ROOT / "service" / "datatypes.py",
    ]
)


@dataclass(frozen=True)
class BuildOutcome:
    name: str
    status: str  # "built" or "unchanged"
    version: int
    seconds: float
    headline: tuple[str, float] | None


def _library_versions() -> dict[str, str]:
    import numpy
    import onnx
    import skl2onnx
    import sklearn
    import torch

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "scikit-learn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
    }


def fingerprint(spec: ModelSpec, seed: int, repo: ModelRepository) -> str:
    """sha256 over the build code, the spec, the seed, library versions and required models."""
    digest = hashlib.sha256()
    for path in _CODE_FILES:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    deps = {d: repo.latest_fingerprint(d) for d in spec.requires}
    meta = {"spec": spec.name, "seed": seed, "libs": _library_versions(), "requires": deps}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


def _published_runner(repo: ModelRepository) -> Callable[[str], Runner]:
    def runner(name: str) -> Runner:
        model = repo.get(name)
        model.verify()
        return ort_runner(model.variant_path())

    return runner


def build_model(spec: ModelSpec, repo: ModelRepository, seed: int = DEFAULT_SEED) -> ModelVersion:
    """Train, export, verify and publish one model as a new version (nothing on error)."""
    fp = fingerprint(spec, seed, repo)
    trained = spec.train(BuildContext(seed=seed, model_runner=_published_runner(repo)))
    staging = repo.staging_dir(spec.name)
    try:
        onnx_path = staging / "model.onnx"
        trained.export(onnx_path)
        inputs, outputs, opset = graph_signature(spec.name, onnx_path)
        runner = ort_runner(onnx_path)
        parity = check_parity(spec.name, trained, runner, [o.name for o in outputs])
        metrics = trained.evaluate(runner)
        build_config = {
            "spec": spec.name,
            "family": spec.family,
            "seed": seed,
            "requires": list(spec.requires),
            **trained.config,
        }
        (staging / "build.json").write_text(json.dumps(build_config, indent=2, default=str) + "\n")
        manifest = Manifest(
            name=spec.name,
            version=0,  # assigned by publish()
            task=spec.task,
            inputs=inputs,
            outputs=outputs,
            description=spec.description,
            labels=trained.labels,
            preprocessing=trained.preprocessing,
            dataset=load(spec.dataset, seed).record,
            metrics=metrics,
            headline_metric=trained.headline,
            parity=parity,
            producer={**trained.producer, "opset": opset, "onnxruntime": ort.__version__},
            fingerprint=fp,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        return repo.publish(staging, manifest)
    finally:
        if staging.exists():
            repo.discard(staging)


def build(
    repo: ModelRepository,
    only: list[str] | tuple[str, ...] = (),
    seed: int = DEFAULT_SEED,
    force: bool = False,
    on_start: Callable[[ModelSpec], None] = lambda s: None,
    on_done: Callable[[BuildOutcome], None] = lambda o: None,
) -> list[BuildOutcome]:
    """Build ``only`` (and what they require), or the whole zoo; stops at the first failure."""
    outcomes = []
    for spec in zoo.plan(only):
        on_start(spec)
        start = time.perf_counter()
        latest = None
        if not force and repo.latest_fingerprint(spec.name) == fingerprint(spec, seed, repo):
            try:
                latest = repo.get(spec.name)
                latest.verify()
            except RepositoryError:
                latest = None  # corrupt: rebuild as a new version
        status = "unchanged"
        if latest is None:
            latest = build_model(spec, repo, seed)
            status = "built"
        outcome = BuildOutcome(
            spec.name, status, latest.version, time.perf_counter() - start, latest.manifest.headline
        )
        outcomes.append(outcome)
        on_done(outcome)
    return outcomes


__all__ += ["ExportError"]

"""data -> train -> export -> compress -> verify -> register: builds zoo models into a repository.

Each version holds the FP32 graph and its compressed variants (:mod:`export.compress`), all
measured in one run (:mod:`export.measure`); the fastest variant within the accuracy budget
becomes the default (:mod:`export.selection`), and a card says why (:mod:`export.report`).

A model whose fingerprint (its code, seed, library versions and the models it depends on) equals
that of its latest published version is not rebuilt; anything else becomes a new version.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnxruntime as ort

from service.core.repository import (
    Manifest,
    ModelRepository,
    ModelVersion,
    RepositoryError,
    Variant,
)

from . import zoo
from .compress import StaticConfig, VariantResult, build_variants
from .data import DEFAULT_SEED, load
from .measure import MeasureConfig, measure
from .report import write_card
from .selection import Budget, choose
from .spec import BuildContext, ModelSpec, Runner, Trained
from .verify import ExportError, check_parity, graph_signature, ort_runner

__all__ = ["BuildOptions", "BuildOutcome", "fingerprint", "build_model", "build"]

_CODE_ROOT = Path(__file__).resolve().parent.parent
#: the files whose content decides what a build produces (not the CLI, not the importer)
_NOT_BUILD_CODE = ("__main__.py", "importer.py")
_CODE_FILES = sorted(
    [
        *(p for p in (_CODE_ROOT / "export").rglob("*.py") if p.name not in _NOT_BUILD_CODE),
        _CODE_ROOT / "service" / "core" / "repository.py",
        _CODE_ROOT / "service" / "core" / "datatypes.py",
    ]
)


@dataclass(frozen=True)
class BuildOptions:
    """What besides the code decides a build: the accuracy budget and the compressors' settings."""

    budget: Budget = Budget()
    static: StaticConfig = StaticConfig()
    measure: MeasureConfig = MeasureConfig()
    compress: bool = True
    #: at most this many documents per split for the text models (tests: a few hundred)
    text_sample: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_sample": self.text_sample,
            "budget": self.budget.to_dict(),
            "static": vars(self.static),
            "measure": {k: v for k, v in vars(self.measure).items() if k != "providers"},
            "compress": self.compress,
        }


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


def fingerprint(
    spec: ModelSpec, seed: int, repo: ModelRepository, options: BuildOptions | None = None
) -> str:
    """sha256 over the build code, the spec, the seed, options, libraries and required models."""
    digest = hashlib.sha256()
    for path in _CODE_FILES:
        digest.update(path.relative_to(_CODE_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    deps = {d: repo.latest_fingerprint(d) for d in spec.requires}
    meta = {
        "spec": spec.name,
        "seed": seed,
        "libs": _library_versions(),
        "requires": deps,
        "options": (options or BuildOptions()).to_dict(),
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


def _published_runner(repo: ModelRepository) -> Callable[[str], Runner]:
    def runner(name: str) -> Runner:
        model = repo.get(name)
        model.verify()
        return ort_runner(model.variant_path("fp32"))  # judges stay the reference graphs

    return runner


def _variants(
    name: str, trained: Trained, staging: Path, results: list[VariantResult]
) -> tuple[dict[str, Variant], dict[str, Path]]:
    """Manifest entries for every technique, and the files to measure (available ones)."""
    reference = graph_signature(name, staging / "model.onnx")[:2]
    variants = {"fp32": Variant("model.onnx")}
    files = {"fp32": staging / "model.onnx"}
    for r in results:
        if r.file is None:
            variants[r.technique] = Variant("", available=False, reason=r.reason)
            continue
        entry = Variant(
            r.file,
            available=r.reason is None,
            reason=r.reason,
            details={"compression": r.details},
            requires_provider=r.requires_provider,
        )
        if entry.available:
            try:
                signature = graph_signature(name, staging / r.file)[:2]
            except ExportError as exc:
                signature, why = None, str(exc)
            else:
                why = f"inputs/outputs {signature} differ from FP32's {reference}"
            if signature != reference:
                (staging / r.file).unlink(missing_ok=True)
                entry = Variant("", available=False, reason=f"failed: {why}")
            else:
                files[r.technique] = staging / r.file
        variants[r.technique] = entry
    return variants, files


def _compress(
    spec: ModelSpec, trained: Trained, staging: Path, options: BuildOptions
) -> tuple[dict[str, Variant], str, dict[str, Any], dict[str, float]]:
    """Every variant built and measured in one run, the default chosen: the variants, the
    default, why (``selection``), and the FP32 reference's test metrics."""
    results = build_variants(spec.name, trained, staging, static=options.static)
    variants, files = _variants(spec.name, trained, staging, results)
    measured = measure(
        files,
        trained.evaluate,
        trained.test_feeds,
        trained.feeds,
        options.measure,
        trained.chunk_rows,
    )
    for variant, m in measured.items():
        variants[variant].details["measurement"] = m.to_dict()
    choice = choose(measured, trained.headline, options.budget)
    selection = {
        "reason": choice.reason,
        "budget": options.budget.to_dict(),
        "metric": trained.headline,
        "verdicts": choice.verdicts,
        "conditions": {
            "provider": measured["fp32"].provider,
            "intra_op_threads": options.measure.intra_op_threads,
            "test_rows": len(next(iter(trained.test_feeds.values()))),
            "batch_sizes": [1, 32],
        },
    }
    return variants, choice.default, selection, measured["fp32"].metrics


def build_model(
    spec: ModelSpec,
    repo: ModelRepository,
    seed: int = DEFAULT_SEED,
    options: BuildOptions | None = None,
) -> ModelVersion:
    """Train, export, compress, verify and publish one model as a new version (nothing on error)."""
    options = options or BuildOptions()
    fp = fingerprint(spec, seed, repo, options)
    context = BuildContext(seed, _published_runner(repo), options.text_sample)
    trained = spec.train(context)
    staging = repo.staging_dir(spec.name)
    try:
        onnx_path = staging / "model.onnx"
        trained.export(onnx_path)
        inputs, outputs, opset = graph_signature(spec.name, onnx_path)
        runner = ort_runner(onnx_path, trained.chunk_rows)
        parity = check_parity(spec.name, trained, runner, [o.name for o in outputs])
        build_config = {
            "spec": spec.name,
            "family": spec.family,
            "seed": seed,
            "requires": list(spec.requires),
            **trained.config,
        }
        (staging / "build.json").write_text(json.dumps(build_config, indent=2, default=str) + "\n")
        for rel, source in trained.files.items():
            shutil.copyfile(source, staging / rel)
        variants: dict[str, Variant] = {"fp32": Variant("model.onnx")}
        selection: dict[str, Any] = {}
        default = "fp32"
        if not options.compress:
            metrics = trained.evaluate(runner)
        else:
            variants, default, selection, metrics = _compress(spec, trained, staging, options)
        manifest = Manifest(
            name=spec.name,
            version=0,  # assigned by publish()
            task=spec.task,
            inputs=inputs,
            outputs=outputs,
            description=spec.description,
            labels=trained.labels,
            preprocessing=trained.preprocessing,
            dataset=trained.dataset or load(spec.dataset, seed).record,
            metrics=metrics,
            headline_metric=trained.headline,
            parity=parity,
            producer={**trained.producer, "opset": opset, "onnxruntime": ort.__version__},
            fingerprint=fp,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            variants=variants,
            default_variant=default,
            selection=selection,
            tokenizer=trained.tokenizer,
            baselines=trained.baselines,
        )
        if options.compress:
            write_card(staging, manifest)
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
    options: BuildOptions | None = None,
) -> list[BuildOutcome]:
    """Build ``only`` (and what they require), or the whole zoo; stops at the first failure."""
    outcomes = []
    for spec in zoo.plan(only):
        on_start(spec)
        start = time.perf_counter()
        latest = None
        if not force and repo.latest_fingerprint(spec.name) == fingerprint(
            spec, seed, repo, options
        ):
            try:
                latest = repo.get(spec.name)
                latest.verify()
            except RepositoryError:
                latest = None  # corrupt: rebuild as a new version
        status = "unchanged"
        if latest is None:
            latest = build_model(spec, repo, seed, options)
            status = "built"
        outcome = BuildOutcome(
            spec.name, status, latest.version, time.perf_counter() - start, latest.manifest.headline
        )
        outcomes.append(outcome)
        on_done(outcome)
    return outcomes


__all__ += ["ExportError"]

"""The model repository: the contract between ``export/`` (writes it) and ``service/`` (reads it).

Layout, after Triton's::

    <root>/<name>/<version>/model.onnx        the FP32 reference graph
    <root>/<name>/<version>/model.<variant>.onnx  compressed variants, listed in the manifest
    <root>/<name>/<version>/card.md           the variants' measurements (and a PNG plot)
    <root>/<name>/<version>/manifest.json     what a client and the server need to know

A version folder is immutable once published: :meth:`ModelRepository.publish` stages the
files elsewhere and renames the folder into place in one step, and nothing here writes into an
existing version. This module imports only the standard library, so both halves can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "TASKS",
    "RepositoryError",
    "ModelNotFoundError",
    "ManifestError",
    "IntegrityError",
    "TensorSpec",
    "FileEntry",
    "Variant",
    "Manifest",
    "ModelVersion",
    "ScanEntry",
    "ModelRepository",
    "sha256_file",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "slimserve.manifest/1"
REFERENCE_VARIANT = "fp32"
TASKS = (
    "regression",
    "classification",
    "clustering",
    "dimensionality_reduction",
    "generation",
    "reconstruction",
    "encoding",
    "embedding",
    "forecasting",
    "unknown",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RepositoryError(Exception):
    """Base of every error this module raises; the message names the file or model."""


class ModelNotFoundError(RepositoryError):
    """No model (or no such version of it) in the repository."""


class ManifestError(RepositoryError):
    """A manifest is missing, unreadable or does not follow the format."""


class IntegrityError(RepositoryError):
    """A file listed in a manifest is missing or its sha256 does not match."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: v2 datatype name and shape, ``-1`` for a dynamic axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass
class Variant:
    """One servable graph of a version: the FP32 reference or a compressed variant."""

    file: str  # "" when the technique produced no file (``reason`` says why)
    available: bool = True
    reason: str | None = None  # why it is unavailable or was not built
    details: dict[str, Any] = field(default_factory=dict)
    #: an execution provider the variant cannot run without (FP16: CUDAExecutionProvider)
    requires_provider: str | None = None


@dataclass
class Manifest:
    """Everything recorded about one model version; serialised as ``manifest.json``."""

    name: str
    version: int
    task: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    description: str = ""
    labels: list[str] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    headline_metric: str | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Variant] = field(
        default_factory=lambda: {REFERENCE_VARIANT: Variant("model.onnx")}
    )
    default_variant: str = REFERENCE_VARIANT
    files: dict[str, FileEntry] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    created_at: str = ""
    serving: dict[str, Any] = field(default_factory=dict)  # per-model overrides (batching...)
    #: how the default variant was chosen: budget, measuring conditions, verdicts, reason
    selection: dict[str, Any] = field(default_factory=dict)
    #: what the server turns text into the graph's token inputs with (text models only):
    #: ``file`` (a tokenizer.json in the version folder), ``max_length``, ``pad_id``, and the
    #: graph inputs it fills (``ids``, ``mask``)
    tokenizer: dict[str, Any] | None = None
    #: simple methods scored on the same split, for the card (name -> metric, value, what)
    baselines: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"model name {self.name!r}: expected letters, digits, '.', '_' or '-' "
                "(at most 128, not starting with punctuation)"
            )
        if self.task not in TASKS:
            raise ValueError(f"model {self.name!r}: task {self.task!r} is not one of {TASKS}")
        if self.default_variant not in self.variants:
            raise ValueError(
                f"model {self.name!r}: default variant {self.default_variant!r} "
                f"is not among its variants {sorted(self.variants)}"
            )

    @property
    def headline(self) -> tuple[str, float] | None:
        if self.headline_metric and self.headline_metric in self.metrics:
            return self.headline_metric, self.metrics[self.headline_metric]
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {MANIFEST_FORMAT!r}")
        data["inputs"] = [TensorSpec.from_dict(t) for t in data["inputs"]]
        data["outputs"] = [TensorSpec.from_dict(t) for t in data["outputs"]]
        data["variants"] = {k: Variant(**v) for k, v in data.get("variants", {}).items()}
        data["files"] = {k: FileEntry(**v) for k, v in data.get("files", {}).items()}
        return cls(**data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    """A published version folder and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def variant_path(self, variant: str | None = None) -> Path:
        """The ONNX file of ``variant`` (the manifest's default when ``None``)."""
        key = variant or self.manifest.default_variant
        try:
            entry = self.manifest.variants[key]
        except KeyError:
            raise ModelNotFoundError(
                f"model '{self.name}' version {self.version} has no variant {key!r}; "
                f"it has {sorted(self.manifest.variants)}"
            ) from None
        return self.path / entry.file

    def verify(self, files: Iterable[str] | None = None) -> None:
        """Check ``files`` (every file the manifest lists when ``None``) against the
        manifest's sha256; raise :class:`IntegrityError` naming the first that differs."""
        wanted = self.manifest.files if files is None else list(files)
        for rel in wanted:
            entry = self.manifest.files.get(rel)
            path = self.path / rel
            if entry is None:
                raise IntegrityError(f"{path}: has no sha256 in the manifest")
            if not path.is_file():
                raise IntegrityError(f"{path}: listed in {MANIFEST_FILE} but missing")
            actual = sha256_file(path)
            if actual != entry.sha256:
                size = path.stat().st_size
                raise IntegrityError(
                    f"{path}: sha256 {actual[:12]}... ({size} bytes) does not match the manifest's "
                    f"{entry.sha256[:12]}... ({entry.bytes} bytes); the file is corrupt or was "
                    "changed after publishing"
                )
        if files is None:
            for variant in self.manifest.variants.values():
                if variant.file and variant.file not in self.manifest.files:
                    raise IntegrityError(
                        f"{self.path / variant.file}: variant file has no sha256 in the manifest"
                    )


@dataclass(frozen=True)
class ScanEntry:
    """One model's latest version, or why it could not be read (the rest stays usable)."""

    name: str
    version: int | None
    model: ModelVersion | None
    error: RepositoryError | None


class ModelRepository:
    """A folder of models, each with integer version folders."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    def names(self) -> list[str]:
        """Models that have at least one version folder, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and _NAME_RE.match(p.name) and any(self._version_dirs(p))
        )

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        versions = []
        if _NAME_RE.match(name):
            versions = sorted(int(p.name) for p in self._version_dirs(folder))
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(
                f"model {name!r} is not in the repository {self.root} (models: {known})"
            )
        return versions

    def unpublished(self, name: str) -> list[Path]:
        """Numbered folders of ``name`` without a manifest: not versions (a copy in progress,
        or a mistake); they are skipped, and callers say so."""
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(
            p
            for p in folder.iterdir()
            if p.is_dir() and p.name.isdigit() and not (p / MANIFEST_FILE).exists()
        )

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """Read the manifest of ``name`` at ``version`` (the latest when ``None``)."""
        versions = self.versions(name)
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise ModelNotFoundError(
                f"model {name!r} has no version {version} (versions: {versions})"
            )
        path = self.root / name / str(version)
        manifest = read_manifest(path / MANIFEST_FILE)
        if manifest.name != name or manifest.version != version:
            raise ManifestError(
                f"{path / MANIFEST_FILE}: describes {manifest.name!r} version {manifest.version}, "
                f"but lies in the folder of {name!r} version {version}"
            )
        return ModelVersion(path, manifest)

    def scan(self, verify: bool = True) -> list[ScanEntry]:
        """The latest version of every model; a broken model becomes an entry with its error."""
        entries = []
        for name in self.names():
            version = self.versions(name)[-1]
            try:
                model = self.get(name, version)
                if verify:
                    model.verify()
            except RepositoryError as exc:
                entries.append(ScanEntry(name, version, None, exc))
            else:
                entries.append(ScanEntry(name, version, model, None))
        return entries

    def latest_fingerprint(self, name: str) -> str | None:
        """The fingerprint of the latest readable version, to skip rebuilding unchanged models."""
        try:
            return self.get(name).manifest.fingerprint
        except RepositoryError:
            return None

    def publish(self, staging: Path, manifest: Manifest) -> ModelVersion:
        """Hash the files in ``staging``, write the manifest, and move it in as the next version.

        ``manifest.version`` and ``manifest.files`` are filled in here. ``staging`` must be on the
        same filesystem as the repository (it is renamed, not copied).
        """
        model_dir = self.root / manifest.name
        model_dir.mkdir(parents=True, exist_ok=True)
        manifest.files = {
            p.relative_to(staging).as_posix(): FileEntry(sha256_file(p), p.stat().st_size)
            for p in sorted(staging.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE
        }
        while True:
            existing = [int(p.name) for p in self._version_dirs(model_dir)]
            manifest.version = max(existing, default=0) + 1
            Manifest.__post_init__(manifest)
            write_manifest(staging / MANIFEST_FILE, manifest)
            target = model_dir / str(manifest.version)
            try:
                os.rename(staging, target)  # atomic; fails if another writer took the number
            except OSError:
                if target.exists():
                    continue
                raise
            return ModelVersion(target, manifest)

    def staging_dir(self, name: str) -> Path:
        """A fresh folder inside the repository (same filesystem) to build a version in."""
        tmp = self.root / ".staging"
        tmp.mkdir(parents=True, exist_ok=True)
        path = tmp / f"{name}-{os.getpid()}-{os.urandom(4).hex()}"
        path.mkdir()
        return path

    @staticmethod
    def discard(staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _version_dirs(folder: Path) -> Iterator[Path]:
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_dir() and p.name.isdigit() and (p / MANIFEST_FILE).exists():
                    yield p


def read_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: manifest is not readable JSON ({exc})") from exc
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: manifest does not follow {MANIFEST_FORMAT}: {exc}") from exc


def write_manifest(path: Path, manifest: Manifest) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n", "utf-8")
    os.replace(tmp, path)

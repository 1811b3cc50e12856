"""What a batch job knows about its model: one input's row shape, its outputs, task and labels.

Read from the model repository (``local`` and ``ray`` engines) or from a server's v2 metadata
(``http``), so the readers and writers never care which engine runs the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.core.datatypes import V2_TO_NUMPY
from service.core.repository import Manifest, ModelRepository, RepositoryError, TensorSpec
from service.core.tokenizer import TEXT_INPUT

from .errors import SetupError

__all__ = ["ModelSpec", "OutputColumn", "TEXT", "from_repository", "from_metadata"]

#: what a text model takes, in the repository and on the wire alike: one string per row
TEXT = TensorSpec(TEXT_INPUT, "BYTES", (-1,))


def ort_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


@dataclass(frozen=True)
class OutputColumn:
    """One model output as it appears in the output file."""

    column: str  # name in the output file (k-means' ``label`` becomes ``cluster``)
    output: str  # name of the graph output
    datatype: str
    width: int  # values per row (1: a scalar column)


@dataclass(frozen=True)
class ModelSpec:
    """A model with exactly one input whose non-batch dimensions are fixed."""

    name: str
    version: int | None
    variant: str | None
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    task: str = "unknown"
    labels: tuple[str, ...] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the ONNX file, for in-process engines
    #: text models: the manifest's tokenizer and its file (in-process engines tokenize)
    tokenizer: dict[str, Any] | None = None
    tokenizer_path: Path | None = None
    #: text models: cut texts longer than the model takes (else each is a row error)
    truncate: bool = False

    @property
    def is_text(self) -> bool:
        """The model takes strings (one text column), tokenized before it runs."""
        return self.input.datatype == "BYTES"

    @property
    def label(self) -> str:
        """``name:version:variant`` for logs and error messages."""
        return f"{self.name}:{self.version or '?'}:{self.variant or 'default'}"

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.input.shape[1:])

    @property
    def width(self) -> int:
        """Numbers per row (64 for both ``[-1, 64]`` and ``[-1, 1, 8, 8]``)."""
        return math.prod(self.row_shape)

    @property
    def dtype(self) -> np.dtype:
        return V2_TO_NUMPY[self.input.datatype]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size a graph without a dynamic batch axis insists on."""
        first = self.input.shape[0] if self.input.shape else -1
        return None if first == -1 else first

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """Height and width of the image the input holds, for PNG folders."""
        declared = self.preprocessing.get("image_shape")
        if isinstance(declared, list | tuple) and len(declared) == 2:
            h, w = (int(d) for d in declared)
            if h * w == self.width:
                return h, w
        if len(self.row_shape) >= 2 and math.prod(self.row_shape[:-2]) == 1:
            return self.row_shape[-2], self.row_shape[-1]
        side = math.isqrt(self.width)
        return (side, side) if side * side == self.width else None

    @property
    def pixel_range(self) -> tuple[float, float]:
        """What a black and a white pixel become (the manifest's ``preprocessing.range``)."""
        declared = self.preprocessing.get("range")
        if isinstance(declared, list | tuple) and len(declared) == 2:
            return float(declared[0]), float(declared[1])
        return 0.0, 1.0

    def columns(self) -> list[OutputColumn]:
        """Output columns in graph order; a clustering model's ``label`` is its ``cluster``."""
        out = []
        for spec in self.outputs:
            column = spec.name
            if self.task == "clustering" and spec.name == "label":
                column = "cluster"
            width = math.prod(spec.shape[1:]) if len(spec.shape) > 1 else 1
            out.append(OutputColumn(column, spec.name, spec.datatype, width))
        return out

    def label_names(self) -> tuple[str, ...] | None:
        """Class names worth a ``label_name`` column: the manifest's, unless they are 0, 1, ..."""
        if self.task != "classification" or not self.labels:
            return None
        if list(self.labels) == [str(i) for i in range(len(self.labels))]:
            return None
        if not any(
            o.name == "label" and o.datatype.startswith(("INT", "UINT")) for o in self.outputs
        ):
            return None
        return self.labels

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            "input": self.input.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs],
            "task": self.task,
        }


def _check_signature(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    if len(inputs) != 1:
        names = [t.name for t in inputs]
        raise SetupError(
            f"model '{name}' takes {len(inputs)} inputs {names}; batch jobs feed models with "
            "exactly one input (one row of numbers per sample, or one text)"
        )
    spec = inputs[0]
    if spec == TEXT:
        return _check_outputs(name, outputs)
    if any(d < 0 for d in spec.shape[1:]) or not spec.shape:
        raise SetupError(
            f"input '{spec.name}' of model '{name}' has shape {list(spec.shape)}; batch jobs "
            "need a fixed number of values per row (only the batch axis may be -1)"
        )
    if spec.datatype not in V2_TO_NUMPY or spec.datatype == "BYTES":
        raise SetupError(
            f"input '{spec.name}' of model '{name}' is {spec.datatype}; batch jobs feed numbers"
            " (or text to a model whose manifest declares a tokenizer)"
        )
    _check_outputs(name, outputs)


def _check_outputs(name: str, outputs: list[TensorSpec]) -> None:
    bad = [o.name for o in outputs if o.datatype == "BYTES"]
    if bad:
        raise SetupError(f"model '{name}': outputs {bad} are strings; batch jobs write numbers")
    dynamic = [o.name for o in outputs if any(d < 0 for d in o.shape[1:])]
    if dynamic:
        raise SetupError(
            f"model '{name}': outputs {dynamic} have dynamic non-batch dimensions; batch jobs "
            "write a fixed number of values per row"
        )


def from_repository(
    repository: ModelRepository, name: str, version: int | None = None, variant: str | None = None
) -> ModelSpec:
    """The model's latest (or given) version, hash-checked; :class:`SetupError` when unusable."""
    if not repository.root.is_dir():
        raise SetupError(f"model repository {repository.root} does not exist (see --repo)")
    try:
        entry = repository.get(name, version)
        path = entry.variant_path(variant)
        entry.verify()
    except RepositoryError as exc:
        raise SetupError(str(exc)) from None
    manifest: Manifest = entry.manifest
    chosen = variant or manifest.default_variant
    record = manifest.variants[chosen]
    # a variant built where it could not be measured (FP16 without CUDA) runs where its
    # provider is present, as the server decides
    needs = getattr(record, "requires_provider", None)
    runnable = record.available or (needs is not None and needs in ort_providers())
    if not record.file or not runnable:
        raise SetupError(
            f"model '{name}' version {entry.version}: variant {chosen!r} is not available"
            + (f" ({record.reason})" if record.reason else "")
        )
    inputs = [TEXT] if manifest.tokenizer else manifest.inputs
    _check_signature(name, inputs, manifest.outputs)
    tokenizer = dict(manifest.tokenizer) if manifest.tokenizer else None
    return ModelSpec(
        name=name,
        version=entry.version,
        variant=chosen,
        input=inputs[0],
        outputs=tuple(manifest.outputs),
        task=manifest.task,
        labels=tuple(manifest.labels) if manifest.labels else None,
        preprocessing=dict(manifest.preprocessing),
        path=path,
        tokenizer=tokenizer,
        tokenizer_path=entry.path / str(tokenizer["file"]) if tokenizer else None,
    )


def from_metadata(doc: dict[str, Any], name: str, local: ModelSpec | None = None) -> ModelSpec:
    """A model as a v2 server describes it (``GET /v2/models/{name}``).

    ``local``, the same model read from a repository, adds what v2 metadata lacks (task,
    labels, preprocessing) when it describes the same graph signature.
    """
    try:
        inputs = [TensorSpec.from_dict(t) for t in doc["inputs"]]
        outputs = [TensorSpec.from_dict(t) for t in doc["outputs"]]
        versions = [str(v) for v in doc.get("versions", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise SetupError(f"model '{name}': the server's metadata is not v2 ({exc})") from None
    _check_signature(name, inputs, outputs)
    version = int(versions[0]) if len(versions) == 1 and versions[0].isdigit() else None
    same = (
        local is not None
        and local.input == inputs[0]
        and tuple(local.outputs) == tuple(outputs)
        and (version is None or local.version == version)
    )
    return ModelSpec(
        name=name,
        version=version,
        variant=None,
        input=inputs[0],
        outputs=tuple(outputs),
        task=local.task if same and local else "unknown",
        labels=local.labels if same and local else None,
        preprocessing=dict(local.preprocessing) if same and local else {},
        path=None,
        tokenizer=local.tokenizer if same and local else None,
    )

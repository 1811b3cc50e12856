"""A request's tensors checked against what the model takes, before anything runs.

One set of rules for every way in: the v2 decoder checks each tensor's header here before
converting its data (so a request that cannot fit the model costs no more than its bytes), and
the dataplane and the batch runner check whole requests with :func:`validate_inputs`. Messages
name the model, the tensor, the expectation and what came, and never grow with the request:
lists of names are cut after a few.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidInput, PayloadTooLarge
from .repository import TensorSpec

if TYPE_CHECKING:
    from .protocol import InferRequest, RequestedOutput

__all__ = [
    "Expected",
    "names",
    "check_tensor",
    "check_samples",
    "validate_inputs",
    "select_outputs",
]

_SHOWN = 8


def names(items: Iterable[Any], limit: int = _SHOWN) -> str:
    """``['a', 'b', ...]`` with at most ``limit`` shown and the rest counted."""
    items = list(items)
    shown = ", ".join(repr(str(i)[:64]) for i in items[:limit])
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return f"[{shown}{more}]"


@dataclass(frozen=True, slots=True)
class Expected:
    """What one model takes: its inputs by name, and the most samples one request may
    carry (its queue size; more can never be served)."""

    model: str
    inputs: Mapping[str, TensorSpec]
    max_samples: int | None = None

    @classmethod
    def of(cls, model: str, specs: Sequence[TensorSpec], max_samples: int | None) -> Expected:
        return cls(model, {s.name: s for s in specs}, max_samples)


def check_tensor(spec: TensorSpec, shape: Sequence[int], datatype: str, model: str) -> None:
    """One input's datatype and shape against the model's spec (on every request: plain
    loops, no generators)."""
    if datatype != spec.datatype:
        raise InvalidInput(
            f"input '{spec.name}' of model '{model}': expected datatype {spec.datatype}, "
            f"got {datatype}"
        )
    dims = spec.shape
    fits = len(shape) == len(dims)
    if fits:
        for d, a in zip(dims, shape, strict=True):
            if d != -1 and d != a:
                fits = False
                break
    if not fits:
        raise InvalidInput(
            f"input '{spec.name}' of model '{model}': expected shape {list(spec.shape)}, "
            f"got {list(shape)}"
        )


def check_samples(samples: int, limit: int | None, model: str) -> None:
    """413 for a request with more samples than the model can ever queue."""
    if limit is not None and samples > limit:
        raise PayloadTooLarge(
            f"model '{model}': {samples} samples in one request, more than the {limit} it "
            "can queue (max_queue_size); send at most that many per request"
        )


def validate_inputs(request: InferRequest, specs: list[TensorSpec], model: str) -> int:
    """Check names, datatypes, shapes and finiteness against the model; return the batch size."""
    expected = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in request.inputs]
    unknown = [n for n in request.inputs if n not in expected]
    if missing or unknown:
        raise InvalidInput(
            f"model '{model}' expects inputs {names(sorted(expected))}; "
            + (f"missing {names(missing)}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"unknown {names(unknown)}" if unknown else "")
        )
    batch = None
    checked = request.checked_against or {}  # what the decoder checked already
    for spec in specs:
        arr = request.inputs[spec.name]
        if checked.get(spec.name) != spec:
            check_tensor(spec, arr.shape, request.datatypes[spec.name], model)
        if spec.shape and spec.shape[0] == -1:
            if arr.shape[0] == 0:
                raise InvalidInput(f"input '{spec.name}' of model '{model}': batch size is 0")
            if batch is not None and arr.shape[0] != batch:
                raise InvalidInput(
                    f"inputs of model '{model}' disagree on the batch size: "
                    f"'{spec.name}' has {arr.shape[0]}, an earlier input {batch}"
                )
            batch = arr.shape[0]
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr.ravel()))[0])
            raise InvalidInput(
                f"input '{spec.name}' of model '{model}': NaN or infinity at flat index {bad}; "
                "expected finite numbers"
            )
    return batch or 1


def select_outputs(
    request: InferRequest, available: list[str], model: str
) -> list[RequestedOutput]:
    """The outputs to send back (all when the request names none), each marked binary or not."""
    from .protocol import RequestedOutput

    if request.outputs is None:
        return [RequestedOutput(n, request.binary_output) for n in available]
    unknown = [o.name for o in request.outputs if o.name not in available]
    if unknown:
        raise InvalidInput(
            f"model '{model}' has outputs {names(available)}; requested unknown {names(unknown)}"
        )
    return [RequestedOutput(o.name, o.binary or request.binary_output) for o in request.outputs]

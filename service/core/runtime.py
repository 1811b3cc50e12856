"""The one module that owns onnxruntime sessions: providers, threads, optimisation, ``run()``.

onnxruntime's exceptions are translated into the project's own here and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from .datatypes import ORT_TO_V2
from .errors import InferenceFailed, InvalidInput
from .repository import TensorSpec

__all__ = ["RuntimeOptions", "ModelLoadError", "OrtSession", "session_signature"]

log = logging.getLogger("slimserve.runtime")

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
#: onnxruntime errors that mean "the input does not fit the graph" rather than a server fault
_CLIENT_ERRORS = (ort_errors.InvalidArgument,)
#: every exception class onnxruntime's bindings define (none derives from a common base)
_ORT_ERRORS = tuple(
    cls for cls in vars(ort_errors).values() if isinstance(cls, type) and issubclass(cls, Exception)
)


class ModelLoadError(Exception):
    """onnxruntime could not load a file; the message names it."""


class RuntimeOptions:
    """Session settings, taken from :class:`service.core.settings.Settings` (or given in tests)."""

    def __init__(
        self,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        allow_spinning: bool = False,
        graph_optimization: str = "all",
    ) -> None:
        self.providers = tuple(providers) if providers else _DEFAULT_PROVIDERS
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.allow_spinning = allow_spinning
        self.graph_optimization = graph_optimization

    @classmethod
    def from_settings(cls, settings: Any) -> RuntimeOptions:
        return cls(
            settings.providers,
            settings.intra_op_threads,
            settings.inter_op_threads,
            settings.allow_spinning,
            settings.graph_optimization,
        )

    def session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = _OPT_LEVELS[self.graph_optimization]
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        spin = "1" if self.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        opts.log_severity_level = 3
        return opts


def session_signature(session: ort.InferenceSession) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs as the graph declares them; symbolic or unknown dimensions are -1.

    ``KeyError`` names an input or output whose type no v2 request or response can carry.
    """

    def specs(args: list[Any], kind: str) -> list[TensorSpec]:
        out = []
        for a in args:
            if a.type not in ORT_TO_V2:
                raise KeyError(
                    f"{kind} {a.name!r} has type {a.type}, which slimserve does not serve; "
                    f"expected a tensor of {', '.join(sorted(ORT_TO_V2.values()))}"
                )
            shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in a.shape)
            out.append(TensorSpec(a.name, ORT_TO_V2[a.type], shape))
        return out

    return specs(session.get_inputs(), "input"), specs(session.get_outputs(), "output")


class OrtSession:
    """One onnxruntime session over one ONNX file, on the first provider that works.

    ``OrtSession.open_count`` counts the sessions created and not yet closed, in this process:
    what unloading frees can be checked (a leaked session is a leaked model in memory).
    """

    open_count = 0

    def __init__(self, path: Path, label: str, options: RuntimeOptions | None = None) -> None:
        self.path = Path(path)
        self.label = label  # e.g. "digits-cnn:1:fp32", for logs and errors
        options = options or RuntimeOptions()
        available = set(ort.get_available_providers())
        wanted = [p for p in options.providers if p in available] or ["CPUExecutionProvider"]
        start = time.perf_counter()
        self._session = self._open(options, wanted)
        self.load_seconds = time.perf_counter() - start
        self.provider = self._session.get_providers()[0]
        try:
            self.inputs, self.outputs = session_signature(self._session)
        except KeyError as exc:  # a sequence, map or BF16 tensor: nothing a v2 request carries
            raise ModelLoadError(f"{self.path}: {exc.args[0]}") from None
        self.output_names = [o.name for o in self.outputs]
        OrtSession.open_count += 1
        self.closed = False
        log.info(
            "model %s: onnxruntime %s on %s (loaded in %.0f ms)",
            label,
            ort.__version__,
            self.provider,
            self.load_seconds * 1000,
        )

    def _open(self, options: RuntimeOptions, providers: list[str]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                str(self.path), options.session_options(), providers=providers
            )
        except _ORT_ERRORS as exc:
            if providers != ["CPUExecutionProvider"] and "CPUExecutionProvider" in providers:
                log.warning(
                    "model %s: %s failed (%s); falling back to CPUExecutionProvider",
                    self.label,
                    providers[0],
                    exc,
                )
                return self._open(options, ["CPUExecutionProvider"])
            raise ModelLoadError(f"{self.path}: onnxruntime cannot load it: {exc}") from exc

    def close(self) -> None:
        """Drop the onnxruntime session (its memory goes with the last reference)."""
        if not self.closed:
            self.closed = True
            OrtSession.open_count -= 1
            del self._session

    def run(
        self, feeds: dict[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> list[np.ndarray]:
        """Run the graph. Input onnxruntime rejects is a 400; any other failure a 500."""
        try:
            return self._session.run(list(output_names) if output_names else None, feeds)
        except _CLIENT_ERRORS as exc:
            raise InvalidInput(
                f"model {self.label}: onnxruntime rejected the input: {exc}"
            ) from exc
        except _ORT_ERRORS as exc:
            raise InferenceFailed(f"model {self.label}: inference failed: {exc}") from exc

"""The onnxruntime session every baseline and peer opens: slimserve's defaults, so that the
servers compared differ in how they serve, not in how the model runs. Needs only onnxruntime
(the peers' virtual environments import it too)."""

from __future__ import annotations

import onnxruntime as ort

__all__ = ["open_session", "session_options"]


def session_options() -> ort.SessionOptions:
    """slimserve's defaults: all graph optimisations, intra-op threads chosen by onnxruntime,
    one inter-op thread, sequential execution, idle threads not spinning."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 0
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def open_session(path: str) -> ort.InferenceSession:
    """``path`` on the CPU with :func:`session_options`."""
    return ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])

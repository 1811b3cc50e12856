"""The PyTriton peer: one ONNX model as a Python callable behind NVIDIA's Triton server.

``nvidia-pytriton`` ships a ``tritonserver`` binary and runs the callable through Triton's
Python backend; Triton speaks the v2 protocol itself (``/v2/models/<name>/infer``,
``/v2/health/ready``). The callable is bound with ``@batch``, PyTriton's idiom, so Triton's
dynamic batcher (PyTriton's default: no queue delay, ``max_batch_size`` 64 here, as in the
BentoML baseline) may hand it several requests at once. onnxruntime gets the FastAPI baseline's
(and slimserve's) session settings. HTTP on 127.0.0.1 only; gRPC and metrics off. Run it in
its own virtual environment (``loadtest.serving.peers``)::

    python -m loadtest.baselines.pytriton_server --model-path m.onnx --name digits-cnn --port 8004
"""

from __future__ import annotations

import argparse
import os
import signal
import sysconfig
from types import FrameType
from typing import Any

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from loadtest.baselines.session import open_session

__all__ = ["main"]

_ORT_TO_NUMPY = {
    "tensor(bool)": np.bool_,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(float16)": np.float16,
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
}
MAX_BATCH_SIZE = 64


def _tensor(node: Any) -> Tensor:
    """Triton's description of an ONNX input or output: its shape without the batch axis
    (``(1,)`` for a ``(batch,)`` tensor)."""
    dims = tuple(d if isinstance(d, int) else -1 for d in node.shape[1:])
    return Tensor(name=node.name, dtype=_ORT_TO_NUMPY[node.type], shape=dims or (1,))


def _use_own_libpython() -> None:
    """Triton's Python backend stub links ``libpython3.11.so.1.0`` and, without this, finds the
    system's (here Debian's 3.11.2) while importing this interpreter's standard library (pyenv's
    3.11.7): ``multiprocessing`` then fails on ``RLock._recursion_count``. The stub inherits
    this process's environment, so this interpreter's own shared library goes first."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir:
        paths = [libdir, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
        os.environ["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(paths))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # Triton.serve() stops Triton and removes its workspace on it


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="The ONNX file to serve.")
    parser.add_argument("--name", required=True, help="The model name in the URL.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--workspace",
        help="PyTriton's workspace (a copy of tritonserver, sockets, the model store)",
    )
    args = parser.parse_args(argv)
    _use_own_libpython()
    signal.signal(signal.SIGTERM, _interrupt)

    session = open_session(args.model_path)
    inputs = [_tensor(i) for i in session.get_inputs()]
    outputs = [_tensor(o) for o in session.get_outputs()]

    @batch
    def infer(**feeds: np.ndarray) -> dict[str, np.ndarray]:
        values = session.run(None, feeds)
        # (batch,) outputs travel as (batch, 1): Triton's batched tensors have a row shape;
        # and with numpy 1.x onnxruntime's int64 is numpy.longlong, which PyTriton refuses:
        # the same bytes viewed as the declared dtype
        return {
            t.name: v.reshape(len(v), *t.shape).view(t.dtype)
            for t, v in zip(outputs, values, strict=True)
        }

    config = TritonConfig(
        http_address=args.host,
        http_port=args.port,
        allow_grpc=False,
        allow_metrics=False,
        log_verbose=0,
        exit_timeout_secs=5,
    )
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=inputs,
            outputs=outputs,
            config=ModelConfig(max_batch_size=MAX_BATCH_SIZE),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()

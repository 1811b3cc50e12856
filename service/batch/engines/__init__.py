"""Engines: what runs the model over a stream of chunks, answering in input order.

- ``local``: onnxruntime in this process (:class:`service.core.runtime.OrtSession`, the server's
  own session owner), the next chunk read in a background thread while this one runs.
- ``http``: a running slimserve over the v2 protocol with binary tensors, with bounded
  concurrency and retries with backoff on 503 and connection errors.
- ``ray``: Ray Data with an actor pool of onnxruntime sessions (``service.batch.engines.ray``,
  imported only when asked for, as Ray is an optional extra).

Every engine validates rows with :func:`service.core.protocol.validate_inputs` (in-process) or the
server's own validation (http). A batch the model refuses as invalid input is split in halves
until the refused rows are found; they become row errors and the rest is kept.
"""

from __future__ import annotations

from .base import (
    CANDIDATE_BATCH_SIZES,
    DEFAULT_HTTP_BATCH,
    ENGINES,
    Engine,
    Result,
    RowsRejected,
    background_priority,
    finalize,
    run_batches,
)
from .http import HttpEngine
from .local import LocalEngine, calibrate_batch_size

__all__ = [
    "ENGINES",
    "CANDIDATE_BATCH_SIZES",
    "DEFAULT_HTTP_BATCH",
    "Result",
    "Engine",
    "LocalEngine",
    "HttpEngine",
    "RowsRejected",
    "background_priority",
    "run_batches",
    "finalize",
    "calibrate_batch_size",
]

"""The BentoML baseline: one ONNX model behind a plain BentoML 1.4 service, two flavours.

``Plain`` is a ``@bentoml.api`` with no batching; ``Batched`` is the same API with BentoML's
adaptive batching (``max_batch_size=64``, ``max_latency_ms=10``). The ONNX file comes from
``BENCH_MODEL_PATH``; onnxruntime gets the FastAPI baseline's (and slimserve's) session settings.
The API has BentoML's natural shape, not the v2 protocol: ``POST /predict`` with
``{"x": [[...]]}`` answers the model's ``probabilities`` (or first output) as a JSON array.
Access logs are off, as in the FastAPI baseline::

    BENCH_MODEL_PATH=m.onnx bentoml serve loadtest.baselines.bentoml_service:Plain --port 8002
"""

from __future__ import annotations

import os

import bentoml
import numpy as np

from loadtest.baselines.session import open_session

__all__ = ["Batched", "Plain"]


class _OnnxModel:
    """The session and the one call both flavours share."""

    def __init__(self) -> None:
        self.session = open_session(os.environ["BENCH_MODEL_PATH"])
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "probabilities" if "probabilities" in outputs else outputs[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        feeds = {self.input_name: np.asarray(x, dtype=np.float32)}
        return self.session.run([self.output_name], feeds)[0]


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class Plain(_OnnxModel):
    @bentoml.api
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class Batched(_OnnxModel):
    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=10)
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)

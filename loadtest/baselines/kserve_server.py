"""The KServe peer: one ONNX model as a ``kserve.Model`` served by KServe's Python ModelServer.

The model speaks the v2 protocol through KServe's own types: ``predict()`` gets an
``InferRequest``, turns its inputs into numpy with ``as_numpy()``, runs an onnxruntime session
(``loadtest.baselines.session``, as every baseline) and answers an ``InferResponse`` with one
``InferOutput`` per ONNX output. One uvicorn worker, gRPC off, no per-request log lines (the
access log and KServe's latency and timing lines: the other servers log none either). KServe
hard-codes ``host="0.0.0.0"`` for its REST server; ``LoopbackModelServer`` binds 127.0.0.1
instead. Run it in a virtual environment of its own (``loadtest.serving.peers``)::

    python -m loadtest.baselines.kserve_server --model-path m.onnx --name digits-cnn --port 8003
"""

from __future__ import annotations

import argparse
import logging

import kserve
from kserve import InferOutput, InferRequest, InferResponse
from kserve.utils.numpy_codec import from_np_dtype
from kserve.utils.utils import generate_uuid

from loadtest.baselines.session import open_session

__all__ = ["LoopbackModelServer", "OnnxModel", "main"]


class OnnxModel(kserve.Model):
    """An ``onnxruntime.InferenceSession`` behind KServe's v2 data plane."""

    def __init__(self, name: str, model_path: str) -> None:
        super().__init__(name)
        self.model_path = model_path
        self.load()

    def load(self) -> bool:
        self.session = open_session(self.model_path)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        values = self.session.run(self.output_names, feeds)
        outputs = [
            InferOutput(name=n, shape=list(v.shape), datatype=from_np_dtype(v.dtype), data=v)
            for n, v in zip(self.output_names, values, strict=True)
        ]
        return InferResponse(  # as kserve.utils.utils.get_predict_response builds it
            response_id=payload.id or generate_uuid(),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )


class LoopbackModelServer(kserve.ModelServer):
    """``kserve.ModelServer`` with its REST server on 127.0.0.1 rather than on every address.

    ``start()`` builds the REST server (whose uvicorn config says ``0.0.0.0``) and then calls
    ``setup_event_loop()`` before anything binds: the one place to change the host."""

    host = "127.0.0.1"

    def setup_event_loop(self) -> None:
        if self._rest_server is not None:
            self._rest_server.config.host = self.host
        super().setup_event_loop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="The ONNX file to serve.")
    parser.add_argument("--name", required=True, help="The model name in the URL.")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = LoopbackModelServer(
        http_port=args.port, workers=1, enable_grpc=False, enable_latency_logging=False
    )
    # after ModelServer() has configured KServe's logging: no line per request
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([OnnxModel(args.name, args.model_path)])


if __name__ == "__main__":
    main()

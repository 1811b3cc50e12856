"""The MLServer peer: one ONNX model as an MLServer custom runtime, what an MLServer user writes.

``load()`` opens an onnxruntime session on the file named by the model settings'
``parameters.uri`` (``loadtest.baselines.session``: slimserve's session settings, as every
baseline); ``predict()`` decodes the v2 inputs with MLServer's ``NumpyCodec``, runs the session
and encodes each output under its ONNX name. ``mlserver start <folder>`` serves it, with
``settings.json`` and ``model-settings.json`` in the folder (``loadtest.serving.peers`` writes
them), in a virtual environment of its own.
"""

from __future__ import annotations

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

from loadtest.baselines.session import open_session

__all__ = ["OnnxRuntime"]


class OnnxRuntime(MLModel):
    """An ``onnxruntime.InferenceSession`` behind MLServer's v2 data plane."""

    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        self._session = open_session(path)
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: self.decode(i, default_codec=NumpyCodec) for i in payload.inputs}
        values = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._output_names, values, strict=True)
            ],
        )

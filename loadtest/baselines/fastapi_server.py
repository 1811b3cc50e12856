"""The baseline: one ONNX model behind FastAPI + uvicorn, speaking the v2 JSON infer protocol.

What a competent engineer writes in an afternoon, and nothing slower than it needs to be:
uvicorn with uvloop and httptools, one worker, access log off; the body parsed and the
response written with orjson; ``session.run`` in Starlette's thread pool so the event loop
stays free; onnxruntime with the same thread and spinning settings as slimserve's defaults.
No batching, no queue limits, no metrics. Run it as::

    python -m loadtest.baselines.fastapi_server --model-path m.onnx --name digits-cnn --port 8001
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from loadtest.baselines.session import open_session

__all__ = ["create_app", "main"]

_V2_TO_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_NUMPY_TO_V2 = {v: k for k, v in _V2_TO_NUMPY.items()}
_JSON = "application/json"


def _error(status: int, message: str) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type=_JSON)


def create_app(model_path: str, name: str, version: str = "1") -> FastAPI:
    """The v2 routes for one model: health, model metadata and JSON infer."""
    session = open_session(model_path)
    input_names = {i.name for i in session.get_inputs()}
    output_names = [o.name for o in session.get_outputs()]
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/v2/health/live")
    @app.get("/v2/health/ready")
    async def health() -> Response:
        return Response(b'{"ready":true}', media_type=_JSON)

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> Response:
        if model_name != name:
            return _error(404, f"model '{model_name}' is not served here (models: {name})")
        try:
            doc = orjson.loads(await request.body())
            feeds = {}
            for tensor in doc["inputs"]:
                dtype = _V2_TO_NUMPY[tensor["datatype"]]
                shape = tuple(tensor["shape"])
                arr = np.asarray(tensor["data"], dtype=dtype)
                if arr.size != math.prod(shape):
                    return _error(400, f"input {tensor['name']!r}: data does not fit {shape}")
                feeds[tensor["name"]] = arr.reshape(shape)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return _error(400, f"malformed infer request: {exc}")
        if set(feeds) != input_names:
            return _error(400, f"model '{name}' expects inputs {sorted(input_names)}")
        wanted = [o["name"] for o in doc.get("outputs") or []] or output_names
        try:
            values = await run_in_threadpool(session.run, wanted, feeds)
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            return _error(400, f"onnxruntime rejected the input: {exc}")
        outputs: list[dict[str, Any]] = [
            {
                "name": n,
                "datatype": _NUMPY_TO_V2[v.dtype],
                "shape": list(v.shape),
                "data": np.ascontiguousarray(v).ravel(),
            }
            for n, v in zip(wanted, values, strict=True)
        ]
        body: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": outputs}
        if "id" in doc:
            body["id"] = doc["id"]
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type=_JSON)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="The ONNX file to serve.")
    parser.add_argument("--name", required=True, help="The model name in the URL.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(args.model_path, args.name),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()

"""Open Inference Protocol v2: decode requests, validate them against a model, encode responses.

Covers JSON tensors (flat or nested ``data``) and Triton's binary tensor extension
(``binary_data_size`` on inputs, ``binary_data`` on outputs, ``Inference-Header-Content-Length``).
Plain functions over bytes and numpy arrays, so the HTTP app and the batch runner share them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from .datatypes import V2_TO_NUMPY, from_numpy
from .errors import InvalidInput
from .repository import TensorSpec

__all__ = [
    "HEADER_LENGTH",
    "RequestedOutput",
    "InferRequest",
    "decode_request",
    "validate_inputs",
    "select_outputs",
    "encode_response",
    "InferResponse",
    "encode_request",
    "decode_response",
    "dumps",
]

HEADER_LENGTH = "inference-header-content-length"
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=_JSON_OPTS)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(slots=True)
class InferRequest:
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False  # request parameter ``binary_data_output``


def _fail(message: str) -> InvalidInput:
    return InvalidInput(message)


def _header_length(value: str | None, body_len: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise _fail(
            f"header Inference-Header-Content-Length: expected an integer, got {value!r}"
        ) from None
    if not 0 < n <= body_len:
        raise _fail(
            f"header Inference-Header-Content-Length: {n} is outside the body of {body_len} bytes"
        )
    return n


def decode_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Parse an infer request body; a malformed one raises :class:`InvalidInput` (400)."""
    n = _header_length(header_length, len(body))
    header, binary = (body[:n], memoryview(body)[n:]) if n is not None else (body, memoryview(b""))
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _fail(f"request body: expected a JSON object, got {type(doc).__name__}")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _fail("request body: expected 'inputs' to be a non-empty list of tensors")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail("request 'parameters': expected an object")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _fail(f"request 'id': expected a string, got {type(request_id).__name__}")

    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        name, shape, datatype = _tensor_header(raw, i)
        if name in inputs:
            raise _fail(f"input {name!r} appears twice")
        tparams = raw.get("parameters") or {}
        if "binary_data_size" in tparams:
            size = tparams["binary_data_size"]
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise _fail(
                    f"input {name!r}: binary_data_size {size!r} does not fit the "
                    f"{len(binary) - offset} binary bytes left after the JSON header"
                )
            inputs[name] = _from_binary(binary[offset : offset + size], name, shape, datatype)
            offset += size
        elif "data" in raw:
            inputs[name] = _from_json(raw["data"], name, shape, datatype)
        else:
            raise _fail(f"input {name!r}: expected 'data' or parameters.binary_data_size")
        datatypes[name] = datatype
    if offset != len(binary):
        raise _fail(f"request has {len(binary) - offset} binary bytes that no input claims")

    outputs = None
    if doc.get("outputs") is not None:
        raw_outputs = doc["outputs"]
        if not isinstance(raw_outputs, list):
            raise _fail("request 'outputs': expected a list")
        outputs = []
        for j, o in enumerate(raw_outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise _fail(f"outputs[{j}]: expected an object with a string 'name'")
            oparams = o.get("parameters") or {}
            outputs.append(RequestedOutput(o["name"], bool(oparams.get("binary_data", False))))
    return InferRequest(
        inputs=inputs,
        datatypes=datatypes,
        id=request_id,
        parameters=params,
        outputs=outputs,
        binary_output=bool(params.get("binary_data_output", False)),
    )


def _tensor_header(raw: Any, i: int, kind: str = "input") -> tuple[str, tuple[int, ...], str]:
    if not isinstance(raw, dict):
        raise _fail(f"{kind}s[{i}]: expected an object, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _fail(f"{kind}s[{i}]: expected a non-empty string 'name'")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _fail(
            f"{kind} {name!r}: expected 'shape' to be a list of integers >= 0, got {shape!r}"
        )
    datatype = raw.get("datatype")
    if datatype not in V2_TO_NUMPY:
        raise _fail(
            f"{kind} {name!r}: datatype {datatype!r} is not supported; "
            f"expected one of {', '.join(V2_TO_NUMPY)}"
        )
    return name, tuple(shape), datatype


def _from_json(
    data: Any, name: str, shape: tuple[int, ...], datatype: str, kind: str = "input"
) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count or not all(isinstance(s, str) for s in flat):
            raise _fail(f"{kind} {name!r}: expected {count} strings for shape {list(shape)}")
        return np.array(flat, dtype=object).reshape(shape)
    try:
        arr = np.asarray(data)
    except ValueError:
        raise _fail(
            f"{kind} {name!r}: 'data' is a ragged nested list; expected shape {list(shape)}"
        ) from None
    if arr.dtype.kind not in "biuf":
        raise _fail(f"{kind} {name!r}: 'data' must hold numbers for datatype {datatype}")
    target = V2_TO_NUMPY[datatype]
    if (
        target.kind in "iu"
        and arr.dtype.kind == "f"
        and not (np.isfinite(arr) & (arr == np.round(arr))).all()
    ):
        raise _fail(f"{kind} {name!r}: datatype {datatype} takes integers, got fractions")
    if target.kind == "b" and arr.dtype.kind != "b":
        raise _fail(f"{kind} {name!r}: datatype BOOL takes true/false values")
    if arr.size != count:
        raise _fail(
            f"{kind} {name!r}: shape {list(shape)} needs {count} elements, 'data' has {arr.size}"
        )
    try:
        return arr.astype(target, copy=False).reshape(shape)
    except OverflowError:
        raise _fail(f"{kind} {name!r}: a value does not fit datatype {datatype}") from None


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


def _from_binary(
    buf: memoryview, name: str, shape: tuple[int, ...], datatype: str, kind: str = "input"
) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(buf):
            if pos + 4 > len(buf):
                raise _fail(f"{kind} {name!r}: truncated BYTES element length")
            (size,) = struct.unpack_from("<I", buf, pos)
            items.append(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if len(items) != count or pos != len(buf):
            raise _fail(f"{kind} {name!r}: expected {count} BYTES elements, got {len(items)}")
        return np.array(items, dtype=object).reshape(shape)
    dtype = V2_TO_NUMPY[datatype].newbyteorder("<")
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise _fail(
            f"{kind} {name!r}: shape {list(shape)} of {datatype} needs {expected} bytes, "
            f"binary_data_size is {len(buf)}"
        )
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def validate_inputs(request: InferRequest, specs: list[TensorSpec], model: str) -> int:
    """Check names, datatypes, shapes and finiteness against the model; return the batch size."""
    expected = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in request.inputs]
    unknown = [n for n in request.inputs if n not in expected]
    if missing or unknown:
        raise _fail(
            f"model '{model}' expects inputs {sorted(expected)}; "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"unknown {unknown}" if unknown else "")
        )
    batch = None
    for spec in specs:
        arr = request.inputs[spec.name]
        got = request.datatypes[spec.name]
        if got != spec.datatype:
            raise _fail(
                f"input '{spec.name}' of model '{model}': expected datatype {spec.datatype}, "
                f"got {got}"
            )
        if len(arr.shape) != len(spec.shape) or any(
            d != -1 and d != a for d, a in zip(spec.shape, arr.shape, strict=False)
        ):
            raise _fail(
                f"input '{spec.name}' of model '{model}': expected shape {list(spec.shape)}, "
                f"got {list(arr.shape)}"
            )
        if spec.shape and spec.shape[0] == -1:
            if arr.shape[0] == 0:
                raise _fail(f"input '{spec.name}' of model '{model}': batch size is 0")
            if batch is not None and arr.shape[0] != batch:
                raise _fail(
                    f"inputs of model '{model}' disagree on the batch size: "
                    f"'{spec.name}' has {arr.shape[0]}, an earlier input {batch}"
                )
            batch = arr.shape[0]
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr.ravel()))[0])
            raise _fail(
                f"input '{spec.name}' of model '{model}': NaN or infinity at flat index {bad}; "
                "expected finite numbers"
            )
    return batch or 1


def select_outputs(
    request: InferRequest, available: list[str], model: str
) -> list[RequestedOutput]:
    """The outputs to send back (all when the request names none), each marked binary or not."""
    if request.outputs is None:
        return [RequestedOutput(n, request.binary_output) for n in available]
    unknown = [o.name for o in request.outputs if o.name not in available]
    if unknown:
        raise _fail(f"model '{model}' has outputs {available}; requested unknown {unknown}")
    return [RequestedOutput(o.name, o.binary or request.binary_output) for o in request.outputs]


def encode_response(
    model: str,
    version: str,
    request: InferRequest,
    wanted: list[RequestedOutput],
    values: dict[str, np.ndarray],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (binary outputs follow the JSON header)."""
    outputs = []
    blobs: list[bytes] = []
    for out in wanted:
        arr = values[out.name]
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": from_numpy(arr.dtype),
            "shape": list(arr.shape),
        }
        if out.binary:
            blob = _to_binary(arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif arr.dtype.kind == "O":
            entry["data"] = [x.decode() if isinstance(x, bytes) else str(x) for x in arr.ravel()]
        else:
            entry["data"] = np.ascontiguousarray(arr).ravel()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    if parameters:
        doc["parameters"] = parameters
    return _pack(doc, blobs)


def _pack(doc: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """JSON alone, or the JSON header followed by binary tensors (Triton's extension)."""
    header = dumps(doc)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def _to_binary(arr: np.ndarray) -> bytes:
    if arr.dtype.kind == "O" or arr.dtype.kind in "US":
        parts = []
        for x in arr.ravel():
            b = x if isinstance(x, bytes) else str(x).encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


# --------------------------------------------------------------------------------------------
# the client's side (the batch runner's http engine): the same tensors, the other direction


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str | None
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)


def encode_request(
    inputs: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    binary: bool = True,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """An infer request body and its headers, as ``tritonclient.http`` builds one.

    With ``binary`` the tensors travel as raw little-endian bytes after the JSON header
    (``binary_data_size``, ``Inference-Header-Content-Length``) and the outputs are asked
    for in binary too.
    """
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, arr in inputs.items():
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(arr.shape),
            "datatype": from_numpy(arr.dtype),
        }
        if binary:
            blob = _to_binary(arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif arr.dtype.kind == "O":
            entry["data"] = [str(x) for x in arr.ravel()]
        else:
            entry["data"] = np.ascontiguousarray(arr).ravel()
        tensors.append(entry)
    doc: dict[str, Any] = {"inputs": tensors}
    params = dict(parameters or {})
    if outputs is not None:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]
    elif binary:
        params["binary_data_output"] = True
    if params:
        doc["parameters"] = params
    return _pack(doc, blobs)


def decode_response(body: bytes, header_length: str | None = None) -> InferResponse:
    """A server's infer response (JSON or binary outputs); :class:`InvalidInput` when it is
    not a v2 response."""
    n = _header_length(header_length, len(body))
    header, binary = (body[:n], memoryview(body)[n:]) if n is not None else (body, memoryview(b""))
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"response body is not valid JSON: {exc}") from None
    raw_outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(raw_outputs, list):
        raise _fail("response body: expected an object with a list of 'outputs'")
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, raw in enumerate(raw_outputs):
        name, shape, datatype = _tensor_header(raw, i, "output")
        size = (raw.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise _fail(
                    f"output {name!r}: binary_data_size {size!r} does not fit the "
                    f"{len(binary) - offset} binary bytes left after the JSON header"
                )
            view = binary[offset : offset + size]
            outputs[name] = _from_binary(view, name, shape, datatype, "output").copy()
            offset += size
        elif "data" in raw:
            outputs[name] = _from_json(raw["data"], name, shape, datatype, "output")
        else:
            raise _fail(f"output {name!r}: expected 'data' or parameters.binary_data_size")
    version = doc.get("model_version")
    return InferResponse(
        model_name=str(doc.get("model_name", "")),
        model_version=None if version is None else str(version),
        outputs=outputs,
        parameters=doc.get("parameters") or {},
    )

"""Open Inference Protocol v2: decode requests, validate them against a model, encode responses.

Covers JSON tensors (flat or nested ``data``) and Triton's binary tensor extension
(``binary_data_size`` on inputs, ``binary_data`` on outputs, ``Inference-Header-Content-Length``).
Plain functions over bytes and numpy arrays, so the HTTP app and the batch runner share them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import orjson

from .datatypes import V2_TO_NUMPY, from_numpy
from .errors import InvalidInput
from .validation import (
    Expected,
    check_samples,
    check_tensor,
    names,
    select_outputs,
    validate_inputs,
)

__all__ = [
    "HEADER_LENGTH",
    "RequestedOutput",
    "InferRequest",
    "decode_request",
    "tensor_header",
    "expect_tensor",
    "from_bytes",
    "to_bytes",
    "check_integers",
    "validate_inputs",
    "select_outputs",
    "Expected",
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
    #: the decoder checked every tensor's name, datatype and shape against this model
    checked_against: Mapping[str, Any] | None = None


def _fail(message: str) -> InvalidInput:
    return InvalidInput(message)


#: the most dimensions and elements one tensor may declare (numpy's own limits are higher;
#: these keep size arithmetic far from them)
MAX_DIMS = 16
MAX_ELEMENTS = 2**31 - 1


class _Tensor(msgspec.Struct):
    """An input as it comes in a large body: fields checked by hand (for messages in the
    project's words), ``data`` kept as raw JSON until the header has been checked against
    the model."""

    name: Any = None
    shape: Any = None
    datatype: Any = None
    parameters: Any = None
    data: msgspec.Raw = msgspec.Raw()


class _SmallTensor(msgspec.Struct):
    """The same in a small body (up to :data:`SMALL_BODY`): ``data`` parsed in the same pass,
    since a few kilobytes cost little whatever they hold, and parsing twice would."""

    name: Any = None
    shape: Any = None
    datatype: Any = None
    parameters: Any = None
    data: Any = msgspec.UNSET


class _Output(msgspec.Struct):
    name: Any = None
    parameters: Any = None


class _Request(msgspec.Struct):
    inputs: list[_Tensor] | None = None
    id: Any = None
    parameters: Any = None
    outputs: list[_Output] | None = None


class _SmallRequest(msgspec.Struct):
    inputs: list[_SmallTensor] | None = None
    id: Any = None
    parameters: Any = None
    outputs: list[_Output] | None = None


#: bodies up to this many bytes are parsed in one pass; larger ones keep their data raw until
#: it is checked (memory: a small body's Python objects are at most a few hundred kilobytes)
SMALL_BODY = 64 * 1024
_DECODER = msgspec.json.Decoder(_Request)
_SMALL_DECODER = msgspec.json.Decoder(_SmallRequest)


def _header_length(value: str | None, body_len: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise _fail(
            f"header Inference-Header-Content-Length: expected an integer, got {value[:64]!r}"
        ) from None
    if not 0 < n <= body_len:
        raise _fail(
            f"header Inference-Header-Content-Length: {n} is outside the body of {body_len} bytes"
        )
    return n


def _where(exc: msgspec.ValidationError) -> str:
    """msgspec's ``Expected `object`, got `array` - at `$.inputs[0]` `` in the project's words:
    ``at $.inputs[0]: expected object, got array``."""
    what, _, where = str(exc).partition(" - at ")
    what = what.replace("`", "")
    return f"at {where.strip('`') or '$'}: {what[:1].lower()}{what[1:]}"


def _object(value: Any, what: str) -> dict[str, Any]:
    """A ``parameters`` object (absent is empty); 400 for anything but a JSON object."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"{what}: expected an object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return kinds.get(type(value), "a number" if isinstance(value, int | float) else "null")


def decode_request(
    body: bytes | bytearray, header_length: str | None = None, expected: Expected | None = None
) -> InferRequest:
    """Parse an infer request body; a malformed one raises :class:`InvalidInput` (400).

    With ``expected`` (the model's inputs), every tensor's name, datatype and shape is checked
    before its data is converted, so a request that cannot fit the model costs no more memory
    than its own bytes; one with more samples than the model can queue is a 413.
    """
    n = _header_length(header_length, len(body))
    view = memoryview(body)
    header, binary = (view[:n], view[n:]) if n is not None else (view, memoryview(b""))
    decoder: msgspec.json.Decoder[Any] = _SMALL_DECODER if len(header) <= SMALL_BODY else _DECODER
    try:
        doc = decoder.decode(header)
    except msgspec.ValidationError as exc:
        raise _fail(f"request body {_where(exc)}") from None
    except msgspec.DecodeError as exc:
        raise _fail(f"request body is not valid JSON: {exc}") from None
    if not doc.inputs:
        raise _fail("request body: expected 'inputs' to be a non-empty list of tensors")
    params = _object(doc.parameters, "request 'parameters'")
    if doc.id is not None and not isinstance(doc.id, str):
        raise _fail(f"request 'id': expected a string, got {_kind(doc.id)}")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for i, raw in enumerate(doc.inputs):
        name, shape, datatype = tensor_header(raw.name, raw.shape, raw.datatype, i)
        if name in inputs:
            raise _fail(f"input {name[:64]!r} appears twice")
        if expected is not None:
            expect_tensor(expected, name, shape, datatype)
        tparams = _object(raw.parameters, f"input {name[:64]!r} 'parameters'")
        if "binary_data_size" in tparams:
            size = tparams["binary_data_size"]
            if not _is_int(size) or size < 0 or offset + size > len(binary):
                raise _fail(
                    f"input {name[:64]!r}: binary_data_size {str(size)[:32]} does not fit the "
                    f"{len(binary) - offset} binary bytes left after the JSON header"
                )
            inputs[name] = from_bytes(binary[offset : offset + size], name, shape, datatype)
            offset += size
        elif _has_data(raw.data):
            inputs[name] = _from_json(raw.data, name, shape, datatype)
        else:
            raise _fail(f"input {name[:64]!r}: expected 'data' or parameters.binary_data_size")
        datatypes[name] = datatype
    if offset != len(binary):
        raise _fail(f"request has {len(binary) - offset} binary bytes that no input claims")
    return InferRequest(
        inputs=inputs,
        datatypes=datatypes,
        id=doc.id,
        parameters=params,
        outputs=_requested_outputs(doc.outputs),
        binary_output=bool(params.get("binary_data_output", False)),
        checked_against=expected.inputs if expected is not None else None,
    )


def _has_data(data: Any) -> bool:
    """Whether a tensor carried ``data`` (an empty Raw or UNSET: the field was absent)."""
    return data is not msgspec.UNSET and not (isinstance(data, msgspec.Raw) and not data)


def expect_tensor(expected: Expected, name: str, shape: tuple[int, ...], datatype: str) -> None:
    """One tensor's header against the model's inputs (400), and its samples against the
    model's queue (413), before its data is converted."""
    spec = expected.inputs.get(name)
    if spec is None:
        raise _fail(
            f"model '{expected.model}' has no input {name[:64]!r}; "
            f"it expects inputs {names(sorted(expected.inputs))}"
        )
    check_tensor(spec, shape, datatype, expected.model)
    if spec.shape[:1] == (-1,):
        check_samples(shape[0], expected.max_samples, expected.model)


def _requested_outputs(raw_outputs: list[_Output] | None) -> list[RequestedOutput] | None:
    if raw_outputs is None:
        return None
    outputs = []
    for j, o in enumerate(raw_outputs):
        if not isinstance(o.name, str) or not o.name:
            raise _fail(f"outputs[{j}]: expected a non-empty string 'name'")
        oparams = _object(o.parameters, f"output {o.name[:64]!r} 'parameters'")
        outputs.append(RequestedOutput(o.name, bool(oparams.get("binary_data", False))))
    return outputs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dimensions(shape: list[Any]) -> bool:
    """Every dimension an integer >= 0 (not a bool); a loop, not all() over a generator,
    since every request runs it."""
    for d in shape:  # noqa: SIM110
        if type(d) is not int or d < 0:
            return False
    return True


def tensor_header(
    name: Any, shape: Any, datatype: Any, i: int, kind: str = "input"
) -> tuple[str, tuple[int, ...], str]:
    """Name, shape and datatype of the ``i``-th tensor, checked whatever the wire (JSON, a
    protobuf message); sizes bounded before anything is allocated."""
    if not isinstance(name, str) or not name:
        raise _fail(f"{kind}s[{i}]: expected a non-empty string 'name'")
    label = f"{kind} {name[:64]!r}"
    if not isinstance(shape, list) or not _dimensions(shape):
        raise _fail(
            f"{label}: expected 'shape' to be a list of integers >= 0, got {str(shape)[:64]}"
        )
    if len(shape) > MAX_DIMS:
        raise _fail(f"{label}: {len(shape)} dimensions, at most {MAX_DIMS} are served")
    count = math.prod(shape)
    if count == 0:
        raise _fail(f"{label}: shape {shape} has no elements; expected at least one")
    if count > MAX_ELEMENTS:
        raise _fail(
            f"{label}: shape {shape} has {count} elements, more than one tensor may "
            f"carry ({MAX_ELEMENTS})"
        )
    if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
        raise _fail(
            f"{label}: datatype {str(datatype)[:32]!r} is not supported; "
            f"expected one of {', '.join(V2_TO_NUMPY)}"
        )
    return name, tuple(shape), datatype


def _from_json(
    data: Any, name: str, shape: tuple[int, ...], datatype: str, kind: str = "input"
) -> np.ndarray:
    """``data`` (raw JSON, or already parsed) as an array of ``shape``. Raw numbers are
    counted first (one comma between neighbours, at any depth), so a tensor whose data does
    not fit its shape is refused before anything is allocated for it."""
    count = math.prod(shape)
    if isinstance(data, msgspec.Raw):
        if datatype != "BYTES":
            got = _count_commas(data) + 1
            if got != count:
                if got == 1 and not bytes(data).strip(b"[] \t\r\n"):
                    got = 0
                raise _fail(
                    f"{kind} {name[:64]!r}: shape {list(shape)} needs {count} elements, "
                    f"'data' has {got}"
                )
        try:
            data = orjson.loads(bytes(data) if len(data) <= _CHUNK else memoryview(data))
        except orjson.JSONDecodeError as exc:  # e.g. 1e999, which no double holds
            raise _fail(f"{kind} {name[:64]!r}: 'data' cannot be read: {exc}") from None
    label = f"{kind} {name[:64]!r}"
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count or not all(isinstance(s, str) for s in flat):
            raise _fail(f"{label}: expected {count} strings for shape {list(shape)}")
        return np.array(flat, dtype=object).reshape(shape)
    try:
        arr = np.asarray(data)
    except ValueError:
        raise _fail(
            f"{label}: 'data' is a ragged nested list; expected shape {list(shape)}"
        ) from None
    target = V2_TO_NUMPY[datatype]
    if arr.dtype.kind not in "biuf":
        raise _fail(
            f"{label}: 'data' must hold numbers for datatype {datatype} "
            "(each within the datatype's range)"
        )
    if arr.size != count:
        raise _fail(f"{label}: shape {list(shape)} needs {count} elements, 'data' has {arr.size}")
    if target.kind == "b":
        if arr.dtype.kind != "b":
            raise _fail(f"{label}: datatype BOOL takes true/false values")
    elif target.kind in "iu":
        check_integers(arr, target, label, datatype)
    return arr.astype(target, copy=False).reshape(shape)


_CHUNK = 1 << 20


def _count_commas(raw: msgspec.Raw) -> int:
    """Commas in raw JSON; a large one counted a megabyte at a time (no copy of the whole)."""
    if len(raw) <= _CHUNK:
        return bytes(raw).count(b",")
    view = memoryview(raw)
    return sum(bytes(view[i : i + _CHUNK]).count(b",") for i in range(0, len(view), _CHUNK))


def check_integers(arr: np.ndarray, target: np.dtype, label: str, datatype: str) -> None:
    """400 unless every value of ``arr`` is a whole number within ``target``'s range."""
    if arr.dtype.kind == "f" and not (np.isfinite(arr) & (arr == np.round(arr))).all():
        raise _fail(f"{label}: datatype {datatype} takes integers, got fractions")
    info = np.iinfo(target)
    low, high = arr.min(), arr.max()
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise _fail(
            f"{label}: value {bad} does not fit datatype {datatype} ({info.min}..{info.max})"
        )


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


def from_bytes(
    buf: memoryview | bytes,
    name: str,
    shape: tuple[int, ...],
    datatype: str,
    kind: str = "input",
    source: str = "binary_data_size is",
) -> np.ndarray:
    """A tensor from its raw little-endian bytes (BYTES: each element a 4-byte length and its
    bytes), as Triton's binary extension and gRPC's raw contents carry it; ``source`` names
    where the bytes came from in the message."""
    count = math.prod(shape)
    label = f"{kind} {name[:64]!r}"
    if datatype == "BYTES":
        items: list[bytes] = []
        pos = 0
        while pos < len(buf) and len(items) <= count:
            if pos + 4 > len(buf):
                raise _fail(f"{label}: truncated BYTES element length")
            (size,) = struct.unpack_from("<I", buf, pos)
            items.append(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if len(items) != count or pos != len(buf):
            raise _fail(
                f"{label}: expected {count} BYTES elements in {len(buf)} bytes, "
                f"got {len(items)}{' or more' if len(items) > count else ''}"
            )
        return np.array(items, dtype=object).reshape(shape)
    dtype = V2_TO_NUMPY[datatype].newbyteorder("<")
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise _fail(
            f"{label}: shape {list(shape)} of {datatype} needs {expected} bytes, "
            f"{source} {len(buf)}"
        )
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


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
            blob = to_bytes(arr)
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


def to_bytes(arr: np.ndarray) -> bytes:
    """A tensor as raw little-endian bytes (BYTES: length-prefixed elements)."""
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
            blob = to_bytes(arr)
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


class _Response(msgspec.Struct):
    outputs: list[_Tensor] | None = None
    model_name: Any = None
    model_version: Any = None
    parameters: Any = None


_RESPONSE_DECODER = msgspec.json.Decoder(_Response)


def decode_response(body: bytes, header_length: str | None = None) -> InferResponse:
    """A server's infer response (JSON or binary outputs); :class:`InvalidInput` when it is
    not a v2 response."""
    n = _header_length(header_length, len(body))
    header, binary = (body[:n], memoryview(body)[n:]) if n is not None else (body, memoryview(b""))
    try:
        doc = _RESPONSE_DECODER.decode(header)
    except msgspec.ValidationError as exc:
        raise _fail(f"response body {_where(exc)}") from None
    except msgspec.DecodeError as exc:
        raise _fail(f"response body is not valid JSON: {exc}") from None
    if doc.outputs is None:
        raise _fail("response body: expected an object with a list of 'outputs'")
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, raw in enumerate(doc.outputs):
        name, shape, datatype = tensor_header(raw.name, raw.shape, raw.datatype, i, "output")
        size = _object(raw.parameters, f"output {name!r} 'parameters'").get("binary_data_size")
        if size is not None:
            if not _is_int(size) or size < 0 or offset + size > len(binary):
                raise _fail(
                    f"output {name!r}: binary_data_size {size!r} does not fit the "
                    f"{len(binary) - offset} binary bytes left after the JSON header"
                )
            view = binary[offset : offset + size]
            outputs[name] = from_bytes(view, name, shape, datatype, "output").copy()
            offset += size
        elif raw.data:
            outputs[name] = _from_json(raw.data, name, shape, datatype, "output")
        else:
            raise _fail(f"output {name!r}: expected 'data' or parameters.binary_data_size")
    return InferResponse(
        model_name=str(doc.model_name or ""),
        model_version=None if doc.model_version is None else str(doc.model_version),
        outputs=outputs,
        parameters=_object(doc.parameters, "response 'parameters'"),
    )

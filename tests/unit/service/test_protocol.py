from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from service.core.errors import InvalidInput
from service.core.protocol import (
    InferRequest,
    RequestedOutput,
    decode_request,
    encode_response,
    select_outputs,
    validate_inputs,
)
from service.core.repository import TensorSpec

SPEC = [TensorSpec("pixels", "FP32", (-1, 1, 8, 8))]


def body(inputs, **extra) -> bytes:
    return orjson.dumps({"inputs": inputs, **extra})


def test_flat_and_nested_data_decode_to_the_same_array() -> None:
    flat = decode_request(
        body([{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": list(range(6))}])
    )
    nested = decode_request(
        body([{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[0, 1, 2], [3, 4, 5]]}])
    )
    assert flat.inputs["x"].dtype == np.float32 and flat.inputs["x"].shape == (2, 3)
    assert np.array_equal(flat.inputs["x"], nested.inputs["x"])


@pytest.mark.parametrize(
    ("datatype", "data", "dtype"),
    [
        ("INT64", [1, 2], np.int64),
        ("INT32", [1, 2], np.int32),
        ("BOOL", [True, False], np.bool_),
        ("FP16", [0.5, 1.5], np.float16),
        ("FP64", [0.25, 1.0], np.float64),
        ("UINT8", [0, 255], np.uint8),
    ],
)
def test_datatypes(datatype: str, data: list, dtype) -> None:
    req = decode_request(body([{"name": "x", "shape": [2], "datatype": datatype, "data": data}]))
    assert req.inputs["x"].dtype == dtype
    assert req.inputs["x"].tolist() == data


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{nope", "request body is not valid JSON"),
        (b"[1, 2]", "request body at $: expected object, got array"),
        (b'{"inputs": {"x": 1}}', "request body at $.inputs: expected array | null, got object"),
        (b'{"inputs": [7]}', "request body at $.inputs[0]: expected object, got int"),
        (body([]), "expected 'inputs' to be a non-empty list"),
        (
            body([{"shape": [1], "datatype": "FP32", "data": [1]}]),
            "inputs[0]: expected a non-empty string 'name'",
        ),
        (
            body([{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]),
            "input 'x': expected 'shape' to be a list of integers >= 0",
        ),
        (
            body([{"name": "x", "shape": [1], "datatype": "FP8", "data": [1]}]),
            "input 'x': datatype 'FP8' is not supported",
        ),
        (
            body([{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]),
            "input 'x': shape [2, 2] needs 4 elements, 'data' has 3",
        ),
        (
            body([{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2, 3], [4]]}]),
            "input 'x': 'data' is a ragged nested list",
        ),
        (
            body([{"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]),
            "input 'x': 'data' must hold numbers for datatype FP32",
        ),
        (
            body([{"name": "x", "shape": [1], "datatype": "INT64", "data": [1.5]}]),
            "datatype INT64 takes integers, got fractions",
        ),
        (
            body([{"name": "x", "shape": [1], "datatype": "BOOL", "data": [3]}]),
            "datatype BOOL takes true/false",
        ),
        (
            body([{"name": "x", "shape": [1], "datatype": "FP32"}]),
            "input 'x': expected 'data' or parameters.binary_data_size",
        ),
        (
            body([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2),
            "input 'x' appears twice",
        ),
        (
            body([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], id=7),
            "request 'id': expected a string",
        ),
    ],
)
def test_malformed_requests_are_400_with_a_precise_message(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_request(payload)
    assert message in str(info.value)
    assert info.value.status_code == 400


def test_binary_inputs_follow_the_json_header() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, 8], dtype=np.int64)
    header = body(
        [
            {
                "name": "a",
                "shape": [2, 3],
                "datatype": "FP32",
                "parameters": {"binary_data_size": a.nbytes},
            },
            {
                "name": "b",
                "shape": [2],
                "datatype": "INT64",
                "parameters": {"binary_data_size": b.nbytes},
            },
        ]
    )
    req = decode_request(header + a.tobytes() + b.tobytes(), str(len(header)))
    assert np.array_equal(req.inputs["a"], a) and np.array_equal(req.inputs["b"], b)


def test_binary_bytes_elements_are_length_prefixed() -> None:
    blob = b"".join(struct.pack("<I", len(s)) + s for s in (b"hi", b"there"))
    header = body(
        [
            {
                "name": "s",
                "shape": [2],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(blob)},
            }
        ]
    )
    req = decode_request(header + blob, str(len(header)))
    assert req.inputs["s"].tolist() == [b"hi", b"there"]


@pytest.mark.parametrize(
    ("size", "extra", "message"),
    [
        (10, b"", "does not fit the 8 binary bytes"),
        (4, b"", "shape [2] of FP32 needs 8 bytes, binary_data_size is 4"),
        (8, b"xx", "2 binary bytes that no input claims"),
    ],
)
def test_binary_size_mismatches(size: int, extra: bytes, message: str) -> None:
    header = body(
        [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": size}}]
    )
    payload = header + np.zeros(2, np.float32).tobytes() + extra
    if size == 4:
        payload = header + np.zeros(1, np.float32).tobytes()
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_request(payload, str(len(header)))


@pytest.mark.parametrize("value", ["abc", "0", "999999"])
def test_bad_header_length(value: str) -> None:
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        decode_request(body([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]), value)


def _req(**inputs: tuple[np.ndarray, str]) -> InferRequest:
    return InferRequest({k: v[0] for k, v in inputs.items()}, {k: v[1] for k, v in inputs.items()})


def test_validation_names_input_model_expected_and_received_shape() -> None:
    with pytest.raises(InvalidInput) as info:
        validate_inputs(_req(pixels=(np.zeros((3, 64), np.float32), "FP32")), SPEC, "digits-cnn")
    assert (
        str(info.value)
        == "input 'pixels' of model 'digits-cnn': expected shape [-1, 1, 8, 8], got [3, 64]"
    )


def test_validation_datatype_and_names() -> None:
    with pytest.raises(InvalidInput, match="expected datatype FP32, got FP64"):
        validate_inputs(_req(pixels=(np.zeros((1, 1, 8, 8)), "FP64")), SPEC, "m")
    with pytest.raises(
        InvalidInput,
        match=r"expects inputs \['pixels'\]; missing \['pixels'\]; unknown \['image'\]",
    ):
        validate_inputs(_req(image=(np.zeros((1, 1, 8, 8), np.float32), "FP32")), SPEC, "m")


def test_validation_rejects_nan_and_infinity() -> None:
    x = np.zeros((2, 1, 8, 8), np.float32)
    x[1, 0, 3, 4] = np.inf
    with pytest.raises(InvalidInput, match="NaN or infinity at flat index 92"):
        validate_inputs(_req(pixels=(x, "FP32")), SPEC, "m")


def test_validation_batch_agreement_and_size() -> None:
    specs = [TensorSpec("noise", "FP32", (-1, 2)), TensorSpec("label", "INT64", (-1,))]
    ok = _req(noise=(np.zeros((3, 2), np.float32), "FP32"), label=(np.zeros(3, np.int64), "INT64"))
    assert validate_inputs(ok, specs, "gan") == 3
    bad = _req(noise=(np.zeros((3, 2), np.float32), "FP32"), label=(np.zeros(2, np.int64), "INT64"))
    with pytest.raises(InvalidInput, match="disagree on the batch size"):
        validate_inputs(bad, specs, "gan")
    with pytest.raises(InvalidInput, match="batch size is 0"):
        validate_inputs(_req(pixels=(np.zeros((0, 1, 8, 8), np.float32), "FP32")), SPEC, "m")


def test_encode_json_and_binary_outputs() -> None:
    req = InferRequest({}, {}, id="r-1")
    values = {"label": np.array([3, 4]), "probabilities": np.eye(2, dtype=np.float32)}
    wanted = [RequestedOutput("label", False), RequestedOutput("probabilities", True)]
    payload, headers = encode_response("m", "2", req, wanted, values)
    n = int(headers["inference-header-content-length"])
    doc = orjson.loads(payload[:n])
    assert doc["id"] == "r-1" and doc["model_name"] == "m" and doc["model_version"] == "2"
    assert doc["outputs"][0] == {"name": "label", "datatype": "INT64", "shape": [2], "data": [3, 4]}
    assert doc["outputs"][1]["parameters"] == {"binary_data_size": 16}
    assert np.array_equal(np.frombuffer(payload[n:], np.float32).reshape(2, 2), np.eye(2))
    json_only, headers = encode_response("m", "1", InferRequest({}, {}), [wanted[0]], values)
    assert headers == {"content-type": "application/json"} and b'"data":[3,4]' in json_only


def test_output_selection() -> None:
    req = decode_request(
        body(
            [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
            outputs=[{"name": "b", "parameters": {"binary_data": True}}],
        )
    )
    assert select_outputs(req, ["a", "b"], "m") == [RequestedOutput("b", True)]
    everything = decode_request(
        body(
            [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
            parameters={"binary_data_output": True},
        )
    )
    assert select_outputs(everything, ["a", "b"], "m") == [
        RequestedOutput("a", True),
        RequestedOutput("b", True),
    ]
    wrong = decode_request(
        body(
            [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], outputs=[{"name": "c"}]
        )
    )
    with pytest.raises(
        InvalidInput, match=r"model 'm' has outputs \['a', 'b'\]; requested unknown \['c'\]"
    ):
        select_outputs(wrong, ["a", "b"], "m")

"""The v2 gRPC codec: typed and raw tensors in, the same checks and messages as REST, answers
in the form the request used; error classes to status codes."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from service.core.errors import (
    ClientClosedRequest,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
)
from service.core.protocol import InferRequest, RequestedOutput, to_bytes
from service.core.repository import TensorSpec
from service.core.validation import Expected
from service.grpc.codec import CONTENTS, decode_infer, encode_infer, model_config
from service.grpc.server import address, status_of
from service.serving.dataplane import Inference

PIXELS = Expected.of("cnn", [TensorSpec("pixels", "FP32", (-1, 1, 8, 8))], max_samples=64)


def _raw(arrays: dict[str, np.ndarray], datatypes: dict[str, str] | None = None, **kw):
    request = pb.ModelInferRequest(model_name="cnn", **kw)
    for name, arr in arrays.items():
        dt = (datatypes or {}).get(name, "FP32")
        request.inputs.add(name=name, datatype=dt, shape=arr.shape)
        request.raw_input_contents.append(to_bytes(arr))
    return request


def _typed(name: str, datatype: str, shape: list[int], values, field: str | None = None):
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    getattr(tensor.contents, field or CONTENTS[datatype]).extend(values)
    return request


def test_raw_inputs_decode_to_the_same_array_and_ask_raw_answers() -> None:
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    request = _raw({"pixels": x}, id="r1")
    request.parameters["variant"].string_param = "int8"
    request.outputs.add(name="label")
    decoded = decode_infer(request, PIXELS)
    np.testing.assert_array_equal(decoded.inputs["pixels"], x)
    assert decoded.datatypes == {"pixels": "FP32"} and decoded.id == "r1"
    assert decoded.parameters == {"variant": "int8"}
    assert decoded.outputs == [RequestedOutput("label", True)] and decoded.binary_output
    assert decoded.checked_against is PIXELS.inputs


@pytest.mark.parametrize(
    ("datatype", "values", "dtype"),
    [
        ("FP32", [0.5, -1.25, 3.0, 4.0], np.float32),
        ("FP64", [0.1, 0.2, 0.3, 0.4], np.float64),
        ("INT8", [-128, 0, 5, 127], np.int8),
        ("INT16", [-300, 0, 5, 300], np.int16),
        ("INT32", [-(2**31), 0, 5, 2**31 - 1], np.int32),
        ("INT64", [-(2**40), 0, 5, 2**40], np.int64),
        ("UINT8", [0, 1, 200, 255], np.uint8),
        ("UINT16", [0, 1, 2, 65535], np.uint16),
        ("UINT32", [0, 1, 2, 2**32 - 1], np.uint32),
        ("UINT64", [0, 1, 2, 2**63], np.uint64),
        ("BOOL", [True, False, True, True], np.bool_),
    ],
)
def test_typed_contents_of_every_datatype(datatype, values, dtype) -> None:
    decoded = decode_infer(_typed("x", datatype, [2, 2], values))
    arr = decoded.inputs["x"]
    assert arr.dtype == dtype and arr.shape == (2, 2)
    np.testing.assert_array_equal(arr.ravel(), np.array(values, dtype=dtype))
    assert not decoded.binary_output


def test_bytes_typed_and_raw() -> None:
    texts = [b"hello", "h\u00e9llo".encode()]
    typed = decode_infer(_typed("text", "BYTES", [2], texts)).inputs["text"]
    assert typed.dtype == object and list(typed) == texts
    raw = _raw({"text": np.array(texts, dtype=object)}, {"text": "BYTES"})
    assert list(decode_infer(raw).inputs["text"]) == texts


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.ModelInferRequest(model_name="m"), "expected at least one tensor in 'inputs'"),
        (
            _typed("x", "FP32", [2, 3], [1.0] * 5),
            "input 'x': shape [2, 3] needs 6 elements, contents.fp32_contents has 5",
        ),
        (
            _typed("x", "FP32", [2], [1, 2], field="int_contents"),
            "input 'x': datatype FP32 takes contents.fp32_contents, got contents.int_contents",
        ),
        (
            _typed("x", "INT8", [2], [1, 300]),
            "input 'x': value 300 does not fit datatype INT8 (-128..127)",
        ),
        (
            _typed("x", "FP16", [1], [1.0], field="fp32_contents"),
            "input 'x': datatype FP16 has no typed contents field; send it in raw_input_contents",
        ),
        (
            _typed("x", "FP8", [1], [1.0], field="fp32_contents"),
            "input 'x': datatype 'FP8' is not supported",
        ),
        (_typed("x", "FP32", [0, 3], []), "input 'x': shape [0, 3] has no elements"),
        (_typed("", "FP32", [1], [1.0]), "inputs[0]: expected a non-empty string 'name'"),
    ],
)
def test_malformed_requests_are_400_with_the_rest_apis_words(request_, message) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode_infer(request_)


def test_raw_contents_must_match_inputs_and_byte_lengths() -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    short = _raw({"pixels": x})
    short.raw_input_contents[0] = short.raw_input_contents[0][:100]
    with pytest.raises(InvalidInput, match=r"shape \[1, 1, 8, 8\] of FP32 needs 256 bytes, "):
        decode_infer(short, PIXELS)
    with pytest.raises(InvalidInput, match=r"raw_input_contents\[0\] has 100"):
        decode_infer(short, PIXELS)
    extra = _raw({"pixels": x})
    extra.raw_input_contents.append(b"1234")
    with pytest.raises(InvalidInput, match="raw_input_contents has 2 entries for 1 inputs"):
        decode_infer(extra, PIXELS)
    both = _raw({"pixels": x})
    both.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    with pytest.raises(InvalidInput, match="has typed 'contents' and raw_input_contents"):
        decode_infer(both, PIXELS)


def test_headers_are_checked_against_the_model_before_the_data() -> None:
    wrong = _raw({"pixels": np.zeros((2, 8, 8), np.float32)})
    with pytest.raises(InvalidInput, match=r"expected shape \[-1, 1, 8, 8\], got \[2, 8, 8\]"):
        decode_infer(wrong, PIXELS)
    fp64 = _raw({"pixels": np.zeros((1, 1, 8, 8))}, {"pixels": "FP64"})
    with pytest.raises(InvalidInput, match="expected datatype FP32, got FP64"):
        decode_infer(fp64, PIXELS)
    with pytest.raises(PayloadTooLarge, match="65 samples in one request, more than the 64"):
        decode_infer(_raw({"pixels": np.zeros((65, 1, 8, 8), np.float32)}), PIXELS)
    unknown = _raw({"image": np.zeros((1, 1, 8, 8), np.float32)})
    with pytest.raises(InvalidInput, match="has no input 'image'; it expects inputs"):
        decode_infer(unknown, PIXELS)


class _Model:
    name, version, variant = "cnn", 3, "int8"


def _done(request: InferRequest, values: dict[str, np.ndarray]) -> Inference:
    wanted = [RequestedOutput(n, request.binary_output) for n in values]
    return Inference(_Model(), request, wanted, values)  # type: ignore[arg-type]


def test_answers_come_raw_for_raw_requests_and_typed_for_typed_ones() -> None:
    values = {"label": np.array([3, 1]), "probabilities": np.full((2, 10), 0.1, np.float32)}
    raw = _done(InferRequest({}, {}, id="a", binary_output=True), values)
    response = encode_infer(raw)
    assert (response.model_name, response.model_version, response.id) == ("cnn", "3", "a")
    assert response.parameters["variant"].string_param == "int8"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("label", "INT64", [2]),
        ("probabilities", "FP32", [2, 10]),
    ]
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == [3, 1]
    typed = encode_infer(_done(InferRequest({}, {}), values))
    assert not typed.raw_output_contents
    assert list(typed.outputs[0].contents.int64_contents) == [3, 1]
    assert np.allclose(typed.outputs[1].contents.fp32_contents, 0.1)
    # FP16 has no typed field: the whole answer goes raw
    half = encode_infer(_done(InferRequest({}, {}), {"y": np.ones(2, np.float16)}))
    assert np.frombuffer(half.raw_output_contents[0], "<f2").tolist() == [1.0, 1.0]


def test_model_config_leaves_the_batch_axis_out() -> None:
    inputs = [TensorSpec("pixels", "FP32", (-1, 1, 8, 8))]
    outputs = [TensorSpec("text", "BYTES", (-1,))]
    config = model_config("cnn", inputs, outputs, 64, 2.0)
    assert config.max_batch_size == 64 and list(config.input[0].dims) == [1, 8, 8]
    assert config.output[0].data_type == mc.TYPE_STRING and list(config.output[0].dims) == []
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    inputs = [TensorSpec("pixels", "FP32", (1, 8, 8))]
    assert model_config("cnn", inputs, outputs, 64, 2.0).max_batch_size == 0


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (PayloadTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Overloaded("x"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceeded("x"), grpc.StatusCode.UNAVAILABLE),
        (ModelNotReady("x"), grpc.StatusCode.UNAVAILABLE),
        (ModelUnavailable("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (ClientClosedRequest("x"), grpc.StatusCode.CANCELLED),
        (InferenceFailed("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_map_to_the_status_codes_triton_uses(error, code) -> None:
    assert status_of(error) is code


def test_ipv6_addresses_are_bracketed() -> None:
    assert address("::1", 8001) == "[::1]:8001" and address("127.0.0.1", 1) == "127.0.0.1:1"

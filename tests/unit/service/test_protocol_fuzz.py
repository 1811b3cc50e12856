"""The v2 decoder under arbitrary input: a request, or a 400/413 naming the problem, never
anything else (the fuzzing probe of 2026-12-02 found 500s; each class is a case here)."""

from __future__ import annotations

import json
import struct

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.core.errors import InvalidInput, PayloadTooLarge
from service.core.protocol import SMALL_BODY, Expected, decode_request, validate_inputs
from service.core.repository import TensorSpec

SPECS = [TensorSpec("pixels", "FP32", (-1, 1, 8, 8))]
EXPECTED = Expected.of("digits-cnn", SPECS, 2048)
DATATYPES = ["BOOL", "UINT8", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "FP8"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
shapes = st.lists(st.integers(min_value=-2, max_value=2**62), max_size=5) | json_values
tensors = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["pixels", "x", ""]) | json_values,
        "shape": shapes,
        "datatype": st.sampled_from(DATATYPES) | json_values,
        "data": json_values | st.lists(st.floats(allow_nan=False, width=32), max_size=70),
        "parameters": json_values
        | st.fixed_dictionaries({"binary_data_size": st.integers(-4, 300) | json_values}),
    },
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(tensors, max_size=3) | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries({}, optional={"name": json_values, "parameters": json_values}),
            max_size=2,
        )
        | json_values,
        "parameters": json_values,
        "id": json_values,
    },
)


def _decode(body: bytes, header_length: str | None = None, expected: Expected | None = None):
    try:
        request = decode_request(body, header_length, expected)
    except (InvalidInput, PayloadTooLarge) as exc:
        assert exc.status_code in (400, 413) and exc.message and len(exc.message) < 1000
        return None
    for name, arr in request.inputs.items():
        assert isinstance(arr, np.ndarray) and arr.shape == tuple(arr.shape), name
    return request


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, st.booleans())
def test_any_json_body_decodes_or_is_a_clear_4xx(doc, against_model) -> None:
    body = json.dumps(doc).encode()  # the stdlib writes integers of any size
    request = _decode(body, None, EXPECTED if against_model else None)
    if request is not None and against_model:
        try:
            validate_inputs(request, SPECS, "digits-cnn")
        except InvalidInput as exc:
            assert exc.status_code == 400


@settings(max_examples=300, deadline=None)
@given(requests, st.binary(max_size=300), st.integers(-5, 400) | st.text(max_size=5))
def test_any_binary_body_decodes_or_is_a_clear_4xx(doc, blob, header_length) -> None:
    header = json.dumps(doc).encode()
    n = header_length if isinstance(header_length, str) else str(len(header) + header_length)
    _decode(header + blob, n, EXPECTED)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_are_a_clear_4xx(body) -> None:
    _decode(body)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        # the probe's classes of 500, each now a 400 naming the field
        (
            {
                "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                "outputs": [{"name": "y", "parameters": "binary"}],
            },
            "output 'y' 'parameters': expected an object, got a string",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1],
                        "datatype": "FP32",
                        "data": [1],
                        "parameters": "binary_data_size",
                    }
                ]
            },
            "input 'x' 'parameters': expected an object, got a string",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": [], "data": [1]}]},
            "input 'x': datatype '[]' is not supported",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [0, 4611686018427387904], "datatype": "FP32", "data": []}
                ]
            },
            "has no elements",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [2, 4611686018427387904], "datatype": "FP32", "data": []}
                ]
            },
            "more than one tensor may carry",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]},
            "value 300 does not fit datatype INT8 (-128..127)",
        ),
        (
            {
                "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                "parameters": [1],
            },
            "request 'parameters': expected an object, got a list",
        ),
    ],
)
def test_the_probes_500s_are_400s_now(doc, message) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_request(orjson.dumps(doc))
    assert message in info.value.message


def test_a_number_no_double_holds_is_a_400() -> None:
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1e999]}]}'
    with pytest.raises(InvalidInput, match=r"at \$\.inputs\[0\]\.data\[0\]: number out of range"):
        decode_request(body)  # a small body: parsed in one pass
    padding = b" " * (SMALL_BODY + 1)  # a large one: its data is read after the header check
    with pytest.raises(InvalidInput, match="input 'x': 'data' cannot be read"):
        decode_request(body[:-1] + padding + b"}")


def test_binary_shapes_whose_byte_count_overflows_are_400() -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2**40, 2**40],
                    "datatype": "FP64",
                    "parameters": {"binary_data_size": 0},
                }
            ]
        }
    )
    with pytest.raises(InvalidInput, match="more than one tensor may carry"):
        decode_request(header, str(len(header)))


def test_the_header_is_checked_against_the_model_before_the_data_is_read() -> None:
    """Data that cannot fit the declared shape is refused from its raw text: 100,000 numbers
    for a [1, 1, 8, 8] input cost no Python objects."""
    data = b",".join([b"0.5"] * 100_000)
    body = (
        b'{"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [%s]}]}'
        % data
    )
    with pytest.raises(InvalidInput, match=r"needs 64 elements, 'data' has 100000"):
        decode_request(body, None, EXPECTED)
    wrong = orjson.dumps(
        {"inputs": [{"name": "pixels", "shape": [3, 64], "datatype": "FP32", "data": [0] * 192}]}
    )
    with pytest.raises(InvalidInput, match=r"expected shape \[-1, 1, 8, 8\], got \[3, 64\]"):
        decode_request(wrong, None, EXPECTED)


def test_more_samples_than_the_model_queues_is_413_before_any_data_is_read() -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [5000, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 5000 * 64 * 4},
                }
            ]
        }
    )
    with pytest.raises(PayloadTooLarge, match="5000 samples in one request, more than the 2048"):
        decode_request(header + bytes(5000 * 64 * 4), str(len(header)), EXPECTED)


def test_truncated_and_oversized_bytes_elements() -> None:
    blob = struct.pack("<I", 100) + b"short"
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    )
    with pytest.raises(InvalidInput, match="expected 1 BYTES elements"):
        decode_request(header + blob, str(len(header)))

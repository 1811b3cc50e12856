from __future__ import annotations

import numpy as np
import pytest

from service.core.datatypes import ORT_TO_V2, V2_TO_NUMPY, from_numpy, to_numpy


@pytest.mark.parametrize("name", [n for n in V2_TO_NUMPY if n != "BYTES"])
def test_round_trip(name: str) -> None:
    assert from_numpy(to_numpy(name)) == name


def test_strings_are_bytes() -> None:
    assert from_numpy(np.array(["a"]).dtype) == "BYTES"


def test_every_served_ort_type_decodes_to_numpy() -> None:
    assert ORT_TO_V2["tensor(float)"] == "FP32" and ORT_TO_V2["tensor(int64)"] == "INT64"
    assert set(ORT_TO_V2.values()) <= set(V2_TO_NUMPY)
    assert "tensor(bfloat16)" not in ORT_TO_V2  # no numpy dtype to decode a request into


def test_unknown_datatype_names_it() -> None:
    with pytest.raises(KeyError, match="'FP8'"):
        to_numpy("FP8")

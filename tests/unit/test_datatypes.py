from __future__ import annotations

import numpy as np
import pytest

from service.datatypes import V2_TO_NUMPY, from_numpy, from_ort_type, to_numpy


@pytest.mark.parametrize("name", [n for n in V2_TO_NUMPY if n != "BYTES"])
def test_round_trip(name: str) -> None:
    assert from_numpy(to_numpy(name)) == name


def test_strings_are_bytes() -> None:
    assert from_numpy(np.array(["a"]).dtype) == "BYTES"


def test_ort_types() -> None:
    assert from_ort_type("tensor(float)") == "FP32"
    assert from_ort_type("tensor(int64)") == "INT64"
    with pytest.raises(KeyError, match="seq"):
        from_ort_type("seq(tensor(float))")


def test_unknown_datatype_names_it() -> None:
    with pytest.raises(KeyError, match="'FP8'"):
        to_numpy("FP8")

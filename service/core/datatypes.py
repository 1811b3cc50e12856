"""The one table between Open Inference Protocol v2 datatypes, numpy and onnxruntime.

Both halves use it: the exporter writes v2 names into manifests, the server decodes
requests with them. Only numpy is imported here.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "V2_TO_NUMPY",
    "ORT_TO_V2",
    "from_numpy",
    "to_numpy",
]

#: v2 datatype name -> numpy dtype. BF16 has no numpy dtype and BYTES are objects.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

_NUMPY_TO_V2: dict[np.dtype, str] = {dtype: name for name, dtype in V2_TO_NUMPY.items()}

#: onnxruntime's type strings (``NodeArg.type``) -> v2 datatype name, for the types slimserve
#: serves (BF16 has no numpy dtype to decode a request into).
ORT_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def to_numpy(datatype: str) -> np.dtype:
    """The numpy dtype of a v2 datatype name; ``KeyError`` names the unknown type."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise KeyError(
            f"datatype {datatype!r} has no numpy equivalent; expected one of {sorted(V2_TO_NUMPY)}"
        ) from None


def from_numpy(dtype: np.dtype | type) -> str:
    """The v2 datatype name of a numpy dtype (strings map to BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return _NUMPY_TO_V2[dtype]
    except KeyError:
        raise KeyError(f"numpy dtype {dtype} has no v2 datatype") from None

"""The v2 gRPC wire codec: protobuf messages in, the dataplane's request out, and back.

``ModelInferRequest`` -> :class:`service.core.protocol.InferRequest`, each tensor's header
checked against the model (:func:`service.core.protocol.expect_tensor`) before its data is
converted, with the same rules and messages as the REST decoder; an
:class:`service.serving.dataplane.Inference` -> ``ModelInferResponse``. Tensors come either as
typed ``contents`` or as ``raw_input_contents`` (one entry per input, in order: what
``tritonclient.grpc`` sends), and the answer comes the same way: raw outputs for a raw
request, typed contents for a typed one. The messages are those of Triton's
``grpc_service.proto`` (a superset of KServe's ``grpc_predict_v2.proto``) as the pinned
``tritonclient[grpc]`` wheel ships them compiled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from ..core.datatypes import V2_TO_NUMPY, from_numpy
from ..core.errors import InvalidInput
from ..core.protocol import (
    InferRequest,
    RequestedOutput,
    check_integers,
    expect_tensor,
    from_bytes,
    tensor_header,
    to_bytes,
)
from ..core.repository import TensorSpec
from ..core.validation import Expected
from ..serving.dataplane import PLATFORM, Inference

__all__ = [
    "decode_infer",
    "encode_infer",
    "parameters",
    "model_config",
    "CONTENTS",
]

#: the typed ``contents`` field of each datatype (FP16 has none: it travels raw only)
CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
#: what the protobuf field's values are read as before the range check
_WIDE = {
    "int_contents": np.int64,
    "uint_contents": np.uint64,
    "int64_contents": np.int64,
    "uint64_contents": np.uint64,
}


def parameters(params: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as a plain dict; a parameter with no value
    set is a 400."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidInput(f"{what} parameter {key[:64]!r}: no value set")
        out[key] = getattr(param, kind)
    return out


def decode_infer(message: Any, expected: Expected | None = None) -> InferRequest:
    """A ``ModelInferRequest`` as the dataplane's request; 400 for anything malformed, 413 for
    more samples than the model can queue (``expected``: the model's inputs)."""
    if not message.inputs:
        raise InvalidInput("ModelInferRequest: expected at least one tensor in 'inputs'")
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(
            f"ModelInferRequest: raw_input_contents has {len(raw)} entries for "
            f"{len(message.inputs)} inputs; expected one per input, in the inputs' order "
            "(or none, with each input's typed 'contents')"
        )
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, tensor in enumerate(message.inputs):
        name, shape, datatype = tensor_header(tensor.name, list(tensor.shape), tensor.datatype, i)
        if name in inputs:
            raise InvalidInput(f"input {name[:64]!r} appears twice")
        if expected is not None:
            expect_tensor(expected, name, shape, datatype)
        typed = tensor.HasField("contents") and tensor.contents.ByteSize() > 0
        if raw:
            if typed:
                raise InvalidInput(
                    f"input {name[:64]!r}: has typed 'contents' and raw_input_contents[{i}]; "
                    "send one of them"
                )
            source = f"raw_input_contents[{i}] has"
            inputs[name] = from_bytes(raw[i], name, shape, datatype, source=source)
        else:
            inputs[name] = _typed(tensor.contents, name, shape, datatype)
        datatypes[name] = datatype
    outputs = None
    if message.outputs:
        outputs = []
        for j, out in enumerate(message.outputs):
            if not out.name:
                raise InvalidInput(f"outputs[{j}]: expected a non-empty 'name'")
            outputs.append(RequestedOutput(out.name, bool(raw)))
    return InferRequest(
        inputs=inputs,
        datatypes=datatypes,
        id=message.id or None,
        parameters=parameters(message.parameters, "request"),
        outputs=outputs,
        binary_output=bool(raw),
        checked_against=expected.inputs if expected is not None else None,
    )


def _typed(contents: Any, name: str, shape: tuple[int, ...], datatype: str) -> np.ndarray:
    """A tensor from its typed ``contents`` field (the one its datatype names)."""
    label = f"input {name[:64]!r}"
    field = CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(
            f"{label}: datatype {datatype} has no typed contents field; send it in "
            "raw_input_contents"
        )
    filled = [f.name for f, _ in contents.ListFields()]
    if filled and filled != [field]:
        raise InvalidInput(
            f"{label}: datatype {datatype} takes contents.{field}, got contents."
            f"{', contents.'.join(filled)}"
        )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"{label}: shape {list(shape)} needs {count} elements, contents.{field} has "
            f"{len(values)}"
        )
    if datatype == "BYTES":
        return np.array(list(values), dtype=object).reshape(shape)
    target = V2_TO_NUMPY[datatype]
    wide = _WIDE.get(field)
    if wide is None:  # bool, fp32, fp64: the field's own type
        return np.array(values, dtype=target).reshape(shape)
    arr = np.array(values, dtype=wide)
    if np.dtype(wide).itemsize > target.itemsize:  # INT8/16 in int32, UINT8/16 in uint32
        check_integers(arr, target, label, datatype)
    return arr.astype(target, copy=False).reshape(shape)


def encode_infer(done: Inference) -> Any:
    """The ``ModelInferResponse``: the outputs asked for, raw for a raw request (and whenever
    an output has no typed field, FP16), typed contents otherwise; the variant that answered
    in ``parameters`` (a canary may have)."""
    model = done.model
    request = done.request
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=str(model.version), id=request.id or ""
    )
    response.parameters["variant"].string_param = model.variant
    arrays = [(out.name, done.values[out.name]) for out in done.outputs]
    raw = any(out.binary for out in done.outputs) or any(
        from_numpy(a.dtype) not in CONTENTS for _, a in arrays
    )
    for name, arr in arrays:
        datatype = from_numpy(arr.dtype)
        tensor = response.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        if raw:
            response.raw_output_contents.append(to_bytes(arr))
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.extend(
                x if isinstance(x, bytes) else str(x).encode() for x in arr.ravel()
            )
        else:
            getattr(tensor.contents, CONTENTS[datatype]).extend(arr.ravel().tolist())
    return response


#: v2 datatype -> Triton's model configuration data type
_CONFIG_TYPES = {
    name: getattr(mc, f"TYPE_{name if name != 'BYTES' else 'STRING'}") for name in V2_TO_NUMPY
}


def model_config(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    delay_ms: float,
) -> Any:
    """Triton's ``ModelConfig`` of a model, from its tensors and its batcher's settings: what
    ``perf_analyzer`` and ``tritonclient``'s ``get_model_config`` read. Inputs with a dynamic
    first axis are batched, so ``dims`` leave it out, as Triton's configs do."""
    batched = all(t.shape[:1] == (-1,) for t in (*inputs, *outputs))

    def tensors(kind: type, specs: Sequence[TensorSpec]) -> list[Any]:
        return [
            kind(
                name=t.name,
                data_type=_CONFIG_TYPES[t.datatype],
                dims=t.shape[1:] if batched else t.shape,
            )
            for t in specs
        ]

    config = mc.ModelConfig(
        name=name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=max_batch_size if batched else 0,
        input=tensors(mc.ModelInput, inputs),
        output=tensors(mc.ModelOutput, outputs),
    )
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = int(delay_ms * 1000)
    return config

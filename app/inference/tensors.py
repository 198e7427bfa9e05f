"""Open Inference Protocol tensors <-> numpy, checked against the model's metadata."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from app.errors import APIError
from app.inference.backends.base import TensorSpec

NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": object,
}


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for item in data:
            out.extend(_flatten(item))
        return out
    return [data]


def _bad(param: str, message: str, code: str) -> APIError:
    return APIError(400, message, code=code, param=param)


def decode_inputs(inputs: list[dict[str, Any]], specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    by_name = {spec.name: spec for spec in specs}
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(inputs):
        where = f"inputs.{index}"
        spec = by_name.get(tensor["name"])
        if spec is None:
            raise _bad(
                f"{where}.name",
                f"Unknown input '{tensor['name']}'; expected {', '.join(by_name)}.",
                "unknown_input",
            )
        if tensor["datatype"] != spec.datatype:
            raise _bad(
                f"{where}.datatype",
                f"Input '{spec.name}' must be {spec.datatype}, got {tensor['datatype']}.",
                "datatype_mismatch",
            )
        shape = tensor["shape"]
        if len(shape) != len(spec.shape) or any(
            w not in (-1, g) for w, g in zip(spec.shape, shape, strict=True)
        ):
            raise _bad(
                f"{where}.shape",
                f"Input '{spec.name}' must have shape {list(spec.shape)} (-1 is any), got {shape}.",
                "shape_mismatch",
            )
        flat = _flatten(tensor["data"])
        if len(flat) != math.prod(shape):
            raise _bad(
                f"{where}.data",
                f"Shape {shape} needs {math.prod(shape)} values, got {len(flat)}.",
                "shape_mismatch",
            )
        arrays[spec.name] = _to_array(flat, shape, spec.datatype, f"{where}.data")
    missing = [name for name in by_name if name not in arrays]
    if missing:
        raise _bad("inputs", f"Missing input(s): {', '.join(missing)}.", "missing_input")
    return arrays


def _to_array(flat: list[Any], shape: list[int], datatype: str, param: str) -> np.ndarray:
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise _bad(param, "BYTES data must be strings.", "datatype_mismatch")
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise _bad(param, "BOOL data must be true or false.", "datatype_mismatch")
    elif not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
        raise _bad(param, f"{datatype} data must be numbers.", "datatype_mismatch")
    elif datatype.startswith(("INT", "UINT")) and not all(float(v).is_integer() for v in flat):
        raise _bad(param, f"{datatype} data must be integers.", "datatype_mismatch")
    try:
        array = np.array(flat, dtype=NUMPY_TYPES[datatype])
    except OverflowError:
        raise _bad(param, f"A value is out of range for {datatype}.", "datatype_mismatch") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise _bad(param, "Values must be finite.", "invalid_value")
    return array.reshape(shape)


def encode_outputs(
    outputs: dict[str, np.ndarray], specs: list[TensorSpec], names: list[str]
) -> list[dict[str, Any]]:
    datatypes = {spec.name: spec.datatype for spec in specs}
    encoded = []
    for name in names:
        array = np.asarray(outputs[name])
        data = [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()]
        encoded.append(
            {"name": name, "shape": list(array.shape), "datatype": datatypes.get(name, "BYTES"), "data": data}
        )
    return encoded

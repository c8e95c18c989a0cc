"""Canonical tensors <-> TF Serving's protobuf values (TensorProto, tf.Example). Pure functions.

Used by the warm-up file export and import; TF Serving's gRPC codec will share them.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

from ..protogen.tensorflow.core.example import example_pb2, feature_pb2
from ..protogen.tensorflow.core.framework import tensor_pb2, types_pb2
from .request import Tensor, element_count, pack_bytes_elements, unpack_bytes_elements
from .tfserving_rest import canonical_json

# KServe datatype -> TF DataType.
TF_DTYPES: dict[str, types_pb2.DataType] = {
    "BOOL": types_pb2.DT_BOOL, "UINT8": types_pb2.DT_UINT8, "UINT16": types_pb2.DT_UINT16,
    "UINT32": types_pb2.DT_UINT32, "UINT64": types_pb2.DT_UINT64, "INT8": types_pb2.DT_INT8,
    "INT16": types_pb2.DT_INT16, "INT32": types_pb2.DT_INT32, "INT64": types_pb2.DT_INT64,
    "FP16": types_pb2.DT_HALF, "BF16": types_pb2.DT_BFLOAT16, "FP32": types_pb2.DT_FLOAT,
    "FP64": types_pb2.DT_DOUBLE, "BYTES": types_pb2.DT_STRING,
}
KSERVE_DTYPES: dict[int, str] = {v: k for k, v in TF_DTYPES.items()}
# The numpy dtype of each numeric datatype (BF16 travels as its raw 16 bits).
NUMPY: dict[str, str] = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
    "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "BF16": "<u2", "FP32": "<f4", "FP64": "<f8",
}
# Where TensorProto keeps values when tensor_content is empty.
_VALUE_FIELD = {
    "BOOL": "bool_val", "UINT8": "int_val", "UINT16": "int_val", "INT8": "int_val", "INT16": "int_val",
    "INT32": "int_val", "INT64": "int64_val", "UINT32": "uint32_val", "UINT64": "uint64_val",
    "FP16": "half_val", "BF16": "half_val", "FP32": "float_val", "FP64": "double_val",
}


def dtype_name(tf_dtype: str) -> str | None:
    """``"DT_FLOAT"`` (TF Serving metadata JSON) -> ``"FP32"``; None for types with no KServe datatype."""
    try:
        return KSERVE_DTYPES.get(types_pb2.DataType.Value(tf_dtype))
    except ValueError:
        return None


def cast(t: Tensor, datatype: str) -> Tensor:
    """``t`` as ``datatype`` (numeric to numeric); ValueError when it cannot be."""
    if t.datatype == datatype:
        return t
    if "BYTES" in (t.datatype, datatype) or "BF16" in (t.datatype, datatype):
        raise ValueError(f"input {t.name!r}: cannot convert {t.datatype} to {datatype}")
    values = np.frombuffer(t.data, dtype=NUMPY[t.datatype])
    return Tensor(t.name, datatype, t.shape, values.astype(NUMPY[datatype]).tobytes())


def to_tensor_proto(t: Tensor) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=TF_DTYPES[t.datatype])
    proto.tensor_shape.dim.extend(proto.tensor_shape.Dim(size=d) for d in t.shape)
    if t.datatype == "BYTES":
        proto.string_val.extend(unpack_bytes_elements(t.data))
    else:
        proto.tensor_content = t.data
    return proto


def from_tensor_proto(name: str, proto: tensor_pb2.TensorProto) -> Tensor:
    """ValueError naming the input on a type with no KServe datatype, or values that do not fit the shape."""
    datatype = KSERVE_DTYPES.get(proto.dtype)
    if datatype is None:
        raise ValueError(f"input {name!r}: TF type {proto.dtype} has no KServe datatype")
    if proto.tensor_shape.unknown_rank:
        raise ValueError(f"input {name!r}: unknown rank")
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise ValueError(f"input {name!r}: a negative dimension in {list(shape)}")
    count = element_count(shape)
    if datatype == "BYTES":
        if proto.tensor_content:
            # TensorFlow reads a string tensor's tensor_content (its own string-list encoding) before string_val.
            raise ValueError(f"input {name!r}: a string tensor in tensor_content")
        return Tensor(name, datatype, shape, pack_bytes_elements(_filled(list(proto.string_val), count, name)))
    dtype = np.dtype(NUMPY[datatype])
    if proto.tensor_content:
        if len(proto.tensor_content) != count * dtype.itemsize:
            raise ValueError(f"input {name!r}: tensor_content holds {len(proto.tensor_content)} bytes, "
                             f"shape {list(shape)} needs {count * dtype.itemsize}")
        return Tensor(name, datatype, shape, bytes(proto.tensor_content))
    values = _filled(list(getattr(proto, _VALUE_FIELD[datatype])), count, name)
    if datatype in ("FP16", "BF16"):
        if not all(0 <= v <= 0xFFFF for v in values):
            # half_val is an int32 field that TensorFlow copies into 16 bits.
            raise ValueError(f"input {name!r}: half_val values beyond 16 bits")
        return Tensor(name, datatype, shape, np.asarray(values, dtype="<u2").tobytes())
    return Tensor(name, datatype, shape, np.asarray(values).astype(dtype).tobytes())


def _filled(values: list[Any], count: int, name: str) -> list[Any]:
    # TensorProto's rule: fewer values than the shape needs are padded with the last one.
    if len(values) > count or (not values and count):
        raise ValueError(f"input {name!r}: {len(values)} value(s) for {count} element(s)")
    return values + values[-1:] * (count - len(values))


def example_to_json(example: example_pb2.Example) -> dict[str, Any]:
    """A tf.Example in TF Serving's JSON form: lists of numbers or strings, ``{"b64": ...}`` for binary."""
    out: dict[str, Any] = {}
    for name in sorted(example.features.feature):
        feature = example.features.feature[name]
        kind = feature.WhichOneof("kind")
        if kind == "int64_list":
            out[name] = list(feature.int64_list.value)
        elif kind == "float_list":
            out[name] = [float(v) for v in feature.float_list.value]
        elif kind == "bytes_list":
            out[name] = [_text_or_b64(v) for v in feature.bytes_list.value]
        else:
            out[name] = []
    return out


def _text_or_b64(value: bytes) -> Any:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(value).decode()}


def example_from_json(doc: dict[str, Any]) -> example_pb2.Example:
    """Inverse of :func:`example_to_json` for the JSON the TF Serving REST codec accepted."""
    example = example_pb2.Example()
    for name, value in doc.items():
        values = value if isinstance(value, list) else [value]
        feature: feature_pb2.Feature = example.features.feature[name]
        if any(isinstance(v, float) for v in values):
            feature.float_list.value.extend(float(v) for v in values)
        elif values and all(isinstance(v, bool | int) for v in values):
            feature.int64_list.value.extend(int(v) for v in values)
        elif values:
            feature.bytes_list.value.extend(
                base64.b64decode(v["b64"]) if isinstance(v, dict) else str(v).encode() for v in values)
    return example


def example_text(example: example_pb2.Example) -> bytes:
    """The TF Serving REST codec's canonical text of an example (sorted-key JSON)."""
    doc = example_to_json(example)
    finite = all(not isinstance(v, float) or math.isfinite(v) for vs in doc.values() for v in vs)
    return canonical_json(doc, not finite)


def examples_tensor(examples: list[example_pb2.Example]) -> Tensor:
    """The REST codec's canonical ``examples`` tensor: one text per example."""
    return Tensor("examples", "BYTES", (len(examples),), pack_bytes_elements([example_text(e) for e in examples]))

"""KServe v2 gRPC codec (``inference.GRPCInferenceService/ModelInfer``). Pure functions.

Between serialized ``ModelInferRequest`` / ``ModelInferResponse`` messages (the classes tritonclient
ships, generated from Triton's ``grpc_service.proto``) and the canonical types of :mod:`request`.

- Tensor data comes from ``raw_input_contents`` (one entry per input, Triton's rule) or from the typed
  ``contents`` fields; either way it becomes the canonical raw little-endian bytes, BYTES elements
  length-prefixed, so a gRPC call and an HTTP call of the same meaning are equal (and share a cache key).
- ``InferParameter`` oneofs become the JSON values the HTTP codec keeps: bool, int (int64 and uint64),
  str, float. A non-finite double has no JSON form, so it is not modelled.
- Anything else is not modelled (:class:`DecodeError`; the call is then forwarded untouched): input
  parameters (shared memory among them), shared-memory outputs, FP16/BF16 without raw contents,
  values that do not fit the shape or the datatype, unknown fields.
- Answers are encoded as Triton writes them: every output in ``raw_output_contents``, the caller's id.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from tritonclient.grpc import service_pb2

from ..errors import DecodeError
from . import ambiguity, safety
from .request import (
    DATATYPE_SIZES,
    InferenceRequest,
    InferenceResponse,
    Params,
    Protocol,
    RequestedOutput,
    Tensor,
    element_count,
    freeze_params,
    pack_bytes_elements,
    thaw_params,
    unpack_bytes_elements,
)

SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE}/ModelInfer"

# The typed contents field of each datatype, and the numpy type its values narrow to.
_CONTENTS: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "?"),
    "INT8": ("int_contents", "<i1"), "INT16": ("int_contents", "<i2"), "INT32": ("int_contents", "<i4"),
    "INT64": ("int64_contents", "<i8"),
    "UINT8": ("uint_contents", "<u1"), "UINT16": ("uint_contents", "<u2"), "UINT32": ("uint_contents", "<u4"),
    "UINT64": ("uint64_contents", "<u8"),
    "FP32": ("fp32_contents", "<f4"), "FP64": ("fp64_contents", "<f8"),
    "BYTES": ("bytes_contents", ""),
}
_INT64 = (-(2**63), 2**63 - 1)
# Options only the HTTP front takes: over gRPC they would reach the model as its own parameters.
_HTTP_ONLY_OPTIONS = frozenset({"binary_data_output"})
_UINT64_MAX = 2**64 - 1


# ----------------------------------------------------------------------------------------------
# requests


def decode_request(message: bytes) -> InferenceRequest:
    """A serialized ModelInferRequest in canonical form; DecodeError naming the field when it cannot be."""
    msg = _parse(service_pb2.ModelInferRequest, message, "ModelInferRequest", unknown_fields=False)
    raw = msg.raw_input_contents
    for i, t in enumerate(msg.inputs):  # before anything else: even a call not modelled must not crash the server
        safety.check_counted(t.shape, t.datatype, _data_size(t, raw[i] if i < len(raw) else None),
                             f"inputs[{i}].shape")
    if len(UnknownFieldSet(msg)):
        raise DecodeError("message: fields unknown to the sidecar's ModelInferRequest")
    if raw and len(raw) != len(msg.inputs):
        raise DecodeError(f"raw_input_contents: {len(raw)} entries for {len(msg.inputs)} inputs")
    inputs = tuple(_decode_input(t, f"inputs[{i}]", raw[i] if raw else None) for i, t in enumerate(msg.inputs))
    outputs = tuple(_decode_requested_output(o, f"outputs[{i}]") for i, o in enumerate(msg.outputs))
    for text, field in ((msg.model_name, "model_name"), (msg.model_version, "model_version"), (msg.id, "id")):
        ambiguity.check_text(text, field)
    parameters, options = _request_params(msg.parameters)
    return InferenceRequest(Protocol.KSERVE_GRPC, msg.model_name, msg.model_version, "infer", inputs, outputs,
                            parameters, options, msg.id)


def model_of(message: bytes) -> str:
    """Just the model a ModelInferRequest names ("" when the message does not parse)."""
    return peek(message)[0]


def peek(message: bytes) -> tuple[str, str]:
    """(model, request id) of a ModelInferRequest; ("", "") when the message does not parse."""
    try:
        msg = service_pb2.ModelInferRequest.FromString(message)
    except ProtobufDecodeError:
        return "", ""
    return str(msg.model_name), str(msg.id)


def encode_request(req: InferenceRequest) -> bytes:
    """As tritonclient sends it: every input in raw_input_contents. ValueError for unencodable values."""
    msg = service_pb2.ModelInferRequest(model_name=req.model, model_version=req.version, id=req.id)
    encode_params(msg.parameters, req.parameters)
    encode_params(msg.parameters, tuple(p for p in req.options if p[0] not in _HTTP_ONLY_OPTIONS))
    for t in req.inputs:
        _check_size(t)
        msg.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        msg.raw_input_contents.append(t.data)
    for o in req.outputs:
        out = msg.outputs.add(name=o.name)
        encode_params(out.parameters, o.parameters)
    return bytes(msg.SerializeToString())


def _decode_input(t: Any, field: str, raw: bytes | None) -> Tensor:
    ambiguity.check_text(t.name, f"{field}.name")
    if t.parameters:
        # Shared-memory inputs (data not in the message) and parameters the sidecar does not know.
        raise DecodeError(f"{field}.parameters.{sorted(t.parameters)[0]}: not modelled by the sidecar")
    shape = _shape(t.shape, f"{field}.shape")
    if t.datatype not in DATATYPE_SIZES:
        raise DecodeError(f"{field}.datatype: expected one of {', '.join(DATATYPE_SIZES)}, got {t.datatype!r}")
    if raw is not None:
        if t.HasField("contents"):
            raise DecodeError(f"{field}.contents: set together with raw_input_contents")
        return Tensor(t.name, t.datatype, shape, _check_raw(raw, t.datatype, element_count(shape), field))
    return Tensor(t.name, t.datatype, shape, _from_contents(t.contents, t.datatype, element_count(shape),
                                                             f"{field}.contents"))


def _data_size(t: Any, raw: bytes | None) -> int:
    """What Triton compares the shape with: raw bytes, or typed contents (BYTES: elements, else bytes)."""
    if raw is not None:
        return len(raw)
    wanted = _CONTENTS.get(t.datatype)
    n = len(getattr(t.contents, wanted[0])) if wanted is not None else 0
    return n if t.datatype == "BYTES" else n * (DATATYPE_SIZES.get(t.datatype) or 1)


def _decode_requested_output(o: Any, field: str) -> RequestedOutput:
    ambiguity.check_text(o.name, f"{field}.name")
    if any(k.startswith("shared_memory") for k in o.parameters):
        raise DecodeError(f"{field}.parameters: shared-memory outputs are not modelled by the sidecar")
    return RequestedOutput(o.name, None, decode_params(o.parameters, f"{field}.parameters"))


def _request_params(params: Any) -> tuple[Params, Params]:
    """(what the model sees, what the server consumes) of a request's parameters, each checked as Triton's
    gRPC front checks it; DecodeError for any value the server refuses."""
    seen: dict[str, Any] = {}
    consumed: dict[str, Any] = {}
    for key, p in params.items():
        ambiguity.check_text(key, "parameters")
        kind = p.WhichOneof("parameter_choice")
        value: Any = getattr(p, kind) if kind is not None else None
        check = _SERVER_PARAMS.get(key)
        if check is not None:
            if not check(kind, value):
                raise DecodeError(f"parameters.{key}: a value the model server refuses")
            consumed[key] = value
        elif kind in ("bool_param", "int64_param") or (kind == "double_param" and math.isfinite(value)):
            seen[key] = value
        elif kind == "string_param":
            ambiguity.check_text(value, f"parameters.{key}")
            seen[key] = value
        else:
            # uint64 (the server refuses it for a model's parameters), a non-finite double (no JSON form), unset.
            raise DecodeError(f"parameters.{key}: a {kind} value is not modelled")
    return freeze_params(seen), freeze_params(consumed)


def _unsigned(kind: str | None, value: Any) -> bool:
    return kind == "uint64_param" or (kind == "int64_param" and value >= 0)


# Request parameters Triton's gRPC front takes for itself, with its checks. (``binary_data_output`` is not one
# of them over gRPC: it reaches the model, but would not over HTTP, so such a call is not modelled.)
_SERVER_PARAMS: dict[str, Callable[[str | None, Any], bool]] = {
    "priority": _unsigned,
    "timeout": lambda kind, value: kind == "int64_param" and value >= 0,
    "sequence_id": lambda kind, value: kind == "int64_param" or (kind == "string_param" and "\0" not in value),
    "sequence_start": lambda kind, _: kind == "bool_param",
    "sequence_end": lambda kind, _: kind == "bool_param",
    "binary_data_output": lambda _kind, _value: False,
}


# ----------------------------------------------------------------------------------------------
# responses


def decode_response(message: bytes) -> InferenceResponse:
    """A serialized ModelInferResponse in canonical form; DecodeError when it cannot be modelled."""
    msg = _parse(service_pb2.ModelInferResponse, message, "ModelInferResponse")
    raw = msg.raw_output_contents
    if raw and len(raw) != len(msg.outputs):
        raise DecodeError(f"raw_output_contents: {len(raw)} entries for {len(msg.outputs)} outputs")
    outputs = []
    for i, t in enumerate(msg.outputs):
        field = f"outputs[{i}]"
        if t.parameters:
            raise DecodeError(f"{field}.parameters: not modelled by the sidecar")
        shape = _shape(t.shape, f"{field}.shape")
        if t.datatype not in DATATYPE_SIZES:
            raise DecodeError(f"{field}.datatype: unknown datatype {t.datatype!r}")
        count = element_count(shape)
        data = _check_raw(raw[i], t.datatype, count, field) if raw else _from_contents(
            t.contents, t.datatype, count, f"{field}.contents")
        outputs.append(Tensor(t.name, t.datatype, shape, data))
    return InferenceResponse(Protocol.KSERVE_GRPC, msg.model_name, msg.model_version, tuple(outputs),
                             decode_params(msg.parameters, "parameters"), msg.id)


def encode_response(request: InferenceRequest, response: InferenceResponse) -> bytes:
    """The answer for the caller of ``request``: its requested outputs (all when it named none), its own id,
    every output in raw_output_contents as Triton writes it. ValueError when a value cannot be encoded."""
    outputs = response.outputs
    if request.outputs:
        # In the answer's own order (the model's), as the server lists them, not in the order asked.
        asked = {o.name for o in request.outputs}
        outputs = tuple(t for t in outputs if t.name in asked)
    msg = service_pb2.ModelInferResponse(model_name=response.model or request.model,
                                         model_version=response.version, id=request.id)
    encode_params(msg.parameters, response.parameters)
    for t in outputs:
        _check_size(t)
        msg.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        msg.raw_output_contents.append(t.data)
    return bytes(msg.SerializeToString())


# ----------------------------------------------------------------------------------------------
# parameters


def decode_params(params: Any, field: str) -> Params:
    """A map<string, InferParameter> as the HTTP codec's canonical parameter values."""
    if not params:
        return ()
    values: dict[str, Any] = {}
    for key, p in params.items():
        kind = p.WhichOneof("parameter_choice")
        if kind is None:
            raise DecodeError(f"{field}.{key}: no value set")
        value = getattr(p, kind)
        if kind == "double_param" and not math.isfinite(value):
            raise DecodeError(f"{field}.{key}: a non-finite double is not modelled")
        values[key] = value
    return freeze_params(values)


def encode_params(target: Any, params: Params) -> None:
    """Canonical parameter values into a map<string, InferParameter>; ValueError for lists, objects, null."""
    for key, value in thaw_params(params).items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            if _INT64[0] <= value <= _INT64[1]:
                p.int64_param = value
            elif 0 <= value <= _UINT64_MAX:
                p.uint64_param = value
            else:
                raise ValueError(f"parameter {key!r}: {value} fits neither int64 nor uint64")
        elif isinstance(value, str):
            p.string_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            raise ValueError(f"parameter {key!r}: a {type(value).__name__} has no gRPC InferParameter form")


# ----------------------------------------------------------------------------------------------
# tensors


def _parse(cls: Any, message: bytes, what: str, unknown_fields: bool = True) -> Any:
    try:
        msg = cls.FromString(message)
    except ProtobufDecodeError:
        raise DecodeError(f"message: not a valid {what}") from None
    if unknown_fields and len(UnknownFieldSet(msg)):
        raise DecodeError(f"message: fields unknown to the sidecar's {what}")
    return msg


def _shape(dims: Any, field: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise DecodeError(f"{field}: expected non-negative dimensions, got {list(shape)}")
    return shape


def _check_raw(raw: bytes, datatype: str, count: int, field: str) -> bytes:
    size = DATATYPE_SIZES[datatype]
    if size is None:
        try:
            n = len(unpack_bytes_elements(raw))
        except ValueError as e:
            raise DecodeError(f"{field}: malformed BYTES data ({e})") from None
        if n != count:
            raise DecodeError(f"{field}: holds {n} BYTES elements but the shape needs {count}")
    elif len(raw) != count * size:
        raise DecodeError(f"{field}: {len(raw)} bytes, but the shape needs {count * size} for {datatype}")
    return bytes(raw)


def _from_contents(contents: Any, datatype: str, count: int, field: str) -> bytes:
    """Typed contents as raw bytes; only the field of the tensor's datatype may hold values."""
    wanted = _CONTENTS.get(datatype)
    present = [f.name for f, _ in contents.ListFields()]
    if wanted is None:
        raise DecodeError(f"{field}: {datatype} data travels only in raw_input_contents")
    if any(name != wanted[0] for name in present):
        raise DecodeError(f"{field}: {present[0]} set for a {datatype} tensor")
    values = getattr(contents, wanted[0])
    if len(values) != count:
        raise DecodeError(f"{field}.{wanted[0]}: holds {len(values)} elements but the shape needs {count}")
    if datatype == "BYTES":
        return pack_bytes_elements([bytes(v) for v in values])
    dtype = np.dtype(wanted[1])
    if dtype.kind in "iu" and dtype.itemsize < 4:
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise DecodeError(f"{field}.{wanted[0]}: values must lie in [{info.min}, {info.max}] for {datatype}")
        return bytes(wide.astype(dtype).tobytes())
    return bytes(np.array(values, dtype=dtype).tobytes())


def _check_size(t: Tensor) -> None:
    size = DATATYPE_SIZES.get(t.datatype, 0)
    if t.datatype not in DATATYPE_SIZES or (size is not None and len(t.data) != element_count(t.shape) * size):
        raise ValueError(f"tensor {t.name!r}: {len(t.data)} bytes do not fit {t.datatype} {list(t.shape)}")

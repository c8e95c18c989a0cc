"""TF Serving gRPC codec (``tensorflow.serving.PredictionService/Predict``). Pure functions.

Between serialized ``PredictRequest`` / ``PredictResponse`` messages (the project's own TF Serving
classes, ``sidecar/protogen``) and the canonical types of :mod:`request`, protocol TFSERVING_GRPC:

- ``model_spec``: name -> model; ``version`` -> version (decimal text); ``version_label`` -> parameter
  ``label`` and ``signature_name`` (when set) -> parameter ``signature_name``, as the REST codec names
  them, so a recorded gRPC call replays as the REST call of the same meaning.
- inputs: one canonical tensor per map entry, in name order (TensorProto <-> raw bytes in
  ``warmup/tftensor.py``); ``output_filter`` -> requested outputs.
- Not modelled (DecodeError, forwarded untouched): fields the project's subset leaves out
  (streamed predict options, client id, request options), types with no KServe datatype, values that
  do not fit their shape, and what TensorFlow's ``Tensor::FromProto`` reads otherwise than the codec:
  typed values more than the shape holds (TF drops the rest) or none for a non-empty shape (TF fills
  zeros); a string tensor in ``tensor_content`` (TF decodes that, not ``string_val``); ``half_val``
  beyond 16 bits (TF wraps it); a NaN in ``float_val`` (protobuf hands the float to Python as a double,
  which quiets a signalling NaN: two inputs TF tells apart would share one identity).

Names are not C strings here: TF Serving matches ``inputs`` keys against the signature as
``std::string``, so a NUL is part of the name, as it is in the canonical tensor. A key repeated on the
wire is the last entry to the C++ parser and to Python's alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from ..errors import DecodeError
from ..protogen.tensorflow_serving.apis import get_model_status_pb2, model_pb2, predict_pb2
from .request import InferenceRequest, InferenceResponse, Protocol, RequestedOutput, freeze_params, thaw_params
from .tfserving_rest import LABEL_PARAM, SIGNATURE_PARAM
from .tftensor import from_tensor_proto, to_tensor_proto

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
PREDICT = f"/{PREDICTION_SERVICE}/Predict"
DEFAULT_SIGNATURE = "serving_default"
_AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
_LOADING = get_model_status_pb2.ModelVersionStatus.LOADING


def decode_request(message: bytes) -> InferenceRequest:
    """A serialized PredictRequest in canonical form; DecodeError naming the field when it cannot be."""
    msg = _parse(predict_pb2.PredictRequest, message, "PredictRequest")
    spec = msg.model_spec
    params: dict[str, Any] = {}
    if spec.signature_name:
        params[SIGNATURE_PARAM] = spec.signature_name
    if spec.WhichOneof("version_choice") == "version_label":
        params[LABEL_PARAM] = spec.version_label
    version = str(spec.version.value) if spec.HasField("version") else ""
    try:
        inputs = tuple(from_tensor_proto(name, msg.inputs[name]) for name in sorted(msg.inputs))
    except ValueError as e:
        raise DecodeError(f"inputs: {e}") from None
    for t in inputs:
        if t.datatype == "FP32" and not msg.inputs[t.name].tensor_content and _has_nan(t.data):
            raise DecodeError(f"inputs.{t.name}: a NaN in float_val, whose bits Python's protobuf changes")
    outputs = tuple(RequestedOutput(name) for name in msg.output_filter)
    return InferenceRequest(Protocol.TFSERVING_GRPC, spec.name, version, "predict", inputs, outputs,
                            freeze_params(params))


def encode_request(req: InferenceRequest) -> bytes:
    """The PredictRequest of a canonical predict request (parameters other than signature and label, which
    only choose a wire form, are left out). ValueError when a tensor cannot be encoded."""
    msg = predict_pb2.PredictRequest(model_spec=_spec(req.model, req.version, thaw_params(req.parameters)))
    for t in req.inputs:
        msg.inputs[t.name].CopyFrom(_tensor(t))
    msg.output_filter.extend(o.name for o in req.outputs)
    return bytes(msg.SerializeToString())


def decode_response(message: bytes) -> InferenceResponse:
    msg = _parse(predict_pb2.PredictResponse, message, "PredictResponse")
    spec = msg.model_spec
    try:
        outputs = tuple(from_tensor_proto(name, msg.outputs[name]) for name in sorted(msg.outputs))
    except ValueError as e:
        raise DecodeError(f"outputs: {e}") from None
    version = str(spec.version.value) if spec.HasField("version") else ""
    return InferenceResponse(Protocol.TFSERVING_GRPC, spec.name, version, outputs)


def encode_response(request: InferenceRequest, response: InferenceResponse) -> bytes:
    """The answer for the caller of ``request``: the outputs it filtered for (all when none), the model spec
    TF Serving fills in (name, version when known, signature). ValueError when a tensor cannot be encoded."""
    outputs = response.outputs
    if request.outputs:
        wanted = {o.name for o in request.outputs}
        outputs = tuple(t for t in outputs if t.name in wanted)
    params = thaw_params(request.parameters)
    spec = _spec(request.model, response.version or request.version, {})
    spec.signature_name = str(params.get(SIGNATURE_PARAM) or DEFAULT_SIGNATURE)
    msg = predict_pb2.PredictResponse(model_spec=spec)
    for t in outputs:
        msg.outputs[t.name].CopyFrom(_tensor(t))
    return bytes(msg.SerializeToString())


def status_not_ready(message: bytes) -> bytes:
    """A GetModelStatusResponse saying not ready: AVAILABLE versions shown as LOADING (as the REST status
    is shown while the pod is not warm). Anything that does not parse comes back unchanged."""
    try:
        msg = get_model_status_pb2.GetModelStatusResponse.FromString(message)
    except ProtobufDecodeError:
        return message
    changed = False
    for status in msg.model_version_status:
        if status.state == _AVAILABLE:
            status.state = _LOADING
            changed = True
    return bytes(msg.SerializeToString()) if changed else message


def _spec(model: str, version: str, params: dict[str, Any]) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=model, signature_name=str(params.get(SIGNATURE_PARAM, "")))
    if version.isdigit():
        spec.version.value = int(version)
    elif params.get(LABEL_PARAM):
        spec.version_label = str(params[LABEL_PARAM])
    return spec


def _tensor(t: Any) -> Any:
    try:
        return to_tensor_proto(t)
    except KeyError:
        raise ValueError(f"tensor {t.name!r}: datatype {t.datatype} has no TF type") from None


def _has_nan(data: bytes) -> bool:
    return bool(np.isnan(np.frombuffer(data, "<f4")).any())


def _parse(cls: Any, message: bytes, what: str) -> Any:
    try:
        msg = cls.FromString(message)
    except ProtobufDecodeError:
        raise DecodeError(f"message: not a valid {what}") from None
    if len(UnknownFieldSet(msg)) or (hasattr(msg, "model_spec") and len(UnknownFieldSet(msg.model_spec))):
        raise DecodeError(f"message: fields the sidecar does not model in {what}")
    return msg

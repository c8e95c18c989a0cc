"""TF Serving's ``PredictionService`` and ``ModelService`` on the gRPC data port.

``Predict`` runs through the stage pipeline (codec ``protocols/tfserving_grpc.py``). ``GetModelStatus``
shows AVAILABLE versions as LOADING while the pod is not warm, as the REST status does. ``Classify``,
``Regress``, ``MultiInference``, ``GetModelMetadata`` and ``HandleReloadConfigRequest`` pass through raw.
"""

from __future__ import annotations

import dataclasses

import grpc

from ..errors import DecodeError
from ..metrics import Metrics
from ..planes import View
from ..protocols import tfserving_grpc
from ..protocols.request import InferenceRequest, Protocol
from ..protogen.tensorflow_serving.apis import model_service_pb2, predict_pb2, prediction_service_pb2
from .grpc_kserve import relay_handler
from .grpc_rpc import Context, Rpc, Rpcs

_LABELS = {"Predict": "predict", "Classify": "classify", "Regress": "regress", "GetModelMetadata": "metadata",
           "GetModelStatus": "metadata", "HandleReloadConfigRequest": "repository"}


class TfServingService:
    def __init__(self, rpcs: Rpcs, view: View, metrics: Metrics) -> None:
        self.rpcs = rpcs
        self.view = view
        self.metrics = metrics

    def handlers(self) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
        """{service name: {method: handler}} for both services."""
        out: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for module, name in ((prediction_service_pb2, "PredictionService"), (model_service_pb2, "ModelService")):
            service = f"tensorflow.serving.{name}"
            methods: dict[str, grpc.RpcMethodHandler] = {}
            for m in module.DESCRIPTOR.services_by_name[name].methods:
                label = _LABELS.get(m.name, "other")
                if m.name == "Predict":
                    methods[m.name] = self.rpcs.unary(label, self.predict, method=m.name)
                elif m.name == "GetModelStatus":
                    methods[m.name] = self.rpcs.unary(label, self.model_status, method=m.name)
                else:
                    methods[m.name] = relay_handler(self.rpcs, f"/{service}/{m.name}", label, m.client_streaming,
                                                    m.server_streaming)
            out[service] = methods
        return out

    async def predict(self, message: bytes, context: Context, rpc: Rpc) -> bytes:
        named = InferenceRequest(Protocol.TFSERVING_GRPC, _model_of(message), method="predict")
        request: InferenceRequest | None = None
        try:
            request = named = tfserving_grpc.decode_request(message)
        except DecodeError:
            self.metrics.unmodelled.labels(Protocol.TFSERVING_GRPC.value).inc()
        rpc.model = named.model
        call = self.rpcs.call(rpc, request, named, tfserving_grpc.PREDICT, message)
        answer, rpc.cache = await self.rpcs.infer(call, tfserving_grpc.encode_response)
        return await self.rpcs.answer(context, rpc, answer)

    async def model_status(self, message: bytes, context: Context, rpc: Rpc) -> bytes:
        answer = await self.rpcs.fetch(f"/{tfserving_grpc.MODEL_SERVICE}/GetModelStatus", message, rpc)
        if answer.code == "OK" and not self.view.snapshot.ready:
            answer = dataclasses.replace(answer, message=tfserving_grpc.status_not_ready(answer.message))
        return await self.rpcs.answer(context, rpc, answer)


def _model_of(message: bytes) -> str:
    try:
        return str(predict_pb2.PredictRequest.FromString(message).model_spec.name)
    except Exception:  # protobuf's DecodeError, or anything a malformed message raises: no model then
        return ""

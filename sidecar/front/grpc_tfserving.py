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
from ..protocols import tfserving_grpc
from ..protocols.request import InferenceRequest, Protocol
from ..protogen.tensorflow_serving.apis import model_service_pb2, predict_pb2, prediction_service_pb2
from .grpc_edge import Context, Edge, Rpc
from .grpc_kserve import relay_handler

_LABELS = {"Predict": "predict", "Classify": "classify", "Regress": "regress", "GetModelMetadata": "metadata",
           "GetModelStatus": "metadata", "HandleReloadConfigRequest": "repository"}


class TfServingService:
    def __init__(self, edge: Edge, metrics: Metrics) -> None:
        self.edge = edge
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
                    methods[m.name] = self.edge.unary(label, self.predict, method=m.name)
                elif m.name == "GetModelStatus":
                    methods[m.name] = self.edge.unary(label, self.model_status, method=m.name)
                else:
                    methods[m.name] = relay_handler(self.edge, f"/{service}/{m.name}", label, m.client_streaming,
                                                    m.server_streaming)
            out[service] = methods
        return out

    async def predict(self, message: bytes, context: Context, rpc: Rpc) -> bytes:
        try:
            request, modelled = tfserving_grpc.decode_request(message), True
        except DecodeError:
            self.metrics.unmodelled.labels(Protocol.TFSERVING_GRPC.value).inc()
            request, modelled = InferenceRequest(Protocol.TFSERVING_GRPC, _model_of(message), method="predict"), False
        rpc.model = request.model
        call = self.edge.call(rpc, request, modelled, tfserving_grpc.PREDICT, message)
        answer, rpc.cache = await self.edge.infer(call, tfserving_grpc.encode_response)
        return await self.edge.answer(context, rpc, answer)

    async def model_status(self, message: bytes, context: Context, rpc: Rpc) -> bytes:
        answer = await self.edge.fetch(f"/{tfserving_grpc.MODEL_SERVICE}/GetModelStatus", message, rpc)
        if answer.code == "OK" and not self.edge.machine.ready:
            answer = dataclasses.replace(answer, message=tfserving_grpc.status_not_ready(answer.message))
        return await self.edge.answer(context, rpc, answer)


def _model_of(message: bytes) -> str:
    try:
        return str(predict_pb2.PredictRequest.FromString(message).model_spec.name)
    except Exception:  # protobuf's DecodeError, or anything a malformed message raises: no model then
        return ""

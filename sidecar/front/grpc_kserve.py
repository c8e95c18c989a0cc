"""KServe v2 ``inference.GRPCInferenceService`` on the gRPC data port.

``ModelInfer`` runs through the same stage pipeline as HTTP inference; ``ModelStreamInfer`` too, request
by request (``grpc_stream.py``); ``ServerReady`` and ``ModelReady`` answer from the state machine while
the pod is not warm (ready=false, as the HTTP readiness paths answer 400). Every other method passes
through as raw bytes, its kind (unary or streaming) read from Triton's service descriptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
from google.protobuf.message import DecodeError as ProtobufDecodeError
from tritonclient.grpc import service_pb2

from ..errors import DecodeError
from ..metrics import Metrics
from ..planes import View
from ..protocols import kserve_grpc
from ..protocols.request import InferenceRequest, Protocol
from ..upstream.models import ModelCatalog
from .grpc_rpc import Context, Rpc, Rpcs
from .grpc_stream import StreamSession

SERVICE = kserve_grpc.SERVICE
_NOT_READY = b""  # ServerReadyResponse / ModelReadyResponse with ready=false: proto3 writes no field
_LABELS = {"ServerLive": "health", "ServerReady": "health", "ModelReady": "health", "ServerMetadata": "metadata",
           "ModelMetadata": "metadata", "ModelConfig": "metadata", "ModelStatistics": "stats",
           "RepositoryIndex": "repository", "RepositoryModelLoad": "repository",
           "RepositoryModelUnload": "repository", "ModelInfer": "infer", "ModelStreamInfer": "infer"}

def method_label(name: str) -> str:
    return _LABELS.get(name, "other")


class KServeService:
    def __init__(self, rpcs: Rpcs, view: View, catalog: ModelCatalog, metrics: Metrics) -> None:
        self.rpcs = rpcs
        self.view = view
        self.catalog = catalog
        self.metrics = metrics

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        special = {"ModelInfer": self.model_infer, "ServerReady": self.server_ready, "ModelReady": self.model_ready,
                   "RepositoryModelLoad": self._repository("RepositoryModelLoad"),
                   "RepositoryModelUnload": self._repository("RepositoryModelUnload")}
        out: dict[str, grpc.RpcMethodHandler] = {}
        for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            label = method_label(m.name)
            if m.name == "ModelStreamInfer":
                out[m.name] = self.rpcs.streaming(label, True, self.stream_infer, method=m.name)
            elif m.name in special:
                out[m.name] = self.rpcs.unary(label, special[m.name], method=m.name)
            else:
                out[m.name] = relay_handler(self.rpcs, f"/{SERVICE}/{m.name}", label, m.client_streaming,
                                            m.server_streaming)
        return out

    # -- inference -------------------------------------------------------------------------------------

    def decode(self, message: bytes) -> tuple[InferenceRequest | None, InferenceRequest]:
        """(the canonical request, or None when the codec cannot model it; the request that names the call)."""
        try:
            request = kserve_grpc.decode_request(message)
            return request, request
        except DecodeError:
            # Valid or not, the model server answers it as it always does; the sidecar stays out of the way.
            self.metrics.unmodelled.labels(Protocol.KSERVE_GRPC.value).inc()
            return None, InferenceRequest(Protocol.KSERVE_GRPC, kserve_grpc.model_of(message))

    async def model_infer(self, message: bytes, context: Context, rpc: Rpc) -> bytes:
        request, named = self.decode(message)
        rpc.model = named.model
        call = self.rpcs.call(rpc, request, named, kserve_grpc.MODEL_INFER, message)
        answer, rpc.cache = await self.rpcs.infer(call, kserve_grpc.encode_response)
        return await self.rpcs.answer(context, rpc, answer)

    def stream_infer(self, requests: AsyncIterator[bytes], context: Context, rpc: Rpc) -> AsyncIterator[bytes]:
        return StreamSession(self.rpcs, self.decode, self.catalog, context, rpc).run(requests)

    # -- readiness from the state machine -----------------------------------------------------------------

    def _model_ready(self, message: bytes) -> bool:
        snapshot = self.view.snapshot
        try:
            name = service_pb2.ModelReadyRequest.FromString(message).name
        except ProtobufDecodeError:
            return snapshot.ready  # the server answers a malformed request its own way
        tracked = snapshot.model_ready(name)
        return snapshot.ready if tracked is None else tracked

    async def server_ready(self, message: bytes, context: Context, rpc: Rpc) -> bytes:
        if not self.view.snapshot.ready:
            rpc.status = 200
            await self.rpcs.send_metadata(context, rpc)
            return _NOT_READY
        return await self.rpcs.relay(f"/{SERVICE}/ServerReady", message, context, rpc)

    async def model_ready(self, message: bytes, context: Context, rpc: Rpc) -> bytes:
        """A model the sidecar tracks follows its own state (warm or not), others the pod's."""
        if not self._model_ready(message):
            rpc.status = 200
            await self.rpcs.send_metadata(context, rpc)
            return _NOT_READY
        return await self.rpcs.relay(f"/{SERVICE}/ModelReady", message, context, rpc)

    # -- the repository API: a model loaded or unloaded here loses its cached answers ------------------------

    def _repository(self, name: str) -> Callable[[bytes, Context, Rpc], Coroutine[Any, Any, bytes]]:
        async def run(message: bytes, context: Context, rpc: Rpc) -> bytes:
            answer = await self.rpcs.fetch(f"/{SERVICE}/{name}", message, rpc)
            if answer.code == "OK":
                self.rpcs.edge.model_changed(_model_name(name, message))
            return await self.rpcs.answer(context, rpc, answer)

        return run


def relay_handler(rpcs: Rpcs, method: str, label: str, client_streaming: bool,
                  server_streaming: bool) -> grpc.RpcMethodHandler:
    """A pass-through handler of the method's own kind (read from the service descriptor)."""
    name = method.rsplit("/", 1)[-1]
    if not server_streaming:
        kind = "stream_unary" if client_streaming else ""

        async def one(request: Any, context: Context, rpc: Rpc) -> bytes:
            if not kind:
                return await rpcs.relay(method, request, context, rpc)
            async for response in rpcs.relay_stream(method, kind, request, context, rpc):
                return response
            raise AssertionError("a client-streaming call ends with one response")

        return rpcs.unary(label, one, client_streaming, method=name)
    kind = "stream_stream" if client_streaming else "unary_stream"

    def many(request: Any, context: Context, rpc: Rpc) -> AsyncIterator[bytes]:
        return rpcs.relay_stream(method, kind, request, context, rpc)

    return rpcs.streaming(label, client_streaming, many, method=name)


def _model_name(method: str, message: bytes) -> str:
    cls = getattr(service_pb2, f"{method}Request")
    try:
        return str(cls.FromString(message).model_name)
    except ProtobufDecodeError:
        return ""

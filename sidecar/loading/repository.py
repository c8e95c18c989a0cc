"""Triton's model repository API, as the sidecar uses it to load models in order of their traffic.

``POST /v2/repository/index`` lists every model the repository holds with its state (a model never
loaded has none: Triton runs in explicit model-control mode); ``POST .../models/{m}/load`` returns
once the model is loaded (or failed), ``.../unload`` once it is unloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import orjson
from tritonclient.grpc import service_pb2

from ..errors import SidecarError
from ..upstream.grpc import GrpcUpstream
from ..upstream.http import HttpUpstream


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str  # "" when the model was never loaded


class Repository:
    def __init__(self, upstream: HttpUpstream, load_timeout: float, grpc: GrpcUpstream | None = None) -> None:
        self.upstream = upstream
        self.load_timeout = load_timeout
        # Loads go over gRPC when the model server has it: Triton's HTTP load handler holds its HTTP worker
        # thread for the whole load, stalling the data path's pooled connections served by that thread.
        self.grpc = grpc

    async def index(self) -> list[IndexEntry] | None:
        """The repository's models; None when the repository API does not answer (TF Serving, restricted)."""
        try:
            status, body = await self.upstream.probe("/v2/repository/index", 5.0, "POST")
        except SidecarError:
            return None
        if status != 200 or not isinstance(body, list):
            return None
        return [IndexEntry(str(e["name"]), str(e.get("version", "")), str(e.get("state", "")))
                for e in body if isinstance(e, dict) and isinstance(e.get("name"), str)]

    async def load(self, model: str) -> str:
        """Load ``model``; "" when loaded, else why not (the server's status and message)."""
        return await self._act(model, "load")

    async def unload(self, model: str) -> str:
        return await self._act(model, "unload")

    async def _act(self, model: str, action: str) -> str:
        if self.grpc is not None:
            outcome = await self._act_grpc(model, action)
            if outcome is not None:
                return outcome
        try:
            answer = await self.upstream.fetch(f"/v2/repository/models/{model}/{action}", self.load_timeout, "POST")
        except SidecarError as e:
            return e.message
        if answer.status == 200:
            return ""
        try:
            message = orjson.loads(answer.body).get("error", "")
        except (orjson.JSONDecodeError, AttributeError):
            message = ""
        return f"HTTP {answer.status}: {str(message)[:200]}"

    async def _act_grpc(self, model: str, action: str) -> str | None:
        """"" when done, why not when the server refused, None when gRPC cannot be used (then HTTP is)."""
        assert self.grpc is not None
        if action == "load":
            method, message = _LOAD, service_pb2.RepositoryModelLoadRequest(model_name=model).SerializeToString()
        else:
            method, message = _UNLOAD, service_pb2.RepositoryModelUnloadRequest(model_name=model).SerializeToString()
        try:
            await self.grpc.unary(method)(message, timeout=self.load_timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):
                return None
            return f"gRPC {e.code().name}: {(e.details() or '')[:200]}"
        return ""


_LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
_UNLOAD = "/inference.GRPCInferenceService/RepositoryModelUnload"

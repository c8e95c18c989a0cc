"""The pipeline's terminal: each call goes to the model server over the protocol it needs.

The one place that chooses. A call carrying a gRPC caller's own request goes over gRPC, untouched;
so does a call the sidecar built for TF Serving gRPC callers (a batch), because TF Serving's REST form
cannot say FP32 from FP64. Everything else goes over HTTP: HTTP callers and the KServe calls the sidecar
builds (batches, the warm-up sweep), whose binary HTTP form is exact, so HTTP and gRPC callers share
batches and cached answers.
"""

from __future__ import annotations

from ..calls import Call, GrpcWire, Reply
from ..protocols.request import Protocol
from .grpc import GrpcUpstream
from .http import HttpUpstream


class UpstreamRouter:
    def __init__(self, http: HttpUpstream, grpc: GrpcUpstream) -> None:
        self.http = http
        self.grpc = grpc

    def __repr__(self) -> str:
        return f"<UpstreamRouter {self.http!r} {self.grpc!r}>"

    async def send(self, call: Call) -> Reply:
        wire = call.wire
        if isinstance(wire, GrpcWire) or (wire is None and call.request.protocol is Protocol.TFSERVING_GRPC):
            return await self.grpc.send(call)
        return await self.http.send(call)

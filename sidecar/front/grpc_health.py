"""``grpc.health.v1.Health`` on the gRPC data port, read from the one state machine.

Services:

- ``""`` and ``"readiness"``: SERVING only when WARM (the readinessProbe, and what gRPC load balancers
  ask by default);
- ``"liveness"``: SERVING while the process runs and is not draining (the livenessProbe);
- each model name: SERVING when WARM and the model server has a version of it loaded; NOT_SERVING for a
  model the server knows but has not loaded (or while it is down). Unknown names: Check answers
  NOT_FOUND, Watch SERVICE_UNKNOWN, as the health-checking protocol says.

``Watch`` sends the status at once and again at every change of it (state changes and loads wake it),
keeping the stream open until the server stops. Kubernetes' gRPC probe calls ``Check``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc

from ..metrics import Metrics
from ..planes import Snapshot, View
from ..protogen.grpc.health.v1 import health_pb2
from ..state import State
from .grpc_rpc import Context

SERVICE = "grpc.health.v1.Health"
Status = health_pb2.HealthCheckResponse.ServingStatus
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_OVERALL = ("", "readiness", "liveness")
_LIST_MAX = 100  # the protocol's bound on List's answer


class HealthService:
    def __init__(self, view: View, metrics: Metrics, configured_models: Iterable[str] = ()) -> None:
        self.view = view
        self.metrics = metrics
        self.known: set[str] = set(configured_models)
        self._wake = asyncio.Event()
        self._closing = False
        view.subscribe(self._changed)

    def __repr__(self) -> str:
        return f"<HealthService {self.view.snapshot.state} models={len(self.known)}>"

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {"Check": grpc.unary_unary_rpc_method_handler(self.check),
                "List": grpc.unary_unary_rpc_method_handler(self.list),
                "Watch": grpc.unary_stream_rpc_method_handler(self.watch)}

    def close(self) -> None:
        """End every Watch stream (the server is stopping; clients retry elsewhere)."""
        self._closing = True
        self._notify()

    # -- status ------------------------------------------------------------------------------------------

    def status(self, service: str) -> Status | None:
        """The serving status of ``service``; None when the name is unknown."""
        snapshot = self.view.snapshot
        ready = snapshot.ready
        if service in ("", "readiness"):
            return SERVING if ready else NOT_SERVING
        if service == "liveness":
            return NOT_SERVING if snapshot.state is State.DRAINING else SERVING
        tracked = snapshot.model_ready(service)  # a model the sidecar tracks follows its own state
        if tracked is not None:
            return SERVING if tracked else NOT_SERVING
        if any(model == service for model, _ in snapshot.loaded or ()):
            return SERVING if ready else NOT_SERVING
        if service in self.known or service in snapshot.known_models or service in self.metrics.known_models:
            return NOT_SERVING
        return None

    def _changed(self, previous: Snapshot, current: Snapshot) -> None:
        if current.loaded is not None:
            self.known.update(model for model, _ in current.loaded)
        self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    # -- the RPCs ----------------------------------------------------------------------------------------

    async def check(self, message: bytes, context: Context) -> bytes:
        service = health_pb2.HealthCheckRequest.FromString(message).service
        status = self.status(service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
            raise AssertionError("unreachable: abort raises")
        return bytes(health_pb2.HealthCheckResponse(status=status).SerializeToString())

    async def list(self, message: bytes, context: Context) -> bytes:
        snapshot = self.view.snapshot
        names = [*_OVERALL, *sorted(self.known | self.metrics.known_models | snapshot.known_models
                                    | {m for m, _ in snapshot.loaded or ()})]
        if len(names) > _LIST_MAX:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(names)} services, more than "
                                f"{_LIST_MAX}")
        out = health_pb2.HealthListResponse()
        for name in names:
            out.statuses[name].status = self.status(name) or NOT_SERVING
        return bytes(out.SerializeToString())

    async def watch(self, message: bytes, context: Context) -> AsyncIterator[bytes]:
        service = health_pb2.HealthCheckRequest.FromString(message).service
        last: Status | None = None
        while not self._closing:
            wake = self._wake
            status = self.status(service)
            status = SERVICE_UNKNOWN if status is None else status
            if status != last:
                last = status
                yield bytes(health_pb2.HealthCheckResponse(status=status).SerializeToString())
            await wake.wait()

"""What every gRPC method of the data port shares: one call's wire, its handlers, its answers.

- ``Rpc``: one call's request id, forwarded metadata (hop-specific keys removed), deadline;
- handlers: raw-bytes method handlers (no protobuf round trip) that apply the restrictions, count
  calls and write the sidecar's own errors as a gRPC status (``errors.refusal`` says which);
- ``infer``: an inference call handed to the edge (``front/edge.py``), its answer written back;
- relays: any other method passed through to the model server by the edge, unary or streaming.

Answers carry ``x-request-id``, ``x-sidecar-state`` and (from the cache) ``x-sidecar-cache`` as initial
metadata, after whatever initial metadata the model server sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
import grpc.aio

from .. import logs
from ..calls import Call, GrpcAnswer, GrpcWire, Reply
from ..config import Config
from ..errors import GRPC_TO_HTTP, SidecarError, UpstreamUnavailable, refusal
from ..metrics import Metrics
from ..planes import View
from ..protocols import restrict
from ..protocols.request import InferenceRequest, InferenceResponse
from ..upstream.grpc import Metadata
from .edge import Edge

log = logging.getLogger("sidecar.grpc")

Context: TypeAlias = Any  # grpc.aio.ServicerContext: grpc ships no type hints
Encoder = Callable[[InferenceRequest, InferenceResponse], bytes]
# Transport-level keys: they describe this hop, never the call (gRPC's own, HTTP/2 pseudo-headers).
_HOP_KEYS = frozenset({"te", "content-type", "user-agent", "host", "x-request-id", "accept-encoding"})
REQUEST_ID = "x-request-id"
STATE_KEY = "x-sidecar-state"
CACHE_KEY = "x-sidecar-cache"


def hop_specific(key: str) -> bool:
    return key.startswith((":", "grpc-", "x-sidecar-")) or key in _HOP_KEYS


class Rpc:
    """One gRPC call at the edge."""

    __slots__ = ("cache", "caller_timeout", "deadline", "label", "metadata", "model", "received", "request_id",
                 "sent", "started", "status", "timeout")

    def __init__(self, context: Context, label: str, default_timeout: float, new_id: Callable[[], str]) -> None:
        self.label = label
        self.started = time.perf_counter()
        self.model = ""
        self.status = 0
        self.cache = ""
        self.sent = False
        forwarded: list[tuple[str, str | bytes]] = []
        request_id = ""
        self.received: Metadata = tuple(context.invocation_metadata() or ())
        for key, value in self.received:
            if key == REQUEST_ID:
                request_id = value if isinstance(value, str) else value.decode("latin-1")
            elif not hop_specific(key):
                forwarded.append((key, value))
        self.request_id = request_id or new_id()
        logs.REQUEST_ID.set(self.request_id)  # each RPC runs in a task of its own: the id ends with it
        forwarded.append((REQUEST_ID, self.request_id))
        self.metadata: Metadata = tuple(forwarded)
        remaining = context.time_remaining()
        # The caller's deadline becomes the upstream's; without one, upstream.timeout bounds the call.
        self.caller_timeout: float | None = None if remaining is None else max(0.0, remaining)
        self.timeout = default_timeout if self.caller_timeout is None else self.caller_timeout
        self.deadline = asyncio.get_running_loop().time() + self.timeout


class Rpcs:
    """The handler wrappers and answers of every method of the gRPC data port."""

    def __init__(self, cfg: Config, edge: Edge, view: View, metrics: Metrics) -> None:
        self.cfg = cfg
        self.edge = edge
        self.view = view
        self.metrics = metrics
        # Triton's --grpc-restricted-protocol, as configured (or as restricted_api says): the same APIs as
        # on the HTTP port stay closed here.
        self.restrictions = restrict.parse_grpc(cfg.grpc_restricted_protocol or cfg.restricted_api)
        self.in_flight = 0

    def __repr__(self) -> str:
        return f"<grpc Rpcs in_flight={self.in_flight}>"

    def rpc(self, context: Context, label: str) -> Rpc:
        return Rpc(context, label, self.cfg.upstream.timeout, self.edge.new_id)

    # -- method handlers ---------------------------------------------------------------------------------

    def unary(self, label: str, handle: Callable[[Any, Context, Rpc], Awaitable[bytes]],
              client_streaming: bool = False, method: str = "") -> grpc.RpcMethodHandler:
        """A handler with one response (``client_streaming``: the request is the caller's message iterator);
        ``method`` (its bare name) decides which restriction applies."""
        async def run(message: Any, context: Context) -> bytes:
            rpc = self.rpc(context, label)
            self.in_flight += 1
            try:
                await self.check_allowed(context, rpc, method)
                return await handle(message, context, rpc)
            except SidecarError as err:
                await self.fail(context, rpc, err)
                raise AssertionError("unreachable: abort raises") from None
            finally:
                self.in_flight -= 1
                self.metrics.observe_request(label, rpc.model, rpc.status or 499, time.perf_counter() - rpc.started)

        if client_streaming:
            return grpc.stream_unary_rpc_method_handler(run)
        return grpc.unary_unary_rpc_method_handler(run)

    def streaming(self, label: str, client_streaming: bool, handle: Callable[[Any, Context, Rpc], AsyncIterator[bytes]],
                  method: str = "") -> grpc.RpcMethodHandler:
        """A server-streaming (or bidirectional, with ``client_streaming``) handler."""
        async def run(request: Any, context: Context) -> AsyncIterator[bytes]:
            rpc = self.rpc(context, label)
            self.in_flight += 1
            try:
                await self.check_allowed(context, rpc, method)
                async for response in handle(request, context, rpc):
                    yield response
                rpc.status = rpc.status or 200
            except SidecarError as err:
                await self.fail(context, rpc, err)
            finally:
                self.in_flight -= 1
                self.metrics.observe_request(label, rpc.model, rpc.status or 499, time.perf_counter() - rpc.started)

        if client_streaming:
            return grpc.stream_stream_rpc_method_handler(run)
        return grpc.unary_stream_rpc_method_handler(run)

    async def check_allowed(self, context: Context, rpc: Rpc, method: str) -> None:
        """Triton's own refusal of a restricted method called without its key: UNAVAILABLE, naming the key."""
        refused = restrict.grpc_refusal(self.restrictions, method, rpc.received)
        if refused is not None:
            rpc.status = 403
            await self.send_metadata(context, rpc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, refused)

    async def fail(self, context: Context, rpc: Rpc, err: SidecarError) -> None:
        """The sidecar's own error as a gRPC status: its code, its message, Retry-After when it has one."""
        r = refusal(err)
        rpc.status = err.http_status
        if isinstance(err, UpstreamUnavailable):
            self.edge.upstream_failed()
        trailing = (("retry-after", str(r.retry_after)),) if r.retry_after is not None else ()
        if _over(context):
            raise asyncio.CancelledError  # gRPC has ended the call itself (its deadline): nothing can be sent
        await self.send_metadata(context, rpc)
        await context.abort(grpc.StatusCode[r.grpc_code], r.message, trailing)

    async def send_metadata(self, context: Context, rpc: Rpc, upstream: Metadata = ()) -> None:
        if rpc.sent:
            return
        rpc.sent = True
        metadata = [(k, v) for k, v in upstream if not hop_specific(k)]
        metadata.append((REQUEST_ID, rpc.request_id))
        metadata.append((STATE_KEY, self.view.snapshot.state.value))
        if rpc.cache:
            metadata.append((CACHE_KEY, rpc.cache))
        try:
            await context.send_initial_metadata(tuple(metadata))
        except Exception:
            if _over(context):  # the deadline ran out (or the caller left) between the check and the send
                raise asyncio.CancelledError from None
            raise

    async def answer(self, context: Context, rpc: Rpc, answer: GrpcAnswer) -> bytes:
        """Send a model server's answer (or one encoded for this caller): its metadata, status and message."""
        rpc.status = GRPC_TO_HTTP.get(answer.code, 500)
        await self.send_metadata(context, rpc, answer.initial_metadata)
        trailing = tuple((k, v) for k, v in answer.trailing_metadata if not hop_specific(k))
        if answer.code != "OK":
            await context.abort(grpc.StatusCode[answer.code], answer.details, trailing)
        if trailing:
            context.set_trailing_metadata(trailing)
        return answer.message

    # -- inference through the edge ----------------------------------------------------------------------

    def call(self, rpc: Rpc, request: InferenceRequest | None, fallback: InferenceRequest, method: str,
             message: bytes) -> Call:
        return self.edge.call(request, fallback, GrpcWire(method, message, rpc.metadata), rpc.request_id,
                              rpc.deadline, rpc.label, "grpc", rpc.received)

    async def infer(self, call: Call, encode: Encoder) -> tuple[GrpcAnswer, str]:
        """``call`` through the stages: (the answer for this caller, the cache's verdict)."""
        def as_grpc(call: Call, reply: Reply) -> GrpcAnswer:
            return GrpcAnswer("OK", "", encode(call.request, reply.response()))

        answer, cache = await self.edge.run(call, as_grpc)
        assert isinstance(answer, GrpcAnswer)
        return answer, cache

    # -- pass-through --------------------------------------------------------------------------------------

    async def relay(self, method: str, message: bytes, context: Context, rpc: Rpc) -> bytes:
        """A unary call passed through to the model server, bytes for bytes."""
        return await self.answer(context, rpc, await self.fetch(method, message, rpc))

    async def fetch(self, method: str, message: bytes, rpc: Rpc) -> GrpcAnswer:
        # Relayed calls (model loads among them) are bounded by the caller's deadline, else by
        # upstream.passthrough_timeout only: the server would finish a slow load for a caller that waits.
        timeout = rpc.caller_timeout if rpc.caller_timeout is not None else (
            self.cfg.upstream.passthrough_timeout or None)
        return await self.edge.relay_grpc(method, message, rpc.metadata, timeout, rpc.deadline)

    async def relay_stream(self, method: str, kind: str, request: Any, context: Context,
                           rpc: Rpc) -> AsyncIterator[bytes]:
        """A streaming call passed through: ``request`` is the caller's message (server streaming) or its
        message iterator (client or bidirectional streaming); responses go back as they arrive."""
        # A stream may rightly outlive upstream.timeout: only the caller's own deadline bounds it.
        call = self.edge.relay_grpc_stream(method, kind, request, rpc.metadata, rpc.caller_timeout)
        try:
            await self.send_metadata(context, rpc, tuple(await call.initial_metadata() or ()))
            if kind == "stream_unary":
                yield await call
            else:
                async for response in call:
                    yield response
            trailing = tuple((k, v) for k, v in await call.trailing_metadata() or () if not hop_specific(k))
            if trailing:
                context.set_trailing_metadata(trailing)
        except grpc.aio.AioRpcError as e:
            await self.answer(context, rpc, self.edge.grpc_error(e, rpc.deadline))
        finally:
            call.cancel()  # no-op once finished; a caller who left takes the upstream stream with it


def _over(context: Context) -> bool:
    """Whether gRPC has ended the call: its caller left, or its deadline passed (the core answers
    DEADLINE_EXCEEDED itself and refuses anything sent after; the handler ends as cancelled, quietly)."""
    remaining = context.time_remaining()
    return context.done() or (remaining is not None and remaining <= 0)

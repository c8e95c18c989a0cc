"""``ModelStreamInfer``: one bidirectional stream, each request answered as it completes.

The server reads a stream's requests in the order they come, and a sequence (stateful) model depends
on that order. So the reader decides each request's way in arrival order:

- a request the codec models, for a model that is neither decoupled nor a sequence model, and that
  carries no sequence parameters, runs through the stage pipeline like a unary ModelInfer (cached,
  batched, recorded like any other call) - its answer goes back as a ``ModelStreamInferResponse``
  (``infer_response``, or ``error_message`` as Triton writes errors) whenever it completes: such calls
  are independent of each other, as the server treats them;
- every other request (decoupled models: 0..n responses each; sequence calls; models whose
  configuration is unknown; requests the codec does not model, whose sequence parameters it cannot
  see) goes untouched to one upstream stream opened on first need, in arrival order, and every
  response it produces comes back as it arrives.

A request whose shape would crash the server is answered with an error here and never sent. The caller
leaving cancels everything it started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc.aio

from ..calls import Call, GrpcAnswer
from ..errors import SidecarError
from ..identity import is_stateful
from ..logs import where
from ..protocols import kserve_grpc
from ..protocols.protowire import length_field
from ..protocols.request import InferenceRequest, Protocol
from ..upstream.models import ModelCatalog
from .grpc_rpc import Context, Rpc, Rpcs

# The codec's reading of a ModelInferRequest: (the request, or None when not modelled; what names it).
Decode = Callable[[bytes], tuple[InferenceRequest | None, InferenceRequest]]

log = logging.getLogger("sidecar.grpc")
STREAM_INFER = f"/{kserve_grpc.SERVICE}/ModelStreamInfer"
# A response, the upstream stream's failure (its status, or the sidecar's error), the reader's own failure,
# or the end. Every way the reading side can stop puts one of the last three, so the writer never waits on.
_Item = bytes | GrpcAnswer | Exception | None


class StreamSession:
    def __init__(self, rpcs: Rpcs, decode: Decode, catalog: ModelCatalog, context: Context, rpc: Rpc) -> None:
        self.rpcs = rpcs
        self.decode = decode
        self.catalog = catalog
        self.context = context
        self.rpc = rpc
        self.out: asyncio.Queue[_Item] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()
        self.upstream: Any = None
        self.to_upstream: asyncio.Queue[bytes | None] | None = None
        self.upstream_reader: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<StreamSession {self.rpc.request_id} pending={len(self.tasks)} upstream={self.upstream is not None}>"

    async def run(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        await self.rpcs.send_metadata(self.context, self.rpc)
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            while (item := await self.out.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, GrpcAnswer):  # the upstream stream failed: this one fails the same way
                    await self.rpcs.answer(self.context, self.rpc, item)
                    return
                yield item
            await reader
            self.rpc.status = 200
        finally:
            reader.cancel()
            for task in list(self.tasks):
                task.cancel()
            if self.upstream is not None:
                self.upstream.cancel()

    async def _read(self, requests: AsyncIterator[bytes]) -> None:
        try:
            loop = asyncio.get_running_loop()
            async for message in requests:
                call = await self._route(message)  # in arrival order: upstream-bound requests keep it
                if call is not None:
                    task = loop.create_task(self._one(call))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
            if self.tasks:
                await asyncio.wait(set(self.tasks))
            if self.to_upstream is not None and self.upstream_reader is not None:
                self.to_upstream.put_nowait(None)  # the caller is done writing: so is the upstream stream
                await self.upstream_reader
        except Exception as e:
            self.out.put_nowait(e)
            return
        self.out.put_nowait(None)

    async def _route(self, message: bytes) -> Call | None:
        """The call to run through the stages, or None when the request went to the upstream stream (or was
        answered here)."""
        _model, request_id = kserve_grpc.peek(message)
        try:
            request, named = self.decode(message)
            info = await self.catalog.info(named.model, Protocol.KSERVE_GRPC)
        except SidecarError as e:  # a shape that would crash the server: answered here, never sent
            self.out.put_nowait(stream_error(e.message, request_id))
            return None
        ordered = info.decoupled or info.max_batch is None or info.sequence_batching
        if request is None or ordered or is_stateful(request):
            # A sequence model's calls (sequence_batching) depend on the order they reach it.
            self._send_upstream(message)
            return None
        call = self.rpcs.call(self.rpc, request, named, kserve_grpc.MODEL_INFER, message)
        if self.rpc.caller_timeout is None:  # each request of a long stream gets upstream.timeout of its own
            call.deadline = asyncio.get_running_loop().time() + self.rpcs.cfg.upstream.timeout
        return call

    async def _one(self, call: Call) -> None:
        request_id = call.request.id
        try:
            answer, _cache = await self.rpcs.infer(call, kserve_grpc.encode_response)
        except SidecarError as e:
            self.out.put_nowait(stream_error(e.message, request_id))
            return
        except Exception as e:  # a bug must cost one request its answer, never hang the stream
            log.error("stream request failed (%s)\n%s", type(e).__name__, where(e))
            self.out.put_nowait(stream_error(f"sidecar internal error ({type(e).__name__})", request_id))
            return
        self.out.put_nowait(stream_response(answer.message) if answer.code == "OK" else
                            stream_error(answer.details, request_id))

    def _send_upstream(self, message: bytes) -> None:
        if self.to_upstream is None:
            self.to_upstream = asyncio.Queue()
            self.upstream = self.rpcs.edge.relay_grpc_stream(STREAM_INFER, "stream_stream",
                                                             self._outgoing(self.to_upstream), self.rpc.metadata,
                                                             self.rpc.caller_timeout)
            self.upstream_reader = asyncio.get_running_loop().create_task(self._incoming(self.upstream))
        self.to_upstream.put_nowait(message)

    @staticmethod
    async def _outgoing(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        while (message := await queue.get()) is not None:
            yield message

    async def _incoming(self, call: Any) -> None:
        try:
            async for response in call:
                self.out.put_nowait(response)
        except grpc.aio.AioRpcError as e:
            try:
                deadline = self.rpc.deadline if self.rpc.caller_timeout is not None else None
                self.out.put_nowait(self.rpcs.edge.grpc_error(e, deadline))
            except SidecarError as err:
                self.out.put_nowait(err)


# parameters["triton_final_response"] = {bool_param: true}: Triton marks every response of a non-decoupled
# model on a stream so. A map entry may follow the message's other fields on the wire.
_FINAL = b"\x22\x1b\x0a\x15triton_final_response\x12\x02\x08\x01"


def stream_response(infer_response: bytes) -> bytes:
    """ModelStreamInferResponse{infer_response: <the ModelInferResponse>, marked final}, without a round trip."""
    return length_field(2, infer_response + _FINAL)


def stream_error(message: str, request_id: str) -> bytes:
    """ModelStreamInferResponse{error_message, infer_response{id}}: how Triton reports a failed request."""
    answer = length_field(3, request_id.encode()) if request_id else b""
    return length_field(1, message.encode()) + length_field(2, answer)


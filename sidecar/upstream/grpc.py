"""The model server over gRPC: raw messages in and out on a few pooled grpc.aio channels.

No protobuf round trip happens here: generic multi-callables with no (de)serializer carry the caller's
bytes (as Ray Serve's gRPC proxy does). The remaining deadline becomes the call's timeout, the caller's
metadata goes along, and the server's initial and trailing metadata come back in a ``GrpcAnswer``.

An error status the server sent is an answer like any other (``Reply.status`` mapped to an HTTP-like
status); a failure of the transport itself (nothing listening, connection reset, no answer before the
deadline) becomes UpstreamUnavailable or UpstreamTimeout, so stages treat it as they do for HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio

from ..calls import Call, GrpcAnswer, GrpcWire, Reply
from ..config import UpstreamConfig
from ..errors import GRPC_TO_HTTP, AnswerTooLarge, DecodeError, SidecarError, UpstreamTimeout, UpstreamUnavailable
from ..metrics import Metrics
from ..protocols import forwarded, kserve_grpc, tfserving_grpc
from ..protocols.request import InferenceRequest, InferenceResponse, Protocol

Metadata = tuple[tuple[str, str | bytes], ...]
CHANNELS = 2  # HTTP/2 multiplexes; two connections keep one slow stream from holding every call

# The status Triton's HTTP API (or Google's HTTP mapping) gives each gRPC code: what stages judge by.
HTTP_STATUS = GRPC_TO_HTTP  # an answer's status for the stages (errors.py keeps the one table)
# What grpc core says when the connection itself failed, as opposed to a server answering UNAVAILABLE
# (Triton does, for an unknown model).
_TRANSPORT_FAILURES = ("failed to connect", "connection refused", "connection reset", "socket closed",
                       "broken pipe", "goaway", "stream removed", "transport closed", "connect failed",
                       "unavailable: empty address list", "cancelling all calls", "endpoint closing")
_TOO_LARGE = "received message larger than max"
_RECONNECT_FIRST_MS = 100
_RECONNECT_MAX_MS = 1000


def reconnect_options(connect_timeout: float) -> list[tuple[str, int]]:
    """How a channel reconnects to a model server that went away. gRPC's defaults back off up to 120 s between
    attempts: a server back after a minute's outage would stay unreachable over gRPC for up to a minute more
    while the sidecar, probing over HTTP, already says ready. Attempts here are at most a second apart (a
    refused connect costs next to nothing), and one attempt (a handshake with a frozen server included)
    gives up after ``upstream.connect_timeout``, as an HTTP connect does, instead of gRPC's 20 s."""
    return [("grpc.initial_reconnect_backoff_ms", _RECONNECT_FIRST_MS),
            ("grpc.max_reconnect_backoff_ms", _RECONNECT_MAX_MS),
            ("grpc.min_reconnect_backoff_ms", max(100, round(connect_timeout * 1000)))]


def default_port(protocol: str) -> int:
    """Where the model server's gRPC port is by default: Triton 8001, TF Serving 8500."""
    return 8001 if protocol == "triton" else 8500


class GrpcUpstream:
    def __init__(self, cfg: UpstreamConfig, metrics: Metrics, max_send: int, max_receive: int,
                 protocol: Callable[[], str]) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.max_send = max_send
        self.max_receive = max_receive
        self.protocol = protocol  # the upstream protocol, once known (configured or detected)
        self._channels: list[grpc.aio.Channel] = []
        self._methods: list[dict[str, Any]] = []
        self._turn = itertools.count()
        self._target = ""

    def __repr__(self) -> str:
        return f"<GrpcUpstream {self._target or '(not connected)'} channels={len(self._channels)}>"

    def target(self) -> str:
        """``upstream.grpc_url``, or upstream.url's host with the protocol's default port."""
        if self.cfg.grpc_url:
            return self.cfg.grpc_url
        protocol = self.protocol()
        if not protocol:
            raise UpstreamUnavailable("model server gRPC port unknown until its protocol is detected; "
                                      "set upstream.grpc_url")
        host = urlsplit(self.cfg.url).hostname or "127.0.0.1"
        return f"[{host}]:{default_port(protocol)}" if ":" in host else f"{host}:{default_port(protocol)}"

    def _pick(self) -> int:
        if not self._channels:
            self._target = target = self.target()
            options = [("grpc.max_send_message_length", self.max_send),
                       ("grpc.max_receive_message_length", self.max_receive),
                       ("grpc.use_local_subchannel_pool", 1),  # each channel its own connection
                       ("grpc.optimization_target", "throughput"),
                       *reconnect_options(self.cfg.connect_timeout)]
            self._channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(CHANNELS)]
            self._methods = [{} for _ in range(CHANNELS)]
        return next(self._turn) % len(self._channels)

    def _multicallable(self, method: str, kind: str) -> Any:
        i = self._pick()
        key = f"{kind} {method}"
        found = self._methods[i].get(key)
        if found is None:
            found = self._methods[i][key] = getattr(self._channels[i], kind)(method)
        return found

    def unary(self, method: str) -> Any:
        return self._multicallable(method, "unary_unary")

    def streaming(self, method: str, kind: str) -> Any:
        """A raw multi-callable of ``kind``: unary_stream, stream_unary or stream_stream."""
        return self._multicallable(method, kind)

    async def close(self) -> None:
        channels, self._channels, self._methods = self._channels, [], []
        for channel in channels:
            await channel.close()

    async def send(self, call: Call) -> Reply:
        """Pipeline terminal for gRPC calls (and calls the sidecar builds of TF Serving gRPC callers)."""
        wire = call.wire if isinstance(call.wire, GrpcWire) else encode_wire(call.request, call.context)
        loop = asyncio.get_running_loop()
        timeout = call.deadline - loop.time()
        if timeout <= 0:
            self.metrics.upstream_errors.labels("timeout").inc()
            raise UpstreamTimeout("the call's deadline passed before it reached the model server")
        started = time.perf_counter()
        rpc = self.unary(wire.method)(wire.message, timeout=timeout, metadata=wire.metadata or None)
        try:
            message = await rpc
            initial, trailing = await rpc.initial_metadata(), await rpc.trailing_metadata()
        except grpc.aio.AioRpcError as e:
            answer = self.error_answer(e, call.deadline)
            return Reply(HTTP_STATUS.get(answer.code, 500), wire=answer, for_call=call)
        self.metrics.observe_upstream(call.route, call.request.model, time.perf_counter() - started)
        self.metrics.learn_model(call.request.model)
        answer = GrpcAnswer("OK", "", message, _pairs(initial), _pairs(trailing))
        method = wire.method
        return Reply(200, wire=answer, for_call=call, decode=lambda: decode_answer(method, message))

    async def relay(self, method: str, message: bytes, metadata: Metadata, timeout: float | None,
                    deadline: float | None) -> GrpcAnswer:
        """A unary call passed through, bytes for bytes: the server's answer (its error status included);
        raises for failures of the transport."""
        call = self.unary(method)(message, timeout=timeout, metadata=metadata)
        try:
            response = await call
            initial, trailing = await call.initial_metadata(), await call.trailing_metadata()
        except grpc.aio.AioRpcError as e:
            return self.error_answer(e, deadline)
        return GrpcAnswer("OK", "", response, _pairs(initial), _pairs(trailing))

    def error_answer(self, e: grpc.aio.AioRpcError, deadline: float | None) -> GrpcAnswer:
        """The server's error status as an answer; raises for failures of the transport itself."""
        raise_transport_failure(e, deadline, self.metrics, self.max_receive)
        return GrpcAnswer(e.code().name, e.details() or "", b"", _pairs(e.initial_metadata()),
                          _pairs(e.trailing_metadata()))


def raise_transport_failure(e: grpc.aio.AioRpcError, deadline: float | None, metrics: Metrics,
                            max_receive: int) -> None:
    """UpstreamTimeout / UpstreamUnavailable when ``e`` is the transport's failure, not the server's answer."""
    code, details = e.code(), (e.details() or "")
    lowered = details.lower()
    error: SidecarError | None = None
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and (
            deadline is None or asyncio.get_running_loop().time() >= deadline - 0.002):
        metrics.upstream_errors.labels("timeout").inc()
        error = UpstreamTimeout("model server did not answer before the call's deadline")
    elif code is grpc.StatusCode.UNAVAILABLE and any(s in lowered for s in _TRANSPORT_FAILURES):
        metrics.upstream_errors.labels("unavailable").inc()
        error = UpstreamUnavailable(f"model server unavailable: {details[:200]}")
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED and lowered.startswith(_TOO_LARGE):
        metrics.upstream_errors.labels("too_large").inc()
        error = AnswerTooLarge(f"model server answer exceeds {max_receive} bytes")
    if error is not None:
        raise error


def encode_wire(request: InferenceRequest, context: forwarded.Context = ()) -> GrpcWire:
    """A canonical request in its protocol's gRPC form (a batch of TF Serving gRPC callers), with the metadata
    of its context that reaches the model (forwarded keys, a restriction key)."""
    metadata = tuple((k.decode("latin-1"), v) for k, v in forwarded.upstream_headers(context))
    if request.protocol is Protocol.TFSERVING_GRPC:
        return GrpcWire(tfserving_grpc.PREDICT, tfserving_grpc.encode_request(request), metadata)
    return GrpcWire(kserve_grpc.MODEL_INFER, kserve_grpc.encode_request(request), metadata)


def decode_answer(method: str, message: bytes) -> InferenceResponse:
    if method == kserve_grpc.MODEL_INFER:
        return kserve_grpc.decode_response(message)
    if method == tfserving_grpc.PREDICT:
        return tfserving_grpc.decode_response(message)
    raise DecodeError(f"{method}: answers of this method are not modelled")


def _pairs(metadata: Any) -> Metadata:
    return tuple((str(k), v) for k, v in metadata) if metadata else ()

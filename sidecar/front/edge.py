"""Both fronts' one edge: what a front parsed goes in, the answer for its caller comes out.

A front only parses and writes its wire. The edge builds the :class:`Call` (the canonical request,
or an unmodelled one that goes upstream untouched; the caller's deadline, credentials, cache
directives and scope, and the context the model server reads outside the body), runs the stages, and
resolves the :class:`Reply` into an answer of the caller's own protocol:

- the upstream's own bytes, when they answer exactly this caller's request;
- else the canonical response encoded for this caller (its protocol, encoding, id, outputs);
- else - an answer that cannot take the caller's form, or an error in another protocol's shape - a
  new call that asks the model server for this caller untouched, back through the stages and the
  router like any other call (the gate still applies; nothing of it is cached or batched).

Passing a call through untouched (the model server's other APIs) also goes through here, so no front
holds an upstream client. What the edge learns on the way (a failing model server, a restriction key
the server names, a model loaded through the data port) goes to the control plane as observations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

from ..calls import Answer, Call, GrpcAnswer, HttpAnswer, HttpWire, Memo, Reply, Wire
from ..errors import DecodeError
from ..mesh.load import LoadTracker
from ..pipeline.stage import Next
from ..planes import Observations
from ..protocols import forwarded
from ..protocols.request import InferenceRequest
from ..upstream.h1 import H1Stream
from ..upstream.router import UpstreamRouter

Encoder = Callable[[Call, Reply], Answer]  # ValueError (or DecodeError) when the answer cannot take the form
MetaPair = tuple[str | bytes, str | bytes]
_CREDENTIALS = frozenset({"authorization", "cookie", b"authorization", b"cookie"})
_CACHE_CONTROL = frozenset({"cache-control", b"cache-control"})


class Edge:
    def __init__(self, pipeline: Next, router: UpstreamRouter, observations: Observations, load: LoadTracker,
                 rules: forwarded.Rules, scope_header: str, default_timeout: float) -> None:
        self.pipeline = pipeline
        self.router = router
        self.observations = observations
        self.load = load
        self.rules = rules
        self.scope_header = scope_header.lower()
        self._scope_names: frozenset[str | bytes] = (
            frozenset({self.scope_header, self.scope_header.encode("latin-1")}) if self.scope_header else frozenset())
        self.default_timeout = default_timeout
        # Request ids: a random per-process prefix and a counter; unique without a syscall per call.
        self._id_prefix = os.urandom(8).hex()
        self._ids = itertools.count()

    def __repr__(self) -> str:
        return f"<Edge in_flight={self.load.total} {self.rules!r}>"

    def new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):016x}"

    # -- building the call ---------------------------------------------------------------------------------

    def call(self, request: InferenceRequest | None, fallback: InferenceRequest, wire: Wire, request_id: str,
             deadline: float, route: str, origin: str, headers: Iterable[MetaPair], memo: Memo | None = None) -> Call:
        """A call of ``request`` (None: the codecs could not model it, so ``fallback`` names it and it goes
        upstream untouched); ``headers`` are the caller's HTTP headers or gRPC metadata, names lower case
        for gRPC, as sent for HTTP."""
        modelled = request is not None
        call = Call(request if request is not None else fallback, request_id, deadline, wire, modelled, route,
                    origin)
        call.memo = memo
        scope = self._scope_names
        for key, value in headers:
            name = key.lower()  # bytes (HTTP, as sent) or str (gRPC metadata): each set holds both forms
            if name in _CACHE_CONTROL:
                tokens = {t.split("=")[0].strip().lower() for t in _text(value).split(",")}
                call.no_store = "no-store" in tokens
                call.no_cache = "no-cache" in tokens
            elif name in _CREDENTIALS:
                call.private = True
            if name in scope:
                call.scope = value if isinstance(value, bytes) else value.encode()
        if self.rules.active:
            # As the server will read them: the headers as they go upstream.
            if isinstance(wire, HttpWire):
                call.context = self.rules.http_context(wire.headers)
            else:
                call.context = self.rules.grpc_context(wire.metadata)
        return call

    # -- running it ----------------------------------------------------------------------------------------

    async def run(self, call: Call, encode: Encoder) -> tuple[Answer, str]:
        """``call`` through the stages: (the answer for its caller, the cache's verdict)."""
        model = call.request.model
        self.load.begin(model)
        try:
            reply = await self.pipeline(call)
            return await self._resolve(call, reply, encode), reply.cache
        finally:
            self.load.end(model)

    async def _resolve(self, call: Call, reply: Reply, encode: Encoder) -> Answer:
        own = reply.raw_for(call)
        if own is None and not reply.ok:
            own = reply.wire  # an error answer to this very request (a batch member retried alone, say)
        if own is not None and _same_protocol(own, call):
            self._learn(own)
            return own
        if reply.ok:
            with contextlib.suppress(ValueError, DecodeError):
                return encode(call, reply)
        # The model server answers this caller itself: untouched, through the stages and the router.
        again = dataclasses.replace(call, modelled=False, memo=None)
        answer = (await self.pipeline(again)).raw_for(again)
        if answer is None or not _same_protocol(answer, again):
            raise AssertionError("an untouched call is answered by the model server itself")
        self._learn(answer)
        return answer

    def _learn(self, answer: Answer) -> None:
        """A refusal that names a restriction key the sidecar was not told of goes to the control plane."""
        if isinstance(answer, HttpAnswer):
            if answer.status == 403:
                header = forwarded.HTTP_RESTRICTED.search(answer.body)
                if header is not None and header.group(1).lower() != self.rules.http_learned:
                    self.observations.restriction_named(header.group(1).lower(), b"")
        elif answer.code == "UNAVAILABLE":
            key = forwarded.GRPC_RESTRICTED.search(answer.details)
            if key is not None and key.group(1).encode() != self.rules.grpc_learned:
                self.observations.restriction_named(b"", key.group(1).encode())

    # -- passing through -----------------------------------------------------------------------------------

    def stream_http(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                    body: AsyncIterable[bytes] | None, content_length: int | None
                    ) -> contextlib.AbstractAsyncContextManager[H1Stream]:
        """Any other HTTP call, streamed both ways, untouched."""
        return self.router.http.stream(method, target, headers, body, content_length)

    async def fetch_http(self, target: bytes) -> HttpAnswer:
        """A small bodiless GET of the model server's (TF Serving's model status)."""
        return await self.router.http.fetch(target)

    async def relay_grpc(self, method: str, message: bytes, metadata: tuple[tuple[str, str | bytes], ...],
                         timeout: float | None, deadline: float | None) -> GrpcAnswer:
        """A unary gRPC call passed through, bytes for bytes."""
        return await self.router.grpc.relay(method, message, metadata, timeout, deadline)

    def relay_grpc_stream(self, method: str, kind: str, request: Any, metadata: tuple[tuple[str, str | bytes], ...],
                          timeout: float | None) -> Any:
        """A streaming gRPC call passed through: the upstream call object (an async iterator of messages)."""
        return self.router.grpc.streaming(method, kind)(request, metadata=metadata, timeout=timeout)

    def grpc_error(self, e: Any, deadline: float | None) -> GrpcAnswer:
        """A relayed gRPC call's error status as the server's answer (raises for a failed transport)."""
        return self.router.grpc.error_answer(e, deadline)

    def model_changed(self, model: str) -> None:
        self.observations.model_changed(model)

    def upstream_failed(self) -> None:
        self.observations.upstream_failed()


def _same_protocol(answer: Answer, call: Call) -> bool:
    return isinstance(answer, HttpAnswer) == isinstance(call.wire, HttpWire)


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("latin-1")

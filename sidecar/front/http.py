"""The HTTP data port: speaks the model server's own REST protocol.

Inference calls are decoded into the canonical request and run through the stage pipeline; a call
the codecs cannot model goes through the same gate but reaches the model server untouched; every
other path is streamed through both ways. Every decision is taken on the raw path the model server
will receive. Errors from anywhere become ``{"error": "..."}`` here, and only here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from .. import logs
from ..config import Config
from ..errors import (
    ClientClosed,
    DecodeError,
    Forbidden,
    PayloadTooLarge,
    SidecarError,
    UpstreamUnavailable,
)
from ..headers import REQUEST_ID, Header, end_to_end
from ..loading.book import ModelBook
from ..mesh.envoy import ORCA_FORMAT, DataPortSignals
from ..metrics import Metrics
from ..pipeline.stage import Call, HttpAnswer, HttpWire, Next, Reply
from ..protocols import dispatch, forwarded, tfserving_rest
from ..protocols.request import InferenceRequest
from ..state import State, StateMachine
from ..upstream.http import HttpUpstream
from . import restrict
from .budget import Lease, MemoryBudget
from .decoding import RequestDecoder
from .h1server import H1Server, Request, Responder, ServerLimits

log = logging.getLogger("sidecar.http")

STATE_HEADER = b"x-sidecar-state"
CACHE_HEADER = b"x-sidecar-cache"
_STATE_VALUES = {s: s.value.encode() for s in State}
_JSON_HEADERS = [(b"Content-Type", b"application/json")]
_MODEL_READY = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/ready")
_TF_STATUS = re.compile(r"/v1/models/([^/:]+)(?:/versions/[^/:]+|/labels/[^/:]+)?")
_METHODS_REFUSED = frozenset({"CONNECT"})
_MEMO_ANSWER = 4096  # an encoded cache hit kept for the next identical request, up to this size
_REPOSITORY_ACTION = re.compile(r"/v2/repository/models/([^/]+)/(?:load|unload)")


def error_answer(err: SidecarError) -> tuple[int, list[Header], bytes]:
    """The upstream's own error shape, ``{"error": "..."}``, with Retry-After where one applies."""
    import orjson

    headers = list(_JSON_HEADERS)
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        headers.append((b"Retry-After", b"%d" % max(1, round(retry_after))))
    status = 400 if err.http_status == 499 else err.http_status
    return status, headers, orjson.dumps({"error": err.message})


class HttpFront:
    def __init__(self, cfg: Config, upstream: HttpUpstream, pipeline: Next, metrics: Metrics,
                 machine: StateMachine, decoder: RequestDecoder, budget: MemoryBudget,
                 on_upstream_down: Callable[[], None] | None = None,
                 on_model_reload: Callable[[str], Coroutine[Any, Any, object]] | None = None,
                 rules: forwarded.Rules | None = None, on_rules_changed: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.upstream = upstream
        self.on_model_reload = on_model_reload
        self.book: ModelBook | None = None  # per-model readiness, when the composition root provides it
        self.scope_header = cfg.cache.scope_header.lower().encode()
        self._background: set[asyncio.Task[object]] = set()
        self.pipeline = pipeline
        self.metrics = metrics
        self.machine = machine
        self.decoder = decoder
        self.budget = budget
        self.on_upstream_down = on_upstream_down
        self.restrictions = restrict.parse(cfg.restricted_api)
        # What the model server turns into model parameters or checks as a key (shared with the gRPC port).
        self.rules = rules or forwarded.Rules()
        self.on_rules_changed = on_rules_changed
        self.in_flight = 0
        # Envoy's answer headers, and per-model load for ORCA reports and the autoscaler gauges.
        self.mesh = DataPortSignals(cfg.mesh, machine)
        # Request ids: a random per-process prefix and a counter; unique without a syscall per call.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()

    def __repr__(self) -> str:
        return f"<HttpFront in_flight={self.in_flight} {self.budget!r}>"

    def server(self, max_connections: int) -> H1Server:
        return H1Server(self.handle, ServerLimits.from_config(self.cfg.limits, max_connections),
                        on_event=self.metrics.count_http_event)

    # -- one request ---------------------------------------------------------------------------------

    async def handle(self, req: Request, out: Responder) -> None:
        started = time.perf_counter()
        given_id = req.header(REQUEST_ID)
        request_id = given_id.decode("latin-1") if given_id else self._new_id()
        id_token = logs.REQUEST_ID.set(request_id)  # log lines of this call say which call
        route = dispatch.match(req.path) if req.method == "POST" else None
        label = route.method if route else dispatch.route_label(req.path)
        model = route.model if route else ""
        self.in_flight += 1
        if route is not None:
            self.mesh.load.begin(model)
        status = 0
        try:
            self._check_allowed(req)
            if route is not None:
                status = await self._infer(req, out, route, request_id)
            elif req.method == "GET" and (answer := await self._not_ready_answer(req)) is not None:
                status = self._send(out, request_id, *answer)
            else:
                status = await self._pass_through(req, out, request_id)
        except ClientClosed:
            status = 499
        except SidecarError as err:
            status = self._fail(out, request_id, err, label)
        finally:
            logs.REQUEST_ID.reset(id_token)  # a keep-alive connection serves its next call in this same task
            self.in_flight -= 1
            if route is not None:
                self.mesh.load.end(model)
            self.metrics.observe_request(label, model, status or 499, time.perf_counter() - started)

    def _fail(self, out: Responder, request_id: str, err: SidecarError, label: str) -> int:
        if isinstance(err, UpstreamUnavailable) and self.on_upstream_down is not None:
            self.on_upstream_down()
        if out.started:
            out.abort()  # headers are gone already: cutting the connection is the only honest signal
            return err.http_status
        status, headers, body = error_answer(err)
        if isinstance(err, Forbidden):
            headers = [(b"Content-Type", b"text/plain")]  # Triton's own 403 says text/plain
            body = err.message.encode()
        elif isinstance(err, _MethodNotAllowed):
            headers = [(b"Content-Type", b"text/plain")]  # so does its 405, though the body is JSON
        if status in (408, 413):
            out.close_after = True  # the rest of the body may still be on its way
        return self._send(out, request_id, status, headers, body)

    def _check_allowed(self, req: Request) -> None:
        if req.method in _METHODS_REFUSED:
            raise _MethodNotAllowed("Method Not Allowed")
        # The first value counts, as in Triton (evhtp_kv_find): a second one must not get a caller through.
        refused = restrict.refusal(self.restrictions, req.path, lambda name: next(iter(req.header_values(name)), None))
        if refused is not None:
            raise Forbidden(refused.decode())

    def _send(self, out: Responder, request_id: str, status: int, headers: list[Header], body: bytes,
              reason: bytes = b"", cache: str = "") -> int:
        headers.append((b"x-request-id", request_id.encode("latin-1")))
        headers.append((STATE_HEADER, _STATE_VALUES[self.machine.state]))
        if cache:
            headers.append((CACHE_HEADER, cache.encode()))
        self.mesh.stamp(headers, out.request.header(ORCA_FORMAT))
        out.send(status, headers, body, reason)
        return status

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    # -- inference -----------------------------------------------------------------------------------

    async def _infer(self, req: Request, out: Responder, route: dispatch.InferenceRoute, request_id: str) -> int:
        lease = Lease(self.budget)
        try:
            body = await self._read_body(req, lease)
            call = await self._call(req, route, body, request_id)
            reply = await self.pipeline(call)
            return await self._answer(out, call, reply, request_id)
        finally:
            lease.release()

    async def _read_body(self, req: Request, lease: Lease) -> bytes:
        limit = self.cfg.limits.max_body_bytes
        if req.content_length is not None:
            if req.content_length > limit:
                raise PayloadTooLarge(f"request body of {req.content_length} bytes exceeds the limit of {limit}")
            lease(req.content_length)  # before the body is asked for: a refused client never sends it
            return await req.body.read(limit)
        return await req.body.read(limit, lease)

    async def _call(self, req: Request, route: dispatch.InferenceRoute, body: bytes, request_id: str) -> Call:
        modelled = True
        memo = None
        try:
            memo = await self.decoder.decode(route, body, req.header_values(dispatch.HEADER_LENGTH),
                                             req.header_values(b"content-encoding"))
            canonical = memo.request
        except DecodeError:
            # Valid or not, the model server answers it as it always does; the sidecar only stays out of the way.
            # (The codec's reason is not logged: it can quote the body's field names.)
            self.metrics.unmodelled.labels(route.protocol.value).inc()
            canonical = InferenceRequest(route.protocol, route.model, route.version, route.method)
            modelled = False
        wire = HttpWire(req.target, tuple(_forward_headers(req, request_id)), body)
        deadline = req.arrived + self.cfg.upstream.timeout
        call = Call(canonical, request_id, deadline, wire, modelled, route.method, "http")
        call.memo = memo
        if self.rules.active:
            call.context = self.rules.http_context(wire.headers)  # as the server will read them
        directives = req.header(b"cache-control")
        if directives is not None:
            tokens = {t.split(b"=")[0].strip().lower() for t in directives.split(b",")}
            call.no_store = b"no-store" in tokens
            call.no_cache = b"no-cache" in tokens
        call.private = req.header(b"authorization") is not None or req.header(b"cookie") is not None
        if self.scope_header:
            call.scope = req.header(self.scope_header) or b""
        return call

    async def _answer(self, out: Responder, call: Call, reply: Reply, request_id: str) -> int:
        raw = reply.raw_for(call)
        if raw is None and not reply.ok:
            raw = reply.wire  # an error answer shared with this caller (same call)
        if not isinstance(raw, HttpAnswer):
            if reply.ok:
                try:
                    headers, body = self._encoded(call, reply)
                    return self._send(out, request_id, 200, headers, body, b"", reply.cache)
                except ValueError:
                    pass
            # An answer that cannot take this caller's form (or an error in another protocol's shape):
            # the model server answers this caller itself.
            reply = await self.upstream.send(call)
            raw = reply.raw_for(call)
            assert isinstance(raw, HttpAnswer)
        if raw.status == 403 and self.rules.learn_http(raw.body) and self.on_rules_changed is not None:
            self.on_rules_changed()  # the server restricts inference by a key the sidecar did not know of
        headers = [h for h in raw.headers if h[0].lower() != REQUEST_ID]
        return self._send(out, request_id, raw.status, headers, raw.body, raw.reason, reply.cache)

    @staticmethod
    def _encoded(call: Call, reply: Reply) -> tuple[list[Header], bytes]:
        """The canonical answer in this caller's form; a cache hit for bytes seen before reuses the encoding
        made for them (the same request object and the same response object encode the same)."""
        response = reply.response()
        memo = call.memo if call.memo is not None and call.memo.request is call.request else None
        if memo is not None and memo.answer is not None and memo.answer[0] is response:
            headers, body = memo.answer[1]
            return list(headers), body
        headers, body = dispatch.encode_answer(call.request, response)
        if memo is not None and reply.cache == "hit" and len(body) <= _MEMO_ANSWER:
            memo.answer = (response, (tuple(headers), body))
        return headers, body

    # -- readiness paths while not warm --------------------------------------------------------------

    async def _not_ready_answer(self, req: Request) -> tuple[int, list[Header], bytes] | None:
        """The model server's own readiness paths, answered "not ready" until the pod is warm; a model's
        own path follows that model's state (warm or not) once the sidecar tracks it, not the pod's."""
        path = req.path
        if path == "/v2/health/ready":
            return None if self.machine.ready else (400, [(b"Content-Type", b"text/plain")], b"")  # Triton's
        model = _MODEL_READY.fullmatch(path) or _TF_STATUS.fullmatch(path)
        if model is None or self._model_ready(model.group(1)):
            return None
        if path.startswith("/v2/"):
            return 400, list(_JSON_HEADERS), b'{"error":"Model version not ready"}'
        status, body = await self._tf_status(req)
        return status, list(_JSON_HEADERS), body

    def _model_ready(self, model: str) -> bool:
        tracked = self.book.ready(model) if self.book is not None else None
        return self.machine.ready if tracked is None else tracked

    async def _tf_status(self, req: Request) -> tuple[int, bytes]:
        """TF Serving's model status, shown not ready while the pod warms."""
        answer = await self.upstream.fetch(req.target)
        body = tfserving_rest.status_not_ready(answer.body) if answer.status == 200 else answer.body
        return answer.status, body

    # -- everything else, streamed -------------------------------------------------------------------

    async def _pass_through(self, req: Request, out: Responder, request_id: str) -> int:
        limit = self.cfg.limits.max_body_bytes
        if req.content_length is not None and req.content_length > limit:
            raise PayloadTooLarge(f"request body of {req.content_length} bytes exceeds the limit of {limit}")
        body: AsyncIterator[bytes] | None = None
        if req.content_length or req.chunked:
            body = req.body.stream(limit)
        headers = _forward_headers(req, request_id)
        async with self.upstream.stream(req.method, req.target, headers, body, req.content_length) as up:
            response_headers = [h for h in end_to_end(up.headers) if h[0].lower() != REQUEST_ID]
            response_headers.append((b"x-request-id", request_id.encode("latin-1")))
            response_headers.append((STATE_HEADER, _STATE_VALUES[self.machine.state]))
            self.mesh.stamp(response_headers, req.header(ORCA_FORMAT))
            length = up.content_length if up.has_body else _declared_length(up.headers)
            out.start(up.status, response_headers, length=length, chunked=up.chunked, reason=up.reason)
            async for chunk in up:
                await out.write(chunk)
            out.end(list(up.trailers))
        if up.status == 200 and req.method == "POST":
            self._repository_changed(req.path)
        return up.status

    def _repository_changed(self, path: str) -> None:
        """A model loaded or unloaded through this port (the repository API): its cached answers go now,
        even when the version did not change (a reload of new files under the same version)."""
        match = _REPOSITORY_ACTION.fullmatch(path)
        if match is not None and self.on_model_reload is not None:
            task: asyncio.Task[object] = asyncio.get_running_loop().create_task(self.on_model_reload(match.group(1)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)


class _MethodNotAllowed(SidecarError):
    http_status = 405
    grpc_code = "UNIMPLEMENTED"


def _declared_length(headers: list[Header]) -> int | None:
    """The Content-Length an answer without a body (HEAD, 204, 304) declares: it goes back as it came."""
    for k, v in headers:
        if k.lower() == b"content-length" and v.strip().isdigit():
            return int(v)
    return None


def _forward_headers(req: Request, request_id: str) -> list[Header]:
    headers = [h for h in end_to_end(req.headers) if h[0].lower() != REQUEST_ID]
    headers.append((b"x-request-id", request_id.encode("latin-1")))
    return headers

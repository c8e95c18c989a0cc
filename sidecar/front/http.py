"""The HTTP data port: speaks the model server's own REST protocol; only parses and writes its wire.

An inference call is decoded into the canonical request and handed to the edge (``front/edge.py``),
which runs it through the stages and says what to answer; a call the codecs cannot model goes through
the same edge untouched. Every other path is streamed through both ways (by the edge as well). Every
decision is taken on the raw path the model server will receive. Errors from anywhere become the
upstream's shape here (``errors.refusal`` says which status and words).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator

import orjson

from .. import logs
from ..calls import Call, HttpAnswer, HttpWire, Reply
from ..config import Config
from ..errors import (
    ClientClosed,
    DecodeError,
    Forbidden,
    MethodNotAllowed,
    PayloadTooLarge,
    SidecarError,
    UpstreamUnavailable,
    refusal,
)
from ..headers import REQUEST_ID, Header, end_to_end
from ..mesh.envoy import ORCA_FORMAT, DataPortSignals
from ..metrics import Metrics
from ..planes import View
from ..protocols import dispatch, restrict, tfserving_rest
from ..protocols.request import InferenceRequest
from ..state import State
from .budget import Lease, MemoryBudget
from .decoding import RequestDecoder
from .edge import Edge
from .h1server import H1Server, Request, Responder, ServerLimits

log = logging.getLogger("sidecar.http")

STATE_HEADER = b"x-sidecar-state"
CACHE_HEADER = b"x-sidecar-cache"
_STATE_VALUES = {s: s.value.encode() for s in State}
_JSON_HEADERS = [(b"Content-Type", b"application/json")]
_TEXT_HEADERS = [(b"Content-Type", b"text/plain")]
_MODEL_READY = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/ready")
_TF_STATUS = re.compile(r"/v1/models/([^/:]+)(?:/versions/[^/:]+|/labels/[^/:]+)?")
_METHODS_REFUSED = frozenset({"CONNECT"})
_MEMO_ANSWER = 4096  # an encoded cache hit kept for the next identical request, up to this size
_REPOSITORY_ACTION = re.compile(r"/v2/repository/models/([^/]+)/(?:load|unload)")


class HttpFront:
    def __init__(self, cfg: Config, edge: Edge, view: View, metrics: Metrics, decoder: RequestDecoder,
                 budget: MemoryBudget, signals: DataPortSignals) -> None:
        self.cfg = cfg
        self.edge = edge
        self.view = view
        self.metrics = metrics
        self.decoder = decoder
        self.budget = budget
        self.mesh = signals  # Envoy's answer headers, from the same load the autoscaler gauges read
        self.restrictions = restrict.parse(cfg.restricted_api)
        self.in_flight = 0

    def __repr__(self) -> str:
        return f"<HttpFront in_flight={self.in_flight} {self.budget!r}>"

    def server(self, max_connections: int) -> H1Server:
        return H1Server(self.handle, ServerLimits.from_config(self.cfg.limits, max_connections),
                        on_event=self.metrics.count_http_event)

    # -- one request ---------------------------------------------------------------------------------

    async def handle(self, req: Request, out: Responder) -> None:
        started = time.perf_counter()
        given_id = req.header(REQUEST_ID)
        request_id = given_id.decode("latin-1") if given_id else self.edge.new_id()
        id_token = logs.REQUEST_ID.set(request_id)  # log lines of this call say which call
        route = dispatch.match(req.path) if req.method == "POST" else None
        label = route.method if route else dispatch.route_label(req.path)
        self.in_flight += 1
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
            status = self._fail(out, request_id, err)
        finally:
            logs.REQUEST_ID.reset(id_token)  # a keep-alive connection serves its next call in this same task
            self.in_flight -= 1
            self.metrics.observe_request(label, route.model if route else "", status or 499,
                                         time.perf_counter() - started)

    def _fail(self, out: Responder, request_id: str, err: SidecarError) -> int:
        if isinstance(err, UpstreamUnavailable):
            self.edge.upstream_failed()
        if out.started:
            out.abort()  # headers are gone already: cutting the connection is the only honest signal
            return err.http_status
        r = refusal(err)
        if r.text:  # Triton's own 403 and 405 say text/plain (its 403 body is the words alone)
            headers = list(_TEXT_HEADERS)
            body = r.message.encode() if r.http_status == 403 else orjson.dumps({"error": r.message})
        else:
            headers, body = list(_JSON_HEADERS), orjson.dumps({"error": r.message})
        if r.retry_after is not None:
            headers.append((b"Retry-After", b"%d" % r.retry_after))
        if r.close:
            out.close_after = True  # the rest of the body may still be on its way
        return self._send(out, request_id, r.http_status, headers, body)

    def _check_allowed(self, req: Request) -> None:
        if req.method in _METHODS_REFUSED:
            raise MethodNotAllowed("Method Not Allowed")
        # The first value counts, as in Triton (evhtp_kv_find): a second one must not get a caller through.
        refused = restrict.refusal(self.restrictions, req.path, lambda name: next(iter(req.header_values(name)), None))
        if refused is not None:
            raise Forbidden(refused.decode())

    def _send(self, out: Responder, request_id: str, status: int, headers: list[Header], body: bytes,
              reason: bytes = b"", cache: str = "") -> int:
        headers.append((b"x-request-id", request_id.encode("latin-1")))
        headers.append((STATE_HEADER, _STATE_VALUES[self.view.snapshot.state]))
        if cache:
            headers.append((CACHE_HEADER, cache.encode()))
        self.mesh.stamp(headers, out.request.header(ORCA_FORMAT))
        out.send(status, headers, body, reason)
        return status

    # -- inference -----------------------------------------------------------------------------------

    async def _infer(self, req: Request, out: Responder, route: dispatch.InferenceRoute, request_id: str) -> int:
        lease = Lease(self.budget)
        try:
            body = await self._read_body(req, lease)
            call = await self._call(req, route, body, request_id)
            answer, cache = await self.edge.run(call, self._encode)
            assert isinstance(answer, HttpAnswer)
            headers = [h for h in answer.headers if h[0].lower() != REQUEST_ID]
            return self._send(out, request_id, answer.status, headers, answer.body, answer.reason, cache)
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
        memo = None
        request: InferenceRequest | None = None
        try:
            memo = await self.decoder.decode(route, body, req.header_values(dispatch.HEADER_LENGTH),
                                             req.header_values(b"content-encoding"))
            request = memo.request
        except DecodeError:
            # Valid or not, the model server answers it as it always does; the sidecar only stays out of the way.
            # (The codec's reason is not logged: it can quote the body's field names.)
            self.metrics.unmodelled.labels(route.protocol.value).inc()
        fallback = InferenceRequest(route.protocol, route.model, route.version, route.method)
        wire = HttpWire(req.target, tuple(_forward_headers(req, request_id)), body)
        return self.edge.call(request, fallback, wire, request_id, req.arrived + self.cfg.upstream.timeout,
                              route.method, "http", req.headers, memo)

    @staticmethod
    def _encode(call: Call, reply: Reply) -> HttpAnswer:
        """The canonical answer in this caller's form; a cache hit for bytes seen before reuses the encoding
        made for them (the same request object and the same response object encode the same)."""
        response = reply.response()
        memo = call.memo if call.memo is not None and call.memo.request is call.request else None
        if memo is not None and memo.answer is not None and memo.answer[0] is response:
            encoded: HttpAnswer = memo.answer[1]  # immutable: the same answer object serves every such hit
            return encoded
        headers, body = dispatch.encode_answer(call.request, response)
        answer = HttpAnswer(200, b"", tuple(headers), body)
        if memo is not None and reply.cache == "hit" and len(body) <= _MEMO_ANSWER:
            memo.answer = (response, answer)
        return answer

    # -- readiness paths while not warm --------------------------------------------------------------

    async def _not_ready_answer(self, req: Request) -> tuple[int, list[Header], bytes] | None:
        """The model server's own readiness paths, answered "not ready" until the pod is warm; a model's
        own path follows that model's state (warm or not) once the sidecar tracks it, not the pod's."""
        path = req.path
        snapshot = self.view.snapshot
        if path == "/v2/health/ready":
            return None if snapshot.ready else (400, list(_TEXT_HEADERS), b"")  # Triton's
        model = _MODEL_READY.fullmatch(path) or _TF_STATUS.fullmatch(path)
        if model is None:
            return None
        tracked = snapshot.model_ready(model.group(1))
        if (snapshot.ready if tracked is None else tracked):
            return None
        if path.startswith("/v2/"):
            return 400, list(_JSON_HEADERS), b'{"error":"Model version not ready"}'
        answer = await self.edge.fetch_http(req.target)  # TF Serving's model status, shown not ready
        body = tfserving_rest.status_not_ready(answer.body) if answer.status == 200 else answer.body
        return answer.status, list(_JSON_HEADERS), body

    # -- everything else, streamed -------------------------------------------------------------------

    async def _pass_through(self, req: Request, out: Responder, request_id: str) -> int:
        limit = self.cfg.limits.max_body_bytes
        if req.content_length is not None and req.content_length > limit:
            raise PayloadTooLarge(f"request body of {req.content_length} bytes exceeds the limit of {limit}")
        body: AsyncIterator[bytes] | None = None
        if req.content_length or req.chunked:
            body = req.body.stream(limit)
        headers = _forward_headers(req, request_id)
        async with self.edge.stream_http(req.method, req.target, headers, body, req.content_length) as up:
            response_headers = [h for h in end_to_end(up.headers) if h[0].lower() != REQUEST_ID]
            response_headers.append((b"x-request-id", request_id.encode("latin-1")))
            response_headers.append((STATE_HEADER, _STATE_VALUES[self.view.snapshot.state]))
            self.mesh.stamp(response_headers, req.header(ORCA_FORMAT))
            length = up.content_length if up.has_body else _declared_length(up.headers)
            out.start(up.status, response_headers, length=length, chunked=up.chunked, reason=up.reason)
            async for chunk in up:
                await out.write(chunk)
            out.end(list(up.trailers))
        if up.status == 200 and req.method == "POST":
            # A model loaded or unloaded through this port: its cached answers go now, even when its version
            # did not change (a reload of new files under the same version).
            match = _REPOSITORY_ACTION.fullmatch(req.path)
            if match is not None:
                self.edge.model_changed(match.group(1))
        return up.status


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

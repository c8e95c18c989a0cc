"""The HTTP data port: speaks the model server's own REST protocol.

Inference calls are decoded into the canonical request and run through the
stage pipeline; everything else is passed through, streamed both ways. Errors
from anywhere become ``{"error": "..."}`` here, and only here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable

import orjson
from aiohttp import web

from ..config import Config
from ..errors import DecodeError, PayloadTooLarge, SidecarError, UpstreamUnavailable
from ..headers import REQUEST_ID, end_to_end
from ..metrics import Metrics
from ..pipeline.stage import Call, Next, Reply
from ..pipeline.upstream import UpstreamClient
from ..protocols import dispatch, tfserving_rest
from ..state import StateMachine

log = logging.getLogger("sidecar.http")

BINARY_HEADER = "inference-header-content-length"
STATE_HEADER = "x-sidecar-state"
_MODEL_READY = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/ready")
_TF_STATUS = re.compile(r"/v1/models/[^/:]+(?:/versions/[^/:]+|/labels/[^/:]+)?")
STREAM_CHUNK = 256 * 1024


class InFlight:
    """Counts requests being handled, so SIGTERM can wait for them to finish."""

    def __init__(self, metrics: Metrics) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._metrics = metrics

    def __repr__(self) -> str:
        return f"<InFlight {self.count}>"

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()
        self._metrics.in_flight.inc()

    def leave(self) -> None:
        self.count -= 1
        self._metrics.in_flight.dec()
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


def error_response(err: SidecarError) -> web.Response:
    headers = {"Content-Type": "application/json"}
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return web.Response(status=err.http_status, body=orjson.dumps({"error": err.message}), headers=headers)


class HttpFront:
    def __init__(
        self,
        cfg: Config,
        client: UpstreamClient,
        pipeline: Next,
        metrics: Metrics,
        in_flight: InFlight,
        machine: StateMachine,
        on_upstream_down: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.pipeline = pipeline
        self.metrics = metrics
        self.in_flight = in_flight
        self.machine = machine
        self.on_upstream_down = on_upstream_down
        # Request ids: a random per-process prefix and a counter; unique without a syscall per call.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    def server(self) -> web.Server:
        """aiohttp's low-level server: one handler for every path, no router or middleware in the way."""
        return web.Server(self.handle, access_log=None)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get(REQUEST_ID) or self._new_id()
        route = dispatch.match(request.path) if request.method == "POST" else None
        label = route.method if route else dispatch.route_label(request.path)
        model = route.model if route else ""
        self.in_flight.enter()
        status = 500
        try:
            if route is not None:
                response: web.StreamResponse = await self._infer(request, route, request_id)
            elif request.method == "GET" and not self.machine.ready and (
                    answer := await self._not_ready_answer(request)) is not None:
                response = answer
            else:
                response = await self._pass_through(request, request_id)
            status = response.status
            return self._stamp(response, request_id)
        except SidecarError as err:
            if isinstance(err, UpstreamUnavailable) and self.on_upstream_down is not None:
                self.on_upstream_down()
            if isinstance(err, DecodeError):
                self.metrics.decode_errors.labels(label).inc()
            status = err.http_status
            return self._stamp(error_response(err), request_id)
        except Exception:
            # A bug here must still answer in the upstream's error shape; the log holds the
            # traceback (never the payload).
            log.exception("internal error handling %s %s", request.method, request.path)
            return self._stamp(error_response(SidecarError("internal sidecar error")), request_id)
        finally:
            self.in_flight.leave()
            self.metrics.observe_request(label, model, status, time.perf_counter() - started)

    def _stamp(self, response: web.StreamResponse, request_id: str) -> web.StreamResponse:
        """The sidecar's own headers; the state is read as the response goes out."""
        if not response.prepared:
            response.headers[REQUEST_ID] = request_id
            response.headers[STATE_HEADER] = self.machine.state.value
        return response

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        limit = self.cfg.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {limit}")
        if request.content_length is not None:
            try:
                return await request.content.readexactly(request.content_length)
            except asyncio.IncompleteReadError:
                raise DecodeError("request body is shorter than its Content-Length") from None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _infer(self, request: web.BaseRequest, route: dispatch.InferenceRoute, request_id: str) -> web.Response:
        body = await self._read_body(request)
        header_length = _header_length(request.headers.get(BINARY_HEADER))
        canonical = dispatch.decode(route, body, header_length)
        headers = _forward_headers(request, request_id)
        call = Call(
            request=canonical,
            path=request.path,
            query=request.query_string,
            headers=tuple(headers),
            body=body,
            request_id=request_id,
            deadline=asyncio.get_running_loop().time() + self.cfg.upstream.timeout,
            route=route.method,
        )
        reply = await self.pipeline(call)
        return _to_response(reply)

    async def _not_ready_answer(self, request: web.BaseRequest) -> web.StreamResponse | None:
        """The model server's own readiness paths, answered "not ready" until the pod is warm."""
        path = request.path
        if path == "/v2/health/ready":
            return web.Response(status=400)  # Triton: 400 with an empty body when not ready
        if _MODEL_READY.fullmatch(path):
            return web.Response(status=400, body=b'{"error":"Model version not ready"}',
                                content_type="application/json")
        if _TF_STATUS.fullmatch(path):
            return await self._tf_status_not_ready(request)
        return None

    async def _tf_status_not_ready(self, request: web.BaseRequest) -> web.StreamResponse:
        """TF Serving's model status, shown not ready while the pod warms."""
        async with self.client.open_stream("GET", request.path_qs, [], None) as upstream:
            body = await upstream.read()
            reply = Reply(upstream.status, end_to_end(upstream.headers.items()), tfserving_rest.status_not_ready(body))
        return _to_response(reply)

    async def _pass_through(self, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        limit = self.cfg.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {limit}")
        body = _limited(request, limit) if request.body_exists else None
        headers = _forward_headers(request, request_id)
        if request.content_length is not None:
            headers.append(("Content-Length", str(request.content_length)))
        async with self.client.open_stream(request.method, request.path_qs, headers, body) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in end_to_end(upstream.headers.items()):
                response.headers.add(k, v)
            self._stamp(response, request_id)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(STREAM_CHUNK):
                    await response.write(chunk)
            except SidecarError:
                raise
            except Exception as e:
                # Headers are gone already: the only honest signal left is to cut the connection.
                log.warning("upstream stream broke after headers (%s); closing client connection", type(e).__name__)
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            return response


async def _limited(request: web.BaseRequest, limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in request.content.iter_chunked(STREAM_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        yield chunk


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.strip().isdigit():
        raise DecodeError(f"Inference-Header-Content-Length: expected a non-negative integer, got {value!r}")
    return int(value)


def _forward_headers(request: web.BaseRequest, request_id: str) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in end_to_end(request.headers.items()) if k.lower() != REQUEST_ID]
    headers.append((REQUEST_ID, request_id))
    return headers


def _to_response(reply: Reply) -> web.Response:
    response = web.Response(status=reply.status, reason=reply.reason or None, body=reply.body)
    # web.Response sets its own Content-Type; the upstream's must win unchanged.
    response.headers.popall("Content-Type", None)
    for k, v in reply.headers:
        response.headers.add(k, v)
    return response

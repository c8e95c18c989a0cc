"""The model server over HTTP: the pipeline's terminal, the raw pass-through stream, health probes.

One HTTP/1.1 client (``upstream/h1.py``) serves all three; probes get a small pool of their own so a
saturated data path can never make the model server look dead. The client's exceptions never leave
this module: they become UpstreamUnavailable or UpstreamTimeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Any

import orjson

from ..calls import Call, HttpAnswer, HttpWire, Reply
from ..config import UpstreamConfig
from ..errors import AnswerTooLarge, BadRequest, UpstreamTimeout, UpstreamUnavailable
from ..headers import Header, end_to_end
from ..metrics import Metrics
from ..protocols import dispatch, forwarded
from ..protocols.request import InferenceRequest
from .h1 import BodyTooLarge, ConnectionFailed, H1Pool, H1Stream

_PROBE_POOL_SIZE = 4


class HttpUpstream:
    def __init__(self, cfg: UpstreamConfig, metrics: Metrics, max_answer_bytes: int,
                 own_headers: Sequence[Header] = ()) -> None:
        self.cfg = cfg
        # Sent with the calls the sidecar builds itself (batches, warm-up): the inference API's key, when the
        # sidecar restricts it as the model server does.
        self.own_headers = tuple(own_headers)
        self.base = cfg.url.rstrip("/")
        self.metrics = metrics
        self.max_answer_bytes = max_answer_bytes
        self.pool = H1Pool(self.base, cfg.pool_size, cfg.connect_timeout)
        # A fresh connection per probe: Triton, once told to stop, refuses new connections but keeps
        # answering "ready" on open ones for up to its exit timeout (30 s), so a pooled probe would keep a
        # stopping server looking warm (and keep it from exiting).
        self.probes = H1Pool(self.base, _PROBE_POOL_SIZE, cfg.connect_timeout, keep_alive=False)

    def __repr__(self) -> str:
        return f"<HttpUpstream {self.base} data={self.pool!r} probes={self.probes!r}>"

    async def close(self) -> None:
        self.pool.close()
        self.probes.close()

    async def send(self, call: Call) -> Reply:
        """Pipeline terminal: the caller's own bytes (or the canonical request encoded), whole answer back."""
        wire = call.wire if isinstance(call.wire, HttpWire) else encode_wire(call.request, call.context,
                                                                               self.own_headers)
        started = time.perf_counter()
        try:
            r = await self.pool.request("POST", wire.target, wire.headers, wire.body, max_body=self.max_answer_bytes,
                                        deadline=call.deadline)
        except TimeoutError:
            self.metrics.upstream_errors.labels("timeout").inc()
            waited = round(time.perf_counter() - started, 1)
            raise UpstreamTimeout(f"model server did not answer within {waited:g} s (the call's deadline)") from None
        except ConnectionFailed as e:
            self.metrics.upstream_errors.labels("unavailable").inc()
            raise UpstreamUnavailable(f"model server unavailable: {e}") from None
        except BodyTooLarge:
            self.metrics.upstream_errors.labels("too_large").inc()
            raise AnswerTooLarge(f"model server answer exceeds {self.max_answer_bytes} bytes") from None
        except ValueError as e:  # the pool's last line of defence: nothing that could split a request
            raise BadRequest(f"request cannot be forwarded: {e}") from None
        self.metrics.observe_upstream(call.route, call.request.model, time.perf_counter() - started)
        if r.status == 200:
            self.metrics.learn_model(call.request.model)
        answer = HttpAnswer(r.status, r.reason, tuple(end_to_end(r.headers)), r.body)
        request, limit = call.request, self.max_answer_bytes
        return Reply(r.status, wire=answer, for_call=call,
                     decode=lambda: dispatch.decode_answer(request, answer.headers, answer.body, limit))

    @contextlib.asynccontextmanager
    async def stream(self, method: str, target: bytes, headers: Sequence[Header],
                     body: AsyncIterable[bytes] | bytes | None, content_length: int | None) -> AsyncIterator[H1Stream]:
        """Raw pass-through: the caller reads the answer's body from the stream itself. Bounded by
        ``upstream.passthrough_timeout`` only (0: none): a model load may rightly take minutes, and the
        server would finish it for a caller that waits."""
        limit = self.cfg.passthrough_timeout or None
        try:
            async with asyncio.timeout(limit) as deadline, self.pool.stream(
                method, target, headers, body, content_length=content_length
            ) as response:
                deadline.reschedule(None)  # headers are in; the body streams at the caller's pace
                yield response
        except TimeoutError:
            self.metrics.upstream_errors.labels("timeout").inc()
            raise UpstreamTimeout(f"model server did not answer within {limit:g} s") from None
        except ConnectionFailed as e:
            self.metrics.upstream_errors.labels("unavailable").inc()
            raise UpstreamUnavailable(f"model server unavailable: {e}") from None
        except ValueError as e:
            raise BadRequest(f"request cannot be forwarded: {e}") from None

    async def fetch(self, target: bytes | str, timeout: float | None = None, method: str = "GET") -> HttpAnswer:
        """A small bodiless call on the probes' pool, whole answer back; raises when nothing answers."""
        timeout = self.cfg.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                r = await self.probes.request(method, target, (), b"", max_body=self.max_answer_bytes)
        except TimeoutError:
            raise UpstreamTimeout(f"model server did not answer within {timeout:g} s") from None
        except (ConnectionFailed, BodyTooLarge) as e:
            raise UpstreamUnavailable(f"model server unavailable: {e}") from None
        return HttpAnswer(r.status, r.reason, tuple(end_to_end(r.headers)), r.body)

    async def probe(self, path: str, timeout: float, method: str = "GET") -> tuple[int, Any]:
        """A health/status call: (status, parsed JSON or None). Raises when nothing answers."""
        answer = await self.fetch(path, timeout, method)
        try:
            return answer.status, orjson.loads(answer.body) if answer.body else None
        except orjson.JSONDecodeError:
            return answer.status, None


def encode_wire(request: InferenceRequest, context: forwarded.Context = (),
                own_headers: Sequence[Header] = ()) -> HttpWire:
    """A canonical request in its protocol family's HTTP form (batches, the warm-up sweep, gRPC callers), with
    the headers of its context that reach the model (forwarded headers, a restriction key) and the sidecar's
    own (``HttpUpstream.own_headers``)."""
    target, headers, body = dispatch.encode_http(request)
    if context or own_headers:
        sent = forwarded.upstream_headers(context)
        taken = {name.lower() for name, _ in sent}
        headers = (*headers, *sent, *(h for h in own_headers if h[0].lower() not in taken))
    return HttpWire(target, headers, body)

"""The upstream client: one pooled aiohttp session to the model server.

It is the pipeline's terminal (``send``) and also serves the raw pass-through
path (``open_stream``) and health probes (``probe``). aiohttp's exceptions never
leave this module: they become UpstreamUnavailable or UpstreamTimeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import aiohttp

from ..config import UpstreamConfig
from ..errors import UpstreamTimeout, UpstreamUnavailable
from ..headers import end_to_end
from ..metrics import Metrics
from .h1client import ConnectionFailed, H1Pool, H1Response
from .stage import Call, Reply

# Errors that mean "the model server did not answer", as opposed to a bug here.
_UNAVAILABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)


class UpstreamClient:
    def __init__(self, cfg: UpstreamConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        # The inference hot path uses the lean pool; pass-through and probes use aiohttp.
        self.pool = H1Pool(self.base, cfg.pool_size, cfg.connect_timeout)

    def __repr__(self) -> str:
        conn = self._session.connector if self._session else None
        return f"<UpstreamClient {self.base} {self.pool!r} connector={conn!r}>"

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.cfg.pool_size, keepalive_timeout=30, enable_cleanup_closed=True, ttl_dns_cache=None
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes travel unchanged, compressed or not
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        self.pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient used before start()")
        return self._session

    def _timeout(self, deadline: float | None) -> aiohttp.ClientTimeout:
        total = self.cfg.timeout
        if deadline is not None:
            total = min(total, max(deadline - asyncio.get_running_loop().time(), 0.001))
        return aiohttp.ClientTimeout(total=total, connect=min(self.cfg.connect_timeout, total))

    async def send(self, call: Call) -> Reply:
        """Pipeline terminal: POST the call's bytes on the lean keep-alive pool, read the whole answer."""
        target = call.path + (f"?{call.query}" if call.query else "")
        timeout = min(self.cfg.timeout, call.deadline - asyncio.get_running_loop().time())
        started = time.perf_counter()
        try:
            async with asyncio.timeout(max(timeout, 0.001)):
                response = await self._post(target, list(call.headers), call.body)
        except TimeoutError:
            self.metrics.upstream_errors.labels("timeout").inc()
            raise UpstreamTimeout(f"model server did not answer within {timeout:g} s") from None
        except ConnectionFailed as e:
            self.metrics.upstream_errors.labels("unavailable").inc()
            raise UpstreamUnavailable(f"model server unavailable: {e}") from None
        self.metrics.observe_upstream(call.route, call.request.model, time.perf_counter() - started)
        return Reply(response.status, end_to_end(response.headers), response.body)

    async def _post(self, target: str, headers: list[tuple[str, str]], body: bytes) -> H1Response:
        try:
            return await self.pool.request("POST", target, headers, body)
        except ConnectionFailed as e:
            # A keep-alive connection the server closed while idle fails on first
            # use, before any answer: one retry on a fresh connection hides that race.
            if not e.reused or e.got_bytes:
                raise
            return await self.pool.request("POST", target, headers, body)

    @contextlib.asynccontextmanager
    async def open_stream(
        self,
        method: str,
        path_qs: str,
        headers: list[tuple[str, str]],
        body: AsyncIterable[bytes] | bytes | None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Raw pass-through: the caller streams the response body itself."""
        async with _mapped_errors(self.metrics, self.cfg.timeout), self.session.request(
            method, self.base + path_qs, data=body, headers=headers, timeout=self._timeout(None),
            allow_redirects=False,
        ) as resp:
            yield resp

    async def probe(self, path: str, timeout: float, method: str = "GET") -> tuple[int, Any]:
        """A health/status call without a body; (status, parsed JSON or None). Raises on no answer."""
        t = aiohttp.ClientTimeout(total=timeout)
        async with _mapped_errors(None, timeout), self.session.request(method, self.base + path, timeout=t) as resp:
            body = await resp.read()
        try:
            import orjson

            return resp.status, orjson.loads(body) if body else None
        except ValueError:
            return resp.status, None


@contextlib.asynccontextmanager
async def _mapped_errors(metrics: Metrics | None, timeout: float) -> AsyncIterator[None]:
    try:
        yield
    except TimeoutError:
        if metrics:
            metrics.upstream_errors.labels("timeout").inc()
        raise UpstreamTimeout(f"model server did not answer within {timeout:g} s") from None
    except _UNAVAILABLE as e:
        if metrics:
            metrics.upstream_errors.labels("unavailable").inc()
        raise UpstreamUnavailable(f"model server unavailable: {_describe(e)}") from None


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect to {e.host}:{e.port}"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "connection closed before a response"
    return type(e).__name__

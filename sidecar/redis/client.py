"""One Redis server, one connection policy, shared by every part of the sidecar that uses it.

Redis is an optimisation, never a dependency: every call runs within a deadline the caller names (a
cache read waits a few milliseconds, a store write a second), a failure or timeout is an answer of
"nothing" (None), never an exception, and after consecutive failures the breaker skips Redis for a
cooldown. The socket timeouts back the asyncio deadlines so a half-open TCP connection cannot hold a
pool slot for long; a broken connection is retried once at once (a restarted Redis), never with a
backoff that would blow a caller's budget; the pool reconnects by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .breaker import Breaker
from .urls import parse, redact

T = TypeVar("T")

CONNECT_TIMEOUT = 0.5
SOCKET_TIMEOUT = 1.0


class RedisClient:
    def __init__(self, url: str, breaker: Breaker, *, connect_timeout: float = CONNECT_TIMEOUT,
                 socket_timeout: float = SOCKET_TIMEOUT) -> None:
        self.url = redact(url)
        self.breaker = breaker
        self.errors: dict[str, int] = {}  # kind -> count: timeout, error, and what each user names
        self.redis, self._sentinels = connect(url, connect_timeout, socket_timeout)

    def __repr__(self) -> str:
        return f"<RedisClient {self.url} {self.breaker!r}>"

    async def run(self, what: str, call: Callable[[], Awaitable[T]], timeout: float) -> T | None:
        """``await call()`` within ``timeout`` seconds; None when the breaker is open or Redis fails (counted
        under ``what``)."""
        if not self.breaker.allow():
            return None
        probe = self.breaker.probing  # this call decides whether the breaker closes
        try:
            async with asyncio.timeout(timeout):
                result = await call()
        except TimeoutError:
            self.failed(f"{what}_timeout")
            return None
        except (RedisError, OSError):
            self.failed(what)
            return None
        except asyncio.CancelledError:
            # The caller left mid-call. Without an outcome the probe would never end, and the breaker would
            # stay half-open with no probe allowed for as long as the process lives.
            if probe:
                self.breaker.release()
            raise
        self.breaker.success()
        return result

    def failed(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.breaker.failure()

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(CONNECT_TIMEOUT + SOCKET_TIMEOUT):
                await self.redis.aclose()
                for sentinel in self._sentinels:
                    await sentinel.aclose()


def connect(url: str, connect_timeout: float = CONNECT_TIMEOUT,
            socket_timeout: float = SOCKET_TIMEOUT) -> tuple[Any, list[Any]]:
    """A client for what ``url`` names (``redis.urls``): one server, a Redis Cluster, or the master a group of
    Sentinels names; and the Sentinels' own clients, to close with it. ValueError for a URL that names none.

    Every kind gets the same policy: short socket timeouts, a broken connection retried once at once. A
    cluster re-reads its slots and a Sentinel master is asked for again when a node fails over."""
    target = parse(url)
    timeouts: dict[str, Any] = {"socket_connect_timeout": connect_timeout, "socket_timeout": socket_timeout}
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    if target.kind == "server":
        return aioredis.Redis.from_url(url, retry=retry, health_check_interval=0, **timeouts), []
    credentials: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.nodes]
        return RedisCluster(startup_nodes=nodes, ssl=target.tls, retry=retry,
                            **credentials, **timeouts), []
    sentinel_auth = {"password": target.sentinel_password or target.password, "username": target.username}
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs={**timeouts, **sentinel_auth, "ssl": target.tls},
                        ssl=target.tls, retry=retry, **credentials, **timeouts)  # type: ignore[no-untyped-call]
    return sentinel.master_for(target.service, db=target.db), list(sentinel.sentinels)


class RedisClients:
    """One client per Redis URL: the cache tier, the traffic store and the history share a server's
    connections and its breaker when they share the URL."""

    def __init__(self, failures: int, cooldown: float) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._clients: dict[str, RedisClient] = {}

    def get(self, url: str) -> RedisClient:
        client = self._clients.get(url)
        if client is None:
            breaker = Breaker(self.failures, self.cooldown, name=f"Redis {redact(url)}")
            client = self._clients[url] = RedisClient(url, breaker)
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

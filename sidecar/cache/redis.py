"""The shared tier: answers in a Redis every replica reads, behind hard timeouts and a circuit breaker.

Redis is an optimisation, never a dependency (``sidecar/redis``: one client per server, its
timeouts and circuit breaker shared with the traffic store). A read waits at most ``timeout`` (a few
ms); a read that fails or times out is a miss. Writes never make a caller wait: they queue (bounded,
the overflow dropped and counted) for a background writer, which pipelines them with their TTL.

Keys: ``<namespace>:c:<generation digest>:<request digest>`` where the generation digest covers the
model, the versions the server reports and the fleet-wide epoch of that model
(``<namespace>:e:<model>``, incremented by a flush or a reload). Bumping the epoch makes a model's
earlier entries unreachable for every replica at its next epoch refresh; the TTL reclaims them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
from collections.abc import Iterable
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..redis.breaker import Breaker
from ..redis.client import RedisClient, RedisClients
from ..redis.urls import hash_tag, is_redis

log = logging.getLogger("sidecar.cache")

_WRITE_QUEUE = 1024


class RedisTier:
    def __init__(self, client: RedisClient, namespace: str, timeout: float) -> None:
        self.client = client
        self.namespace = namespace
        self.timeout = timeout
        self._writes: collections.deque[tuple[bytes, bytes, int]] = collections.deque(maxlen=_WRITE_QUEUE)
        self._wake = asyncio.Event()
        self.dropped_writes = 0
        self.epochs: dict[str, int] = {}
        self.fleet_epoch = 0  # bumped by a flush of every model, on any replica

    def __repr__(self) -> str:
        return f"<RedisTier {self.client!r} pending_writes={len(self._writes)}>"

    @property
    def breaker(self) -> Breaker:
        return self.client.breaker

    @property
    def errors(self) -> dict[str, int]:
        """Failures by kind (read, read_timeout, write, epoch, fingerprint), shared with the server's other users."""
        return self.client.errors

    def epoch(self, model: str) -> tuple[int, int]:
        """What the fleet has flushed of ``model``: (flushes of every model, flushes of this one)."""
        return self.fleet_epoch, self.epochs.get(model, 0)

    def key(self, model: str, versions: str, digest: bytes) -> bytes:
        every, own = self.epoch(model)
        generation = hashlib.blake2b(f"{model}\n{versions}\n{own}\n{every}".encode(), digest_size=8).hexdigest()
        return f"{self.namespace}:c:{generation}:".encode() + digest.hex().encode()

    async def get(self, key: bytes, patient: bool = False) -> bytes | None:
        """The stored bytes, or None on a miss, a failure, a timeout or an open breaker. ``patient``: a read no
        caller waits for (the cache fill), allowed 20 times the read timeout, as a miss costs a model call."""
        timeout = self.timeout * (20 if patient else 1)
        data = await self.client.run("read", lambda: self.client.redis.get(key), timeout)
        return data if isinstance(data, bytes) else None

    def put(self, key: bytes, data: bytes, ttl: float) -> None:
        """Queue a write; never waits. When the queue is full the oldest pending write is dropped."""
        if len(self._writes) == self._writes.maxlen:
            self.dropped_writes += 1
        self._writes.append((key, data, max(1, int(ttl * 1000))))
        self._wake.set()

    async def run_writer(self) -> None:
        """Background task: drain queued writes in pipelines, skipping while the breaker is open."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._drain()

    async def _drain(self) -> None:
        while self._writes:
            batch = [self._writes.popleft() for _ in range(min(len(self._writes), 64))]

            async def write(batch: list[tuple[bytes, bytes, int]] = batch) -> bool:
                async with self.client.redis.pipeline(transaction=False) as pipe:
                    for key, data, ttl_ms in batch:
                        pipe.set(key, data, px=ttl_ms)
                    await pipe.execute()
                return True

            if await self.client.run("write", write, max(self.timeout * 10, 0.1)) is None:
                self.dropped_writes += len(batch)

    async def refresh_epochs(self, models: Iterable[str]) -> None:
        """Read the fleet-wide epochs: every model's and each of ``models``' (best effort: on failure the
        known ones stay)."""
        names = sorted(set(models))
        keys = [self._epoch_key(None), *(self._epoch_key(m) for m in names)]
        values = await self.client.run("epoch", lambda: self.client.redis.mget(keys), max(self.timeout * 10, 0.1))
        if values is None:
            return
        with contextlib.suppress(TypeError, ValueError):
            self.fleet_epoch = int(values[0] or 0)
        for model, value in zip(names, values[1:], strict=True):
            with contextlib.suppress(TypeError, ValueError):
                self.epochs[model] = int(value or 0)

    async def bump_epoch(self, model: str | None) -> None:
        """Make every replica's entries of ``model`` (of every model: None) unreachable; they read the new
        epoch at their next refresh. A flush of every model is one key, so it reaches models this replica
        has never served."""
        key = self._epoch_key(model)
        raised = await self.client.run("epoch", lambda: self.client.redis.incr(key), max(self.timeout * 20, 0.2))
        if raised is None:  # at least here
            raised = (self.fleet_epoch if model is None else self.epochs.get(model, 0)) + 1
        if model is None:
            self.fleet_epoch = int(raised)
        else:
            self.epochs[model] = int(raised)

    async def agree(self, name: str, candidate: bytes, ttl: float) -> bytes | None:
        """The fleet's one value under ``name`` (this replica's ``candidate`` when it is the first to say),
        or None when Redis cannot tell now."""
        key = f"{hash_tag(self.namespace)}:fp:".encode() + name.encode()

        async def set_then_get() -> object:
            await self.client.redis.set(key, candidate, nx=True, px=max(1, int(ttl * 1000)))
            return await self.client.redis.get(key)

        value = await self.client.run("fingerprint", set_then_get, max(self.timeout * 20, 0.2))
        return value if isinstance(value, bytes) else None

    async def agreed(self, limit: int = 256) -> dict[str, bytes]:
        """Every name the fleet agreed on a value for (at most ``limit``): {name: value}; {} when Redis cannot
        tell now."""
        prefix = f"{hash_tag(self.namespace)}:fp:".encode()

        async def scan() -> tuple[list[bytes], list[Any]]:
            keys: list[bytes] = []
            async for key in self.client.redis.scan_iter(match=prefix + b"*", count=100):
                keys.append(key)
                if len(keys) >= limit:
                    break
            return keys, (await self.client.redis.mget(keys) if keys else [])

        found = await self.client.run("fingerprint", scan, max(self.timeout * 100, 1.0))
        if found is None:
            return {}
        keys, values = found
        return {k[len(prefix):].decode(errors="replace"): v for k, v in zip(keys, values, strict=True)
                if isinstance(v, bytes)}

    def _epoch_key(self, model: str | None) -> bytes:
        # ":E" cannot collide with a model's ":e:<name>". Hash-tagged: one MGET reads them all on a cluster too
        # (answers are not: they spread over the cluster's nodes).
        ns = hash_tag(self.namespace)
        return f"{ns}:E".encode() if model is None else f"{ns}:e:".encode() + model.encode()

    async def close(self, grace: float = 1.0) -> None:
        """Write what is still queued (for at most ``grace`` seconds: answers a draining pod computed are
        worth keeping for the fleet). The client is closed by its owner."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._drain()
        self.dropped_writes += len(self._writes)
        self._writes.clear()


def fleet_tier(cfg: Config, clients: RedisClients) -> RedisTier | None:
    """The shared tier ``cache.redis`` names (else the traffic store's Redis); None when it is 'off', caching is
    off or there is no Redis. The data plane reads and writes answers through it, the control plane moves its
    epochs (a flush, fleet-wide)."""
    url = cfg.cache.redis or (cfg.store if is_redis(cfg.store) else "")
    if not cfg.cache.models or not url or url == "off":
        return None
    try:
        return RedisTier(clients.get(url), f"warm-sidecar:{cfg.cache.namespace or 'default'}", cfg.cache.redis_timeout)
    except ValueError as e:
        raise ConfigError(f"config key cache.redis: unusable Redis URL ({e})") from None

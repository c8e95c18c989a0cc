"""The shared tier: answers in a Redis every replica reads, behind hard timeouts and a circuit breaker.

Redis is an optimisation, never a dependency. A read waits at most ``timeout`` (a few ms); a read
that fails or times out is a miss. After ``failures`` consecutive failures the breaker opens: for
``cooldown`` seconds (doubling while Redis stays bad, at most a minute) no call is even tried, then
one probe decides. Writes never make a caller wait: they queue (bounded, the overflow dropped and
counted) for a background writer, which pipelines them with their TTL.

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
import time
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("sidecar.cache")

_WRITE_QUEUE = 1024
_MAX_COOLDOWN = 60.0


class Breaker:
    """Closed (calls go), open (calls skipped until the cooldown ends), half-open (one probe goes)."""

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.base_cooldown = cooldown
        self.cooldown = cooldown
        self.clock = clock
        self.consecutive = 0
        self.open_until = 0.0
        self.probing = False
        self.opened = 0  # times it opened, for metrics

    def __repr__(self) -> str:
        return f"<Breaker {self.state} consecutive={self.consecutive}>"

    @property
    def state(self) -> str:
        if self.open_until == 0.0:
            return "closed"
        return "half-open" if self.clock() >= self.open_until else "open"

    def allow(self) -> bool:
        if self.open_until == 0.0:
            return True
        if self.clock() < self.open_until or self.probing:
            return False
        self.probing = True  # one probe at a time decides
        return True

    def release(self) -> None:
        """The probe ended without an outcome (its caller left): the next call may probe."""
        self.probing = False

    def success(self) -> None:
        if self.open_until:
            log.info("Redis cache tier reachable again; breaker closed")
        self.consecutive = 0
        self.open_until = 0.0
        self.probing = False
        self.cooldown = self.base_cooldown

    def failure(self) -> None:
        self.consecutive += 1
        if self.probing or (self.open_until == 0.0 and self.consecutive >= self.threshold):
            if self.open_until == 0.0:
                log.warning("Redis cache tier failing (%d in a row); skipping it for %.1f s", self.consecutive,
                            self.cooldown)
            else:
                self.cooldown = min(self.cooldown * 2, _MAX_COOLDOWN)
            self.open_until = self.clock() + self.cooldown
            self.probing = False
            self.opened += 1


class RedisTier:
    def __init__(self, url: str, namespace: str, timeout: float, breaker: Breaker) -> None:
        self.namespace = namespace
        self.timeout = timeout
        self.breaker = breaker
        self.errors: dict[str, int] = {}  # kind -> count: timeout, error, write, epoch
        # No retries: a retry would blow the per-call budget. The socket timeouts back the asyncio
        # timeout so a half-open TCP connection cannot hold a pool slot for long.
        self.client = aioredis.Redis.from_url(url, socket_timeout=max(timeout * 20, 0.5),
                                              socket_connect_timeout=max(timeout * 20, 0.5), retry=None,
                                              health_check_interval=0)
        self._writes: collections.deque[tuple[bytes, bytes, int]] = collections.deque(maxlen=_WRITE_QUEUE)
        self._wake = asyncio.Event()
        self.dropped_writes = 0
        self.epochs: dict[str, int] = {}
        self.fleet_epoch = 0  # bumped by a flush of every model, on any replica

    def __repr__(self) -> str:
        return f"<RedisTier {self.breaker!r} pending_writes={len(self._writes)}>"

    def epoch(self, model: str) -> tuple[int, int]:
        """What the fleet has flushed of ``model``: (flushes of every model, flushes of this one)."""
        return self.fleet_epoch, self.epochs.get(model, 0)

    def key(self, model: str, versions: str, digest: bytes) -> bytes:
        every, own = self.epoch(model)
        generation = hashlib.blake2b(f"{model}\n{versions}\n{own}\n{every}".encode(), digest_size=8).hexdigest()
        return f"{self.namespace}:c:{generation}:".encode() + digest.hex().encode()

    async def get(self, key: bytes) -> bytes | None:
        """The stored bytes, or None on a miss, a failure, a timeout or an open breaker."""
        if not self.breaker.allow():
            return None
        probe = self.breaker.probing  # this read decides whether the breaker closes
        try:
            async with asyncio.timeout(self.timeout):
                data = await self.client.get(key)
        except TimeoutError:
            self._failed("timeout")
            return None
        except (RedisError, OSError):
            self._failed("error")
            return None
        except asyncio.CancelledError:
            # The caller left mid-read. Without an outcome the probe would never end, and the breaker would
            # stay open (half-open, no probe allowed) for as long as the process lives.
            if probe:
                self.breaker.release()
            raise
        self.breaker.success()
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
            if not self.breaker.allow():
                self.dropped_writes += len(batch)
                continue
            try:
                async with asyncio.timeout(max(self.timeout * 10, 0.1)):
                    async with self.client.pipeline(transaction=False) as pipe:
                        for key, data, ttl_ms in batch:
                            pipe.set(key, data, px=ttl_ms)
                        await pipe.execute()
            except (TimeoutError, RedisError, OSError):
                self._failed("write")
                self.dropped_writes += len(batch)
            else:
                self.breaker.success()

    async def refresh_epochs(self, models: Iterable[str]) -> None:
        """Read the fleet-wide epochs: every model's and each of ``models``' (best effort: on failure the
        known ones stay)."""
        names = sorted(set(models))
        if not self.breaker.allow():
            return
        try:
            async with asyncio.timeout(max(self.timeout * 10, 0.1)):
                values = await self.client.mget([self._epoch_key(None), *(self._epoch_key(m) for m in names)])
        except (TimeoutError, RedisError, OSError):
            self._failed("epoch")
            return
        self.breaker.success()
        with contextlib.suppress(TypeError, ValueError):
            self.fleet_epoch = int(values[0] or 0)
        for model, value in zip(names, values[1:], strict=True):
            with contextlib.suppress(TypeError, ValueError):
                self.epochs[model] = int(value or 0)

    async def bump_epoch(self, model: str | None) -> None:
        """Make every replica's entries of ``model`` (of every model: None) unreachable; they read the new
        epoch at their next refresh. A flush of every model is one key, so it reaches models this replica
        has never served."""
        try:
            async with asyncio.timeout(max(self.timeout * 20, 0.2)):
                epoch = int(await self.client.incr(self._epoch_key(model)))
        except (TimeoutError, RedisError, OSError):
            self._failed("epoch")
            epoch = (self.fleet_epoch if model is None else self.epochs.get(model, 0)) + 1  # at least here
        if model is None:
            self.fleet_epoch = epoch
        else:
            self.epochs[model] = epoch

    async def agree(self, name: str, candidate: bytes, ttl: float) -> bytes | None:
        """The fleet's one value under ``name`` (this replica's ``candidate`` when it is the first to say),
        or None when Redis cannot tell now."""
        key = f"{self.namespace}:fp:".encode() + name.encode()
        if not self.breaker.allow():
            return None
        try:
            async with asyncio.timeout(max(self.timeout * 20, 0.2)):
                await self.client.set(key, candidate, nx=True, px=max(1, int(ttl * 1000)))
                value = await self.client.get(key)
        except (TimeoutError, RedisError, OSError):
            self._failed("fingerprint")
            return None
        self.breaker.success()
        return value if isinstance(value, bytes) else None

    async def agreed(self, limit: int = 256) -> dict[str, bytes]:
        """Every name the fleet agreed on a value for (at most ``limit``): {name: value}; {} when Redis cannot
        tell now."""
        prefix = f"{self.namespace}:fp:".encode()
        if not self.breaker.allow():
            return {}
        try:
            async with asyncio.timeout(max(self.timeout * 100, 1.0)):
                keys = []
                async for key in self.client.scan_iter(match=prefix + b"*", count=100):
                    keys.append(key)
                    if len(keys) >= limit:
                        break
                values = await self.client.mget(keys) if keys else []
        except (TimeoutError, RedisError, OSError):
            self._failed("fingerprint")
            return {}
        self.breaker.success()
        return {k[len(prefix):].decode(errors="replace"): v for k, v in zip(keys, values, strict=True)
                if isinstance(v, bytes)}

    def _epoch_key(self, model: str | None) -> bytes:
        # ":E" cannot collide with a model's ":e:<name>".
        return f"{self.namespace}:E".encode() if model is None else f"{self.namespace}:e:".encode() + model.encode()

    def _failed(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.breaker.failure()

    async def close(self, grace: float = 1.0) -> None:
        """Write what is still queued (for at most ``grace`` seconds: answers a draining pod computed are
        worth keeping for the fleet), then disconnect."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._drain()
        self.dropped_writes += len(self._writes)
        self._writes.clear()
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()

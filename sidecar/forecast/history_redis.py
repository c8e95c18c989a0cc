"""The history in Redis, shared by the fleet: every replica adds its counts, every replica reads the sum.

Keys (``ns`` is the namespace; the model name is escaped so that it cannot end the hash tag):

    {ns:<model>}:d:<day>   string   day vector: 1,440 u32 counts, ``BITFIELD ... OVERFLOW SAT INCRBY u32 #m n``
    {ns}:c:<day>           string   coverage bitmap: bit m set when some replica recorded during minute m
    {ns}:models            zset     model -> last minute seen (trimmed to retention and ``max_models``)

Every key of one model shares the hash tag ``{ns:<model>}`` and the fleet-wide keys share ``{ns}``, so a
multi-key command (the ``MGET`` of a model's days) stays in one slot on Redis Cluster. Day keys expire by
themselves (``EXPIRE`` until the end of their day plus the retention): nothing needs a sweeper or a leader.

**One round trip per flush interval, whatever the traffic.** ``add`` only adds to a local buffer.
:meth:`RedisHistory.sync` is the only method that talks to Redis, and it sends one pipeline: the
buffered counts and coverage, and the reads that :meth:`series` and :meth:`models` are waiting for.
:meth:`run` calls it every ``interval`` seconds (``forecast.flush_interval``, at least 1), so a replica
costs Redis at most one call per second. Reads are served from a local mirror of day vectors: a day
that ended more than ``settle`` seconds ago no longer changes and is read once; the current days are
read again at most every ``refresh`` seconds; each round trip carries at most ``READ_BYTES`` of reads
(a new replica's first reads of 14 days spread over a few seconds instead of one large answer).

Failure policy, as the traffic store's: the history is an optimisation, never a dependency. A failed
round trip drops its counts (counted in ``dropped``: a retry could count twice, as ``BITFIELD INCRBY`` is
not idempotent), its reads answer with what the mirror holds (NaN: unknown), one warning is logged per
outage and one info line on recovery. The client is injected (the sidecar's one Redis client layer);
this class never closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from .history import (
    DAY_MINUTES,
    Batch,
    Buffered,
    HistoryLimits,
    MinuteSeries,
    assemble,
    covered_by_day,
    day_of,
    decode_coverage,
    decode_day,
    group_by_day,
)

__all__ = ["READ_BYTES", "RedisHistory", "day_key"]

log = logging.getLogger(__name__)
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

READ_BYTES = 2 << 20  # day vectors read per round trip at most (about 360 days of models)
_MAX_WAITS = 1000  # round trips one series() waits for at most (each serves at least its newest missing day)
_DAY_BYTES = DAY_MINUTES * 4


def _escape(model: str) -> str:
    # '{' and '}' would move the Cluster hash tag, '%' keeps the escape reversible.
    return model.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def day_key(namespace: str, model: str, day: int) -> str:
    return f"{{{namespace}:{_escape(model)}}}:d:{day}"


def coverage_key(namespace: str, day: int) -> str:
    return f"{{{namespace}}}:c:{day}"


def models_key(namespace: str) -> str:
    return f"{{{namespace}}}:models"


@dataclass
class _Mirrored:
    value: Any
    fetched: float  # clock time of the read
    final: bool  # the day had settled when read: it never changes again


@dataclass
class _Reads:
    """What the next round trip reads, and who waits for it."""

    days: set[tuple[str, int]] = field(default_factory=set)
    coverage: set[int] = field(default_factory=set)
    models: bool = False
    done: asyncio.Future[bool] | None = None

    def __bool__(self) -> bool:
        return bool(self.days or self.coverage or self.models)


class RedisHistory(Buffered):
    kind = "redis"

    def __init__(
        self,
        client: Any,
        limits: HistoryLimits,
        *,
        clock: Clock = time.time,
        label: str = "redis",
        timeout: float = 2.0,
        refresh: float = 60.0,
        settle: float = 300.0,
        recording: bool = True,
    ) -> None:
        self.limits = limits
        self.round_trips = 0
        self._client = client  # a redis.asyncio.Redis (or the sidecar's client layer around one)
        self._clock = clock
        self._label = label
        self._timeout = timeout
        self._refresh = refresh
        self._settle = settle
        super().__init__(limits, recording)
        self._up = True
        self._closed = False
        self._driven = False  # run() is calling sync() on a schedule
        self._lock = asyncio.Lock()
        self._reads = _Reads()
        self._days: dict[tuple[str, int], _Mirrored] = {}
        self._coverage: dict[int, _Mirrored] = {}
        self._models: _Mirrored | None = None

    def describe(self) -> str:
        return f"{self._label} namespace={self.limits.namespace}"

    def __repr__(self) -> str:
        return (f"<RedisHistory {self.describe()} {'up' if self._up else 'down'} pending={len(self._pending)} "
                f"mirrored={len(self._days)} round_trips={self.round_trips} dropped={self.dropped}>")

    # -- the interface (add, replace, cover: Buffered)

    async def flush(self) -> None:
        await self.sync()

    async def series(self, model: str, start: int, end: int) -> MinuteSeries:
        if end <= start:
            return MinuteSeries(start, np.zeros(0))
        now = self._clock()
        first = max(day_of(start), self.limits.first_kept_day(int(now // 60)))
        wanted = range(first, day_of(end - 1) + 1)
        for _ in range(_MAX_WAITS):
            days = {(model, d) for d in wanted if self._stale(self._days.get((model, d)), now)}
            coverage = {d for d in wanted if self._stale(self._coverage.get(d), now)}
            if not (days or coverage) or not await self._wait(_Reads(days, coverage)):
                break  # all mirrored, or Redis failed: answer with what is known (NaN for the rest)
        return assemble(
            start, end,
            {d: m.value for d in wanted if (m := self._days.get((model, d))) is not None},
            {d: m.value for d in wanted if (m := self._coverage.get(d)) is not None},
        )

    async def models(self) -> list[str]:
        if self._stale(self._models, self._clock()):
            await self._wait(_Reads(models=True))  # a failed trip leaves the last list known
        return list(self._models.value) if self._models is not None else []

    async def close(self) -> None:
        """Writes what is buffered; the client belongs to the caller and stays open."""
        if not self._closed:
            with contextlib.suppress(Exception):
                await self.sync()
            self._closed = True

    async def run(self, interval: float, sleep: Sleep = asyncio.sleep) -> None:
        """Calls :meth:`sync` every ``interval`` seconds until cancelled; reads wait for it meanwhile."""
        self._driven = True
        try:
            while True:
                await self.sync()
                await sleep(interval)
        finally:
            self._driven = False
            # Reads queued for a round trip that will not come now: their waiters answer with the mirror.
            waiting, self._reads = self._reads, _Reads()
            if waiting.done is not None and not waiting.done.done():
                waiting.done.set_result(False)

    # -- the round trip

    async def sync(self) -> None:
        """One pipeline: the buffered writes and the waiting reads. Never raises for Redis failures."""
        async with self._lock:
            if self._closed:
                waiting, self._reads = self._reads, _Reads()
                if waiting.done is not None and not waiting.done.done():
                    waiting.done.set_result(False)
                return
            now = self._clock()
            now_minute = int(now // 60)
            self._pending.flushing(now_minute)
            batch = self._pending.take()
            reads = self._take_reads()
            if not batch and not reads:
                if reads.done is not None and not reads.done.done():
                    reads.done.set_result(True)
                return
            pipe = self._client.pipeline(transaction=False)
            self._queue_writes(pipe, batch, now_minute)
            order = self._queue_reads(pipe, reads)
            ok = False
            try:
                self.round_trips += 1
                async with asyncio.timeout(self._timeout):
                    answers = await pipe.execute()
            except (RedisError, OSError) as error:  # OSError covers timeouts and refused connections
                self._failed += batch.calls()
                self._health(error)
            else:
                self._health(None)
                self._store_reads(order, answers[len(answers) - len(order) :], now)
                ok = True
            finally:
                if reads.done is not None and not reads.done.done():
                    reads.done.set_result(ok)
            self._evict(now_minute)

    def _queue_writes(self, pipe: Any, batch: Batch, now_minute: int) -> None:
        ns, limits = self.limits.namespace, self.limits
        first_day = limits.first_kept_day(now_minute)
        added, replaced = group_by_day(batch.counts), group_by_day(batch.replaced)
        for model, day in sorted({*added, *replaced}):
            if day < first_day:
                continue
            key = day_key(ns, model, day)
            args: list[str | int] = ["BITFIELD", key, "OVERFLOW", "SAT"]
            for minute, count in replaced.get((model, day), ()):
                args += ["SET", "u32", f"#{minute}", count]
            for minute, count in added.get((model, day), ()):
                args += ["INCRBY", "u32", f"#{minute}", count]
            pipe.execute_command(*args)
            pipe.execute_command("EXPIRE", key, self._ttl(day, now_minute))
        for day, minutes in covered_by_day(batch.covered).items():
            if day < first_day:
                continue
            key = coverage_key(ns, day)
            args = ["BITFIELD", key]
            for minute in minutes:
                args += ["SET", "u1", minute, 1]
            pipe.execute_command(*args)
            pipe.execute_command("EXPIRE", key, self._ttl(day, now_minute))
        last_seen = batch.last_seen()
        if last_seen:
            key = models_key(ns)
            pipe.execute_command("ZADD", key, "GT", *[x for m, t in sorted(last_seen.items()) for x in (t, m)])
            pipe.execute_command("ZREMRANGEBYSCORE", key, "-inf", f"({now_minute - limits.retention_minutes}")
            pipe.execute_command("ZREMRANGEBYRANK", key, 0, -(limits.max_models + 1))

    def _ttl(self, day: int, now_minute: int) -> int:
        """Seconds until the day's last minute is older than the retention (relative, so a replica's clock
        needs no agreement with Redis's)."""
        return max(1, (day + 1) * 86400 + int(self.limits.retention) + 60 - now_minute * 60)

    def _take_reads(self) -> _Reads:
        """The reads this round trip carries: at most READ_BYTES of days, the newest first (they change).
        Days left out are forgotten: their waiters, woken by this trip, ask again for what is missing."""
        waiting, self._reads = self._reads, _Reads()
        days = sorted(waiting.days, key=lambda k: (-k[1], k[0]))[: READ_BYTES // _DAY_BYTES]
        return _Reads(set(days), waiting.coverage, waiting.models, waiting.done)

    def _queue_reads(self, pipe: Any, reads: _Reads) -> list[tuple[str, Any]]:
        """Adds the reads to the pipeline; returns what each answer is, in order."""
        ns = self.limits.namespace
        order: list[tuple[str, Any]] = []
        per_model: dict[str, list[int]] = {}
        for model, day in reads.days:
            per_model.setdefault(model, []).append(day)
        for model, days in sorted(per_model.items()):
            days.sort()
            pipe.execute_command("MGET", *[day_key(ns, model, d) for d in days])  # one slot: one tag
            order.append(("days", (model, days)))
        if reads.coverage:
            days = sorted(reads.coverage)
            pipe.execute_command("MGET", *[coverage_key(ns, d) for d in days])
            order.append(("coverage", days))
        if reads.models:
            pipe.execute_command("ZREVRANGE", models_key(ns), 0, self.limits.max_models - 1)
            order.append(("models", None))
        return order

    def _store_reads(self, order: list[tuple[str, Any]], answers: list[Any], now: float) -> None:
        for (kind, what), answer in zip(order, answers, strict=True):
            if kind == "days":
                model, days = what
                for day, raw in zip(days, answer, strict=True):
                    self._days[(model, day)] = _Mirrored(decode_day(raw), now, self._settled(day, now))
            elif kind == "coverage":
                for day, raw in zip(what, answer, strict=True):
                    self._coverage[day] = _Mirrored(decode_coverage(raw), now, self._settled(day, now))
            else:
                names = [m.decode() if isinstance(m, bytes) else str(m) for m in answer]
                self._models = _Mirrored(names, now, False)

    def _settled(self, day: int, now: float) -> bool:
        return now >= (day + 1) * 86400 + self._settle

    def _stale(self, mirrored: _Mirrored | None, now: float) -> bool:
        return mirrored is None or (not mirrored.final and now - mirrored.fetched >= self._refresh)

    async def _wait(self, reads: _Reads) -> bool:
        """Queues ``reads`` for the next round trip and waits for it (or makes it, when nobody runs them);
        returns whether that round trip succeeded."""
        if self._closed:
            return False
        waiting = self._reads
        waiting.days |= reads.days
        waiting.coverage |= reads.coverage
        waiting.models |= reads.models
        if waiting.done is None:
            waiting.done = asyncio.get_running_loop().create_future()
        done = waiting.done
        if not self._driven:
            await self.sync()
        return await asyncio.shield(done)

    def _evict(self, now_minute: int) -> None:
        first_day = self.limits.first_kept_day(now_minute)
        for key in [k for k in self._days if k[1] < first_day]:
            del self._days[key]
        for day in [d for d in self._coverage if d < first_day]:
            del self._coverage[day]
        if self._models is not None:
            kept = set(self._models.value)
            for key in [k for k in self._days if k[0] not in kept and self._days[k].final]:
                del self._days[key]

    def _health(self, error: BaseException | None) -> None:
        if error is None:
            if not self._up:
                log.info("forecast history %s available again", self.describe())
            self._up = True
            return
        if self._up:
            log.warning("forecast history %s unavailable (%s); counts are dropped until it returns",
                        self.describe(), type(error).__name__)
        self._up = False


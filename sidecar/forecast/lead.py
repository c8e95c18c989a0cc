"""How far ahead to forecast: the time a new pod takes from launch to warm, as the fleet has measured it.

Each pod measures its own launch-to-warm once it turns ready (from the sidecar's start, so what happens
before the container starts - node provisioning, scheduling, the image pull - is not in it: that is
``forecast.extra_lead``). The fleet keeps the newest ``lead_samples`` measurements, in Redis (a capped
list: one ``LPUSH``+``LTRIM`` per pod start, one ``LRANGE`` per ``refresh``) or, without Redis, in the pod's
own memory. The lead is a high percentile of them (``forecast.lead_percentile``, p90: a slow node must not
make every forecast late) plus ``extra_lead``; ``forecast.lead`` > 0 overrides all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

__all__ = ["LeadSamples", "LeadTime", "LocalLeadSamples", "RedisLeadSamples", "lead_time", "percentile"]

log = logging.getLogger(__name__)
Clock = Callable[[], float]
MAX_SECONDS = 86400.0  # a "launch-to-warm" beyond a day is a broken clock, not a measurement


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile: a value that was really measured, never an interpolation between two."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class LeadTime:
    seconds: float  # the horizon the forecast uses
    source: str  # "configured" (forecast.lead), "measured" or "default" (nothing measured yet)
    measured: float | None  # the percentile of the samples, before extra_lead
    samples: int

    def as_dict(self) -> dict[str, object]:
        return {"seconds": round(self.seconds, 3), "source": self.source,
                "measured": None if self.measured is None else round(self.measured, 3), "samples": self.samples}


def lead_time(samples: Sequence[float], *, share: float = 0.9, extra: float = 0.0, configured: float = 0.0,
              default: float = 120.0) -> LeadTime:
    if configured > 0:
        return LeadTime(configured, "configured", None, len(samples))
    if not samples:
        return LeadTime(default + extra, "default", None, 0)
    measured = percentile(samples, share)
    return LeadTime(measured + extra, "measured", measured, len(samples))


def _valid(seconds: float) -> bool:
    return math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS


class LeadSamples(Protocol):
    async def record(self, seconds: float) -> None: ...

    async def samples(self) -> list[float]: ...


class LocalLeadSamples:
    """This pod's own measurements (each start of the model server it warmed), newest kept."""

    def __init__(self, cap: int = 100) -> None:
        self._values: deque[float] = deque(maxlen=cap)

    async def record(self, seconds: float) -> None:
        if _valid(seconds):
            self._values.append(seconds)

    async def samples(self) -> list[float]:
        return list(self._values)


class RedisLeadSamples:
    """The fleet's measurements in one capped Redis list ``{ns}:lead`` of ``"<epoch>:<seconds>"``.

    The list expires ``retention`` seconds after the last measurement, and samples older than that are
    ignored: a fleet that changed node types last month must not plan with last month's pods. Reads are
    cached for ``refresh`` seconds; a failed read keeps the last samples known (one warning per outage).
    """

    def __init__(self, client: Any, namespace: str, *, cap: int = 100, retention: float = 14 * 86400.0,
                 refresh: float = 300.0, clock: Clock = time.time, timeout: float = 1.0) -> None:
        self.key = f"{{{namespace}}}:lead"
        self._client = client
        self._cap = cap
        self._retention = retention
        self._refresh = refresh
        self._clock = clock
        self._timeout = timeout
        self._cached: list[float] = []
        self._read_at: float | None = None
        self._up = True
        self.local = LocalLeadSamples(cap)  # what this pod measured, even if Redis never hears of it

    async def record(self, seconds: float) -> None:
        if not _valid(seconds):
            return
        await self.local.record(seconds)
        now = self._clock()

        async def push() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.lpush(self.key, f"{now:.3f}:{seconds:.3f}")
                pipe.ltrim(self.key, 0, self._cap - 1)
                pipe.expire(self.key, max(1, int(self._retention)))
                await pipe.execute()

        if await self._guard("record", push):
            self._read_at = None  # the next read sees it

    async def samples(self) -> list[float]:
        now = self._clock()
        if self._read_at is not None and now - self._read_at < self._refresh:
            return list(self._cached)
        raw: list[bytes] = []

        async def read() -> None:
            raw.extend(await self._client.lrange(self.key, 0, self._cap - 1))

        if await self._guard("read", read):
            self._cached = self._parse(raw, now)
            self._read_at = now
        return list(self._cached) or await self.local.samples()

    def _parse(self, raw: list[bytes], now: float) -> list[float]:
        values = []
        for item in raw:
            text = item.decode(errors="replace") if isinstance(item, bytes) else str(item)
            stamp, _, seconds = text.partition(":")
            with contextlib.suppress(ValueError):
                if now - float(stamp) <= self._retention and _valid(float(seconds)):
                    values.append(float(seconds))
        return values

    async def _guard(self, what: str, call: Callable[[], Any]) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await call()
        except (RedisError, OSError) as error:
            if self._up:
                log.warning("lead samples %s unavailable (%s during %s)", self.key, type(error).__name__, what)
            self._up = False
            return False
        if not self._up:
            log.info("lead samples %s available again", self.key)
        self._up = True
        return True

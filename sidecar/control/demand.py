"""The control plane's demand forecast: the history fed from the data planes' per-model totals, the
forecaster, the pod's launch-to-warm measurement, what this pod can serve, and their Prometheus families.

Everything here reads what the data planes report (``planes.DataSide.demand``, ``report``) once per
history flush interval; nothing waits on it. ``forecast.history: 0`` builds none of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..config import Config
from ..forecast.capacity import Capacity, PeakRate, capacity, from_latency, parse_overrides
from ..forecast.commands import history_location, open_history
from ..forecast.feed import CounterFeed
from ..forecast.history import History
from ..forecast.lead import LeadSamples, LocalLeadSamples, RedisLeadSamples
from ..forecast.service import Forecaster
from ..forecast.signals import ForecastCollector
from ..metrics import Metrics
from ..planes import Demand
from ..redis.client import RedisClients
from ..redis.urls import is_redis
from ..supervise import Supervisor

log = logging.getLogger("sidecar.forecast")


class _ReportedLatency:
    """The batcher's learned latencies as the data planes last reported them (``capacity.LatencySource``)."""

    def __init__(self, batch: Mapping[str, Any]) -> None:
        self.batch = batch

    def known(self, model: str) -> dict[int, float]:
        return {int(b): ms / 1e3 for b, ms in self.batch.get(model, {}).get("latency_ms", {}).items()}


class DemandForecast:
    def __init__(self, cfg: Config, metrics: Metrics, redis: RedisClients, demand: Callable[[], Demand],
                 report: Callable[[], dict[str, Any]], *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg.forecast
        self.demand = demand
        self.report = report
        self.clock = clock
        self.launched = clock()  # the pod's launch, as near as the sidecar can tell: its own start
        location = history_location(cfg.forecast, cfg.store)
        shared = redis.get(location).redis if is_redis(location) else None  # the server's one connection pool
        self.history: History = open_history(cfg.forecast, location, client=shared, clock=clock)
        self.lead: LeadSamples = (RedisLeadSamples(shared, cfg.forecast.namespace, cap=cfg.forecast.lead_samples,
                                                   retention=cfg.forecast.history, clock=clock)
                                  if shared is not None else LocalLeadSamples(cfg.forecast.lead_samples))
        self.feed = CounterFeed(self.history, lambda: self.demand().totals, clock=clock)
        self.forecaster = Forecaster(self.history, self.lead, cfg.forecast, clock=clock)
        self.peaks = PeakRate()
        self.overrides = parse_overrides(cfg.forecast.capacity)
        self.measured: float | None = None  # this pod's launch-to-warm, once warm
        metrics.registry.register(ForecastCollector(self.forecaster, self.capacities, metrics.model_label))

    def __repr__(self) -> str:
        return f"<DemandForecast {self.history.describe()} {self.forecaster!r}>"

    def start(self, supervisor: Supervisor) -> None:
        supervisor.spawn("forecast-history", self._record)
        supervisor.spawn("forecast", self.forecaster.run)

    async def _record(self) -> None:
        """Each flush interval: what each model gained since the last tick goes into the current minute, and
        the served rates into the observed peaks."""
        async def tick_after(seconds: float) -> None:
            await asyncio.sleep(seconds)
            self.feed.tick()
            now = self.clock()
            for model, rate in self.demand().rates.items():
                self.peaks.observe(model, rate, now)

        await self.history.run(self.cfg.flush_interval, sleep=tick_after)

    def warm(self) -> None:
        """The pod turned warm: its first time measures launch-to-warm for the fleet's lead."""
        if self.measured is not None:
            return
        self.measured = self.clock() - self.launched
        task = asyncio.get_running_loop().create_task(self.lead.record(self.measured))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are logged by the samples

    def capacities(self) -> dict[str, Capacity]:
        now = self.clock()
        report = self.report()
        batch, cache = report.get("batch", {}), report.get("cache", {}).get("models", {})
        latency = _ReportedLatency(batch)
        models = set(batch) | set(self.overrides) | set(self.demand().rates)
        found: dict[str, Capacity] = {}
        for model in models:
            stats = cache.get(model, {})
            answered = stats.get("hits", 0) + stats.get("redis_hits", 0) + stats.get("misses", 0)
            miss_share = stats.get("misses", 0) / answered if answered else 1.0
            instances = int(batch.get(model, {}).get("max_concurrent", 1) or 1)
            estimate = from_latency(latency, model, instances=instances, miss_share=miss_share)
            c = capacity(model, configured=self.overrides, estimate=estimate, peak=self.peaks.peak(model, now))
            if c is not None:
                found[model] = c
        return found

    def status(self) -> dict[str, Any]:
        """``/status``'s ``forecast`` section: the lead, each model's forecast and error, and capacity."""
        out = self.forecaster.status()
        out["launch_to_warm"] = None if self.measured is None else round(self.measured, 3)
        out["capacity"] = {m: c.as_dict() for m, c in sorted(self.capacities().items())}
        return out

    async def close(self) -> None:
        await self.history.close()

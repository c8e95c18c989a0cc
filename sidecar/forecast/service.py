"""The forecaster: every minute, each model's forecast at now + lead; every hour, yesterday's error.

It only reads (the history and the lead samples) and keeps its last results for ``/status`` and the
Prometheus families (signals.py); nothing on the data path waits for it. Every replica computes the
same fleet-wide numbers from the shared history, so an autoscaler may read any one of them (the
recipes take the maximum over pods).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from ..config import ForecastConfig
from .history import DAY_MINUTES, History
from .lead import LeadSamples, LeadTime, lead_time
from .model import Forecast, ForecastError, ModelSettings, backtest, forecast, lookback

__all__ = ["Forecaster", "settings_from"]

log = logging.getLogger(__name__)
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

ERROR_EVERY = 3600.0  # seconds between recomputations of the error (it judges a whole day)
CHUNK = 32  # models whose series are read at once (each holds ~17 days of minutes: 140 KiB)


def settings_from(cfg: ForecastConfig) -> ModelSettings:
    return ModelSettings(
        min_history=max(1, math.ceil(cfg.min_history / 60)),
        level_window=max(1, round(cfg.level_window / 60)),
        smoothing=round(cfg.smoothing / 60),
    )


@dataclass(frozen=True)
class _Result:
    forecast: Forecast | None
    error: ForecastError | None


class Forecaster:
    def __init__(self, history: History, lead: LeadSamples, cfg: ForecastConfig, *, clock: Clock = time.time,
                 refresh: float = 60.0) -> None:
        self.history = history
        self.lead_samples = lead
        self.cfg = cfg
        self.settings = settings_from(cfg)
        self.refresh_interval = refresh
        self.lead = lead_time([], share=cfg.lead_percentile, extra=cfg.extra_lead, configured=cfg.lead,
                              default=cfg.default_lead)
        self.results: dict[str, _Result] = {}
        self.refreshed: float | None = None
        self._clock = clock
        self._error_at: float | None = None

    def __repr__(self) -> str:
        known = sum(1 for r in self.results.values() if r.forecast is not None)
        return f"<Forecaster {known}/{len(self.results)} models forecast lead={self.lead.seconds:.0f}s>"

    @property
    def forecasts(self) -> dict[str, Forecast]:
        return {m: r.forecast for m, r in self.results.items() if r.forecast is not None}

    @property
    def errors(self) -> dict[str, ForecastError]:
        return {m: r.error for m, r in self.results.items() if r.error is not None}

    async def refresh(self) -> None:
        """One pass over every model in the history; results replace the previous pass's at once."""
        now = self._clock()
        self.lead = await self._lead()
        judge = self._error_at is None or now - self._error_at >= ERROR_EVERY
        issue = int(now // 60)
        start = issue - lookback(self.settings) - (DAY_MINUTES if judge else 0)
        results: dict[str, _Result] = {}
        models = await self.history.models()
        for first in range(0, len(models), CHUNK):
            chunk = models[first : first + CHUNK]
            # Read together: a Redis history answers a chunk's reads in the same round trips.
            found = await asyncio.gather(*(self.history.series(m, start, issue + 1) for m in chunk))
            for model, series in zip(chunk, found, strict=True):
                result = forecast(model, series, now, self.lead.seconds, self.settings, self.refresh_interval)
                error = (backtest(series, np.arange(issue - DAY_MINUTES, issue), self.lead.seconds, self.settings)
                         if judge else self._previous_error(model))
                results[model] = _Result(result, error)
                await asyncio.sleep(0)  # a model's numpy work is a few ms: let the data path in between models
        self.results = results
        self.refreshed = now
        if judge:
            self._error_at = now

    def _previous_error(self, model: str) -> ForecastError | None:
        previous = self.results.get(model)
        return previous.error if previous is not None else None

    async def _lead(self) -> LeadTime:
        cfg = self.cfg
        samples = [] if cfg.lead > 0 else await self.lead_samples.samples()
        return lead_time(samples, share=cfg.lead_percentile, extra=cfg.extra_lead, configured=cfg.lead,
                         default=cfg.default_lead)

    async def run(self, sleep: Sleep = asyncio.sleep) -> None:
        """Refreshes every ``refresh`` seconds until cancelled; a failed pass is logged, never fatal."""
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug here must not end the forecasts for the pod's lifetime
                log.exception("forecast refresh failed")
            await sleep(self.refresh_interval)

    def status(self) -> dict[str, object]:
        """``/status``'s ``forecast`` section."""
        return {
            "lead": self.lead.as_dict(),
            "refreshed": self.refreshed,
            "history": self.history.describe(),
            "models": {
                model: {
                    "forecast": r.forecast.as_dict() if r.forecast is not None else None,
                    "error": r.error.as_dict() if r.error is not None else None,
                }
                for model, r in sorted(self.results.items())
            },
        }

"""The forecast: a model's demand at now + lead, from its daily and weekly pattern and today's level.

For a target minute ``T`` the forecast is ``baseline(T) * level``:

- **baseline**: the seasonal pattern. Each *sample* is the mean of the calls around the same minute of a
  past day (``smoothing`` minutes either side: one minute alone is mostly noise). With a week of history
  or more, the baseline is the mean of the samples 1..``weeks`` weeks back (``method="week"``: it knows
  weekends and Monday mornings); before that, the median of the samples 1..``days`` days back
  (``method="day"``: the median ignores one odd day, e.g. yesterday's incident).
- **level**: how today compares with that pattern, the ratio of the calls over the last ``level_window``
  complete minutes to what the baseline said for those same minutes. It carries trend (this week is 10 %
  busier than the last), holidays and unannounced changes into the forecast, and cancels any constant
  bias of the baseline (only its shape matters). A prior of ``level_prior`` calls a minute on both
  sides keeps a quiet model's ratio from jumping on a handful of calls; it is clamped to
  ``level_bounds``.

What it refuses to guess: a model first seen less than ``min_history`` ago, or whose samples are all
missing (nobody recorded then), has no forecast (``None``), never a forecast of zero. Missing minutes
(NaN: nobody was recording) are left out of samples and level alike; a level window with too little
data is 1 (no correction).

Leakage: a forecast made at issue minute ``i`` for ``T`` uses only minutes before ``i`` (the level) and
samples whose smoothing window ends before ``i`` (a sample offset must exceed ``T - i + smoothing``).
So :func:`predict` can run over a whole stored series at once and :func:`backtest` gives the error the
forecast really had, the "forecast-only" view a team reads before it lets the forecast scale anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .history import DAY_MINUTES, MinuteSeries

__all__ = ["Forecast", "ForecastError", "ModelSettings", "Prediction", "backtest", "forecast", "lookback", "predict"]

WEEK_MINUTES = 7 * DAY_MINUTES
Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ModelSettings:
    min_history: int = DAY_MINUTES  # minutes since a model's first call before it gets a forecast
    level_window: int = 30  # minutes compared with the pattern for the level
    smoothing: int = 2  # minutes either side of a sample's minute (5 would halve a 2-minute surge)
    weeks: int = 2  # weekly samples at most
    days: int = 3  # daily samples at most (used only before a week of history)
    level_prior: float = 1.0  # calls a minute added to both sides of the level ratio
    level_bounds: tuple[float, float] = (0.2, 5.0)
    min_coverage: float = 0.5  # share of a window (sample or level) that must have been recorded
    error_min_calls: float = 60.0  # minutes with fewer actual calls (1 req/s) are left out of the error

    def __post_init__(self) -> None:
        if self.level_window < 1 or self.smoothing < 0 or self.weeks < 0 or self.days < 0:
            raise ValueError("level_window >= 1, smoothing, weeks and days >= 0")
        if self.weeks + self.days == 0:
            raise ValueError("at least one of weeks and days")


def lookback(settings: ModelSettings) -> int:
    """Minutes of history before the issue minute that a forecast can use: the oldest sample's smoothing
    window behind the oldest minute of the level window, or the model's required age if longer."""
    oldest = max(settings.weeks * WEEK_MINUTES, settings.days * DAY_MINUTES)
    return max(oldest + settings.smoothing + settings.level_window, settings.min_history) + 1


@dataclass(frozen=True)
class Prediction:
    """:func:`predict`'s answer for arrays of (issue, target) minutes, in calls per minute."""

    value: Floats  # baseline * level; NaN: no forecast
    baseline: Floats
    level: Floats
    week: Floats  # mean of the weekly samples (NaN: none)
    day: Floats  # median of the daily samples (NaN: none)
    samples: list[Floats]  # every sample, weekly ones first (NaN: missing)


class _Pattern:
    """One series, prepared once: smoothed samples and running sums for the level."""

    def __init__(self, series: MinuteSeries, settings: ModelSettings) -> None:
        self.start = series.start
        self.settings = settings
        counts = series.counts
        self.n = int(counts.size)
        self.valid = ~np.isnan(counts)
        self.counts = np.where(self.valid, counts, 0.0)
        w = settings.smoothing
        index = np.arange(self.n)
        lo, hi = np.clip(index - w, 0, self.n), np.clip(index + w + 1, 0, self.n)
        total = _running(self.counts)
        seen = _running(self.valid.astype(np.float64))
        n_seen = seen[hi] - seen[lo]
        need = max(1.0, math.ceil(settings.min_coverage * (2 * w + 1)))
        with np.errstate(invalid="ignore", divide="ignore"):
            self.smooth = np.where(n_seen >= need, (total[hi] - total[lo]) / np.maximum(n_seen, 1.0), np.nan)

    def at(self, minutes: Ints) -> Floats:
        """Smoothed samples at absolute minutes (NaN outside the series)."""
        i = minutes - self.start
        inside = (i >= 0) & (i < self.n)
        out = np.full(minutes.shape, np.nan)
        out[inside] = self.smooth[i[inside]]
        return out

    def samples(self, targets: Ints, horizon: Ints) -> tuple[list[Floats], list[Floats]]:
        """Weekly and daily samples for each target; a sample whose window reaches the issue minute is NaN."""
        s = self.settings

        def usable(offset: int) -> Floats:
            sample = self.at(targets - offset)
            return np.where(offset > horizon + s.smoothing, sample, np.nan)

        weeks = [usable(k * WEEK_MINUTES) for k in range(1, s.weeks + 1)]
        days = [usable(j * DAY_MINUTES) for j in range(1, s.days + 1)]
        return weeks, days


def _running(values: Floats) -> Floats:
    return np.concatenate(([0.0], np.cumsum(values)))


def _nanmean(stack: list[Floats], shape: tuple[int, ...]) -> Floats:
    if not stack:
        return np.full(shape, np.nan)
    data = np.vstack(stack)
    count = np.sum(~np.isnan(data), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(data, axis=0) / np.maximum(count, 1), np.nan)


def _nanmedian(stack: list[Floats], shape: tuple[int, ...]) -> Floats:
    if not stack:
        return np.full(shape, np.nan)
    data = np.vstack(stack)
    out = np.full(shape, np.nan)
    some = np.any(~np.isnan(data), axis=0)
    if some.any():
        out[some] = np.nanmedian(data[:, some], axis=0)
    return out


def _baseline(pattern: _Pattern, targets: Ints, horizon: Ints) -> tuple[Floats, Floats, Floats, list[Floats]]:
    weeks, days = pattern.samples(targets, horizon)
    week = _nanmean(weeks, targets.shape)
    day = _nanmedian(days, targets.shape)
    return np.where(np.isnan(week), day, week), week, day, weeks + days


def predict(series: MinuteSeries, issues: Ints, targets: Ints, settings: ModelSettings) -> Prediction:
    """Forecasts (calls per minute) for each ``targets[k]`` made at minute ``issues[k]`` (data before it)."""
    issues = np.asarray(issues, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    if np.any(targets < issues):
        raise ValueError("a target lies before its issue minute")
    pattern = _Pattern(series, settings)
    horizon = targets - issues
    baseline, week, day, samples = _baseline(pattern, targets, horizon)
    level = _level(pattern, issues, settings)
    return Prediction(baseline * level, baseline, level, week, day, samples)


def _level(pattern: _Pattern, issues: Ints, s: ModelSettings) -> Floats:
    """Today against the pattern over ``[issue - level_window, issue)``, for each issue minute."""
    if issues.size == 0:
        return np.ones(0)
    lo_minute = int(issues.min()) - s.level_window
    span = np.arange(lo_minute, int(issues.max()), dtype=np.int64)  # only the minutes some window covers
    base, _, _, _ = _baseline(pattern, span, np.zeros(span.shape, dtype=np.int64))
    i = span - pattern.start
    inside = (i >= 0) & (i < pattern.n)
    counts = np.zeros(span.shape)
    counts[inside] = pattern.counts[i[inside]]
    both = ~np.isnan(base)
    both[inside] &= pattern.valid[i[inside]]
    both[~inside] = False
    actual = _running(np.where(both, counts, 0.0))
    expected = _running(np.where(both, base, 0.0))
    seen = _running(both.astype(np.float64))
    hi = issues - lo_minute
    lo = hi - s.level_window
    n_seen = seen[hi] - seen[lo]
    prior = s.level_prior * n_seen
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (actual[hi] - actual[lo] + prior) / (expected[hi] - expected[lo] + prior)
    ratio = np.where(n_seen >= s.min_coverage * s.level_window, ratio, 1.0)
    return np.clip(np.nan_to_num(ratio, nan=1.0), *s.level_bounds)


@dataclass(frozen=True)
class Forecast:
    """One model's forecast, with what it was made of (``/status`` shows it as :meth:`as_dict`)."""

    model: str
    rate: float  # req/s expected from now + lead until the next refresh (the highest minute of it)
    at: float  # now + lead, epoch seconds
    lead: float  # seconds
    baseline: float  # req/s the pattern says for that minute
    level: float  # today / pattern over the last level_window minutes
    method: str  # "week" or "day"
    samples: tuple[float | None, ...]  # req/s of each seasonal sample (weekly ones first; None: missing)
    current: float | None  # req/s over the last complete minute (None: not recorded)

    def as_dict(self) -> dict[str, object]:
        return {
            "requests_per_second": round(self.rate, 3),
            "at": round(self.at, 3),
            "lead_seconds": round(self.lead, 3),
            "baseline": round(self.baseline, 3),
            "level": round(self.level, 4),
            "method": self.method,
            "samples": [None if s is None else round(s, 3) for s in self.samples],
            "current": None if self.current is None else round(self.current, 3),
        }


def forecast(model: str, series: MinuteSeries, now: float, lead: float, settings: ModelSettings,
             refresh: float = 60.0) -> Forecast | None:
    """The demand ``lead`` seconds from ``now``: the highest forecast minute between now + lead and now +
    lead + ``refresh`` (pods asked for until the next refresh are warm within that span). None when the
    model is too new or its pattern unknown there."""
    issue = int(now // 60)
    known = MinuteSeries(series.start, series.window(series.start, issue))  # the current minute is incomplete
    first = known.first_seen()
    if first is None or issue - first < settings.min_history:
        return None
    targets = np.arange(int((now + lead) // 60), int((now + lead + refresh) // 60) + 1, dtype=np.int64)
    p = predict(known, np.full(targets.shape, issue, dtype=np.int64), targets, settings)
    if np.all(np.isnan(p.value)):
        return None
    k = int(np.nanargmax(p.value))
    last = known.window(issue - 1, issue)[0]
    return Forecast(
        model=model,
        rate=float(p.value[k]) / 60.0,
        at=now + lead,
        lead=lead,
        baseline=float(p.baseline[k]) / 60.0,
        level=float(p.level[k]),
        method="week" if not math.isnan(p.week[k]) else "day",
        samples=tuple(None if math.isnan(s[k]) else float(s[k]) / 60.0 for s in p.samples),
        current=None if math.isnan(last) else float(last) / 60.0,
    )


@dataclass(frozen=True)
class ForecastError:
    """How far the forecasts for a span of past minutes were from what came."""

    mape: float  # mean of |forecast - actual| / actual over the minutes counted
    bias: float  # sum(forecast - actual) / sum(actual): > 0 forecasts too high
    minutes: int  # minutes counted (busy enough, recorded, forecast known)

    def as_dict(self) -> dict[str, object]:
        return {"mape": round(self.mape, 4), "bias": round(self.bias, 4), "minutes": self.minutes}


def horizon_minutes(lead: float) -> int:
    """Whole minutes between a forecast's issue minute and its target at this lead (the worst case)."""
    return max(0, math.ceil(lead / 60))


def backtest(series: MinuteSeries, targets: Ints, lead: float, settings: ModelSettings,
             min_minutes: int = 60) -> ForecastError | None:
    """The error of the forecasts for ``targets`` (absolute minutes), each made ``lead`` before it with the
    data there was then. None with fewer than ``min_minutes`` minutes to judge."""
    targets = np.asarray(targets, dtype=np.int64)
    issues = targets - horizon_minutes(lead)
    p = predict(series, issues, targets, settings)
    first = series.first_seen()
    actual = series.window(int(targets.min()), int(targets.max()) + 1)[targets - int(targets.min())]
    old_enough = np.full(targets.shape, first is not None) & (issues - (first or 0) >= settings.min_history)
    counted = old_enough & ~np.isnan(p.value) & ~np.isnan(actual) & (actual >= settings.error_min_calls)
    if int(counted.sum()) < min_minutes:
        return None
    f, a = p.value[counted], actual[counted]
    return ForecastError(float(np.mean(np.abs(f - a) / a)), float(np.sum(f - a) / np.sum(a)), int(counted.sum()))

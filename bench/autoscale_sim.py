"""Autoscaling under a week of traffic: does the forecast get pods warm before the peak? (issue 18)

    .venv/bin/python bench/autoscale_sim.py [--seeds 7,8,9] [--capacity 2449] [--launch-to-warm 23.3]
                                            [--provision 0] [--surge 1] [--measure] [--plot docs/forecast_day.svg]

A Deployment serves a 7-day trace, second by second: a daily cycle (night trough, a steep morning ramp, a
lunch dip, an evening fall), a weekly one (quieter, later weekends; a busier Monday), +0.4 % a day of
growth, minute-to-minute noise (AR(1), 4 %) and per-second noise, and two spikes no pattern announces
(Wednesday 14:10 x1.7 for 20 min, Friday 20:30 x2.2 for 15 min). 14 days of the same traffic (with a
spike of its own) come before it as history, as ``forecast.history`` keeps. ``--surge`` adds a daily
announced surge at 09:00 on weekdays. Four policies scale it, on the same pods:

(a) HPA on CPU at 70 % (the common recipe; Kubernetes' default behavior);
(b) HPA on ``sidecar_queue_depth`` (the shipped ``k8s/overlays/triton/hpa.yaml``: average 8 per pod,
    up 4 pods a minute, down after 10 minutes' stabilisation by at most 20 % per 2 minutes);
(c) AWS-style predictive scaling plus (b): hourly forecasts 48 h ahead from the history (the mean of the
    same hour in past weeks, or past days before a week exists), refreshed every 6 h, each hour's
    capacity in place a scheduling buffer (5 min) before it, never scaling in on a forecast (it only
    raises the minimum);
(d) this forecast plus (b): ``k8s/autoscaling/triton-hpa-forecast.yaml``, the queue depth plus current
    demand and the forecast at now + lead, each over the pod's capacity at 80 %; the HPA takes the
    largest, so pods go only when current demand no longer needs them. Scale-up is Kubernetes' own.
Two ablations show where (d)'s gain comes from: (b) with (d)'s scale-up, and (d) without the forecast.

Pods: ``--capacity`` calls/s each (the headline's cold-pod case, docs/benchmarks.md: 2,449 req/s), warm
``--provision`` + ``--launch-to-warm`` seconds after launch (headline: 23.3 s; +/- ``--warm-jitter``),
and a pod takes traffic only once warm (the sidecar's readiness): a call never meets a cold pod, and
meets a saturated one when the warm pods cannot clear that second's calls and those queued before (a
fluid queue, at most the batcher's max_queue of 4,096 a pod; beyond it calls are refused, also counted).
Metrics reach the HPA as in a cluster: Prometheus scrapes every 15 s, metrics-server's CPU is a 15 s
average, the HPA acts every 15 s with its 10 % tolerance, stabilisation windows and rate limits.
``sidecar_queue_depth`` has an M/M/1 shape, k * rho / (1 - rho) per pod plus the backlog, k chosen so the
shipped target of 8 means ``--queue-utilisation`` (80 %). The forecast is sidecar/forecast/model.py itself,
fed the trace's per-minute counts, its lead the p90 of the pods' launch-to-warm plus ``--extra-lead``
(default: the provisioning plus one scrape and one HPA period).

Reports per policy the share of calls that met a cold or saturated pod and the pod-hours, per seed; the
forecast's error (MAPE per minute) at the lead horizon on the periodic part of the week (the spikes and
the hour after them left out) and on all of it; and the issue's goals. ``--measure`` first measures the
capacity and the launch-to-warm time on the headline model (a real Triton serving bench/models/minilm and
a sidecar, started through tests/servers.py: bench/headline.py's case 5; needs the Triton venv and wrk).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench import svgplot  # noqa: E402
from sidecar.forecast import (  # noqa: E402
    DAY_MINUTES,
    ForecastError,
    MinuteSeries,
    ModelSettings,
    backtest,
    percentile,
    predict,
)

WEEK = 7 * 86400
SYNC = 15  # seconds: the HPA's period, Prometheus' scrape interval, metrics-server's resolution
TOLERANCE = 0.1  # the HPA ignores a metric within 10 % of its target
HEADLINE_CAPACITY = 2449.0  # docs/benchmarks.md, headline case 5 (cold pod, cache + batching): req/s
HEADLINE_WARM = 23.3  # the same case: launch to the sidecar's /readyz 200, seconds
PEAK_PODS = 20_000 / HEADLINE_CAPACITY  # the weekday peak in pods of capacity: the fleet fits maxReplicas 20


# -- the trace --------------------------------------------------------------------------------------


def _up(h: np.ndarray, centre: float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(h - centre) / width))


def _bump(h: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((h - centre) / width) ** 2)


def shape(minutes: np.ndarray, surge: float = 1.0) -> np.ndarray:
    """Share of the weekday peak at each minute (minutes since the epoch, UTC). ``surge`` > 1 adds a daily
    announced surge on weekdays: x``surge`` within 2 minutes at 09:00, for half an hour, gone by 10:00
    (a market open, a scheduled batch, a push notification)."""
    h = (minutes % DAY_MINUTES) / 60.0
    dow = (minutes // DAY_MINUTES + 3) % 7  # 0: Monday (1970-01-01 was a Thursday)
    at_nine = np.clip((h - 9.0) * 30, 0, 1) * np.clip(1 - (h - 9.5) * 2, 0, 1)
    weekday = (0.12 + 0.83 * _up(h, 8.25, 0.35) * (1.0 - 0.62 * _up(h, 18.5, 0.6)) - 0.1 * _bump(h, 12.5, 0.5)
               + 0.12 * _bump(h, 21.0, 1.2) * _up(h, 18.5, 0.6))
    weekday = weekday * (1.0 - 0.75 * _up(h, 23.2, 0.4))  # late night
    weekend = 0.10 + 0.42 * _up(h, 10.5, 1.0) * (1.0 - 0.7 * _up(h, 21.5, 1.0))
    monday = np.where(dow == 0, 1.05, 1.0)
    return np.where(dow >= 5, weekend, weekday * monday * (1 + (surge - 1) * at_nine))


@dataclass(frozen=True)
class Spike:
    start: int  # minute
    factor: float
    minutes: int  # at full height
    rise: int = 2
    fall: int = 5

    def multiplier(self, minutes: np.ndarray) -> np.ndarray:
        t = minutes - self.start
        up = np.clip(t / self.rise, 0, 1)
        down = np.clip(1 - (t - self.rise - self.minutes) / self.fall, 0, 1)
        return 1.0 + (self.factor - 1.0) * np.where(t < 0, 0.0, np.minimum(up, down))

    def span(self, after: int = 60) -> tuple[int, int]:
        return self.start, self.start + self.rise + self.minutes + self.fall + after


@dataclass
class Trace:
    start: int  # first minute of the history (a Monday)
    history_days: int
    days: int
    minute_rate: np.ndarray  # expected calls/s per minute, history and week
    counts: np.ndarray  # calls per minute that arrived (what the sidecars record)
    second_calls: np.ndarray  # calls per second of the simulated week
    spikes: list[Spike]

    @property
    def week_start(self) -> int:
        return self.start + self.history_days * DAY_MINUTES


def make_trace(peak: float, days: int, history_days: int, seed: int, growth: float = 0.004,
               noise: float = 0.04, surge: float = 1.0) -> Trace:
    rng = np.random.default_rng(seed)
    start = 20_010 * DAY_MINUTES  # 2024-10-14, a Monday
    total = (history_days + days) * DAY_MINUTES
    minutes = start + np.arange(total)
    wander = np.empty(total)  # AR(1) minute noise: busy and quiet stretches of a few minutes
    eps = rng.normal(0.0, noise * math.sqrt(1 - 0.9**2), total)
    wander[0] = 0.0
    for i in range(1, total):
        wander[i] = 0.9 * wander[i - 1] + eps[i]
    rate = peak * shape(minutes, surge) * (1 + growth * (minutes - start) / DAY_MINUTES) * np.exp(wander)
    week = start + history_days * DAY_MINUTES
    spikes = [
        Spike(start + 8 * DAY_MINUTES + 11 * 60, 1.5, 20),  # in the history: Tuesday 11:00, +50 %
        Spike(week + 2 * DAY_MINUTES + 14 * 60 + 10, 1.7, 20),  # Wednesday 14:10, +70 %
        Spike(week + 4 * DAY_MINUTES + 20 * 60 + 30, 2.2, 15),  # Friday 20:30, x2.2 of the evening
    ]
    for spike in spikes:
        rate = rate * spike.multiplier(minutes)
    hist = history_days * DAY_MINUTES
    counts = np.empty(total)
    counts[:hist] = rng.poisson(rate[:hist] * 60)
    # The week second by second: the minute rate interpolated, a little per-second burstiness, Poisson.
    seconds = np.arange(days * 86400)
    per_second = np.interp(seconds / 60.0, np.arange(days * DAY_MINUTES), rate[hist:])
    per_second = per_second * np.exp(rng.normal(0.0, 0.02, seconds.size))
    calls = rng.poisson(per_second).astype(np.float64)
    counts[hist:] = calls.reshape(-1, 60).sum(axis=1)
    return Trace(start, history_days, days, rate, counts, calls, spikes[1:])  # the week's spikes


# -- the autoscaler ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    kind: str  # "Pods" or "Percent"
    value: int
    period: int


@dataclass(frozen=True)
class Behavior:
    up_window: int
    up: tuple[Rule, ...]
    down_window: int
    down: tuple[Rule, ...]


# The shipped HPA (k8s/overlays/triton/hpa.yaml), and Kubernetes' default behavior (no `behavior:`).
SHIPPED = Behavior(0, (Rule("Pods", 4, 60),), 600, (Rule("Percent", 20, 120),))
DEFAULT = Behavior(0, (Rule("Percent", 100, 15), Rule("Pods", 4, 15)), 300, (Rule("Percent", 100, 15),))
# k8s/autoscaling's forecast HPA: Kubernetes' own scale-up (its demand metrics are proportional, they do not
# overshoot as the queue depth does), the shipped scale-down.
FORECAST = Behavior(0, (Rule("Percent", 100, 15), Rule("Pods", 4, 15)), 600, (Rule("Percent", 20, 120),))


@dataclass
class Hpa:
    """The HorizontalPodAutoscaler's replica calculation (pkg/controller/podautoscaler), one sync at a time:
    per-metric proposals with the 10 % tolerance, their maximum, the stabilisation windows, the rate
    limits of ``behavior``, min and max replicas."""

    behavior: Behavior
    min_replicas: int = 2
    max_replicas: int = 20
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)  # (time, +added / -removed)

    @staticmethod
    def proposal(current: int, ratio: float, desired: float) -> int:
        """A metric's replicas: unchanged within the tolerance, else ceil(desired)."""
        if abs(ratio - 1.0) <= TOLERANCE:
            return current
        return math.ceil(desired - 1e-9)

    def step(self, now: float, current: int, proposals: Sequence[int]) -> int:
        desired = min(max(max(proposals), self.min_replicas), self.max_replicas)
        b = self.behavior
        self.recommendations.append((now, desired))
        keep = max(b.up_window, b.down_window)
        self.recommendations = [(t, r) for t, r in self.recommendations if now - t <= keep]
        up = min([r for t, r in self.recommendations if now - t <= b.up_window] or [desired])
        down = max([r for t, r in self.recommendations if now - t <= b.down_window] or [desired])
        target = min(max(current, up), down)
        if target > current:
            target = min(target, self._limit(now, current, b.up, up=True))
        elif target < current:
            target = max(target, self._limit(now, current, b.down, up=False))
        target = min(max(target, self.min_replicas), self.max_replicas)
        if target != current:
            self.events.append((now, target - current))
            self.events = [(t, d) for t, d in self.events if now - t <= 600]
        return target

    def _limit(self, now: float, current: int, rules: Sequence[Rule], up: bool) -> int:
        limits = []
        for rule in rules:
            added = sum(d for t, d in self.events if d > 0 and now - t < rule.period)
            removed = -sum(d for t, d in self.events if d < 0 and now - t < rule.period)
            start = current - added + removed
            if up:
                limits.append(start + rule.value if rule.kind == "Pods" else math.ceil(start * (1 + rule.value / 100)))
            else:
                limits.append(start - rule.value if rule.kind == "Pods" else int(start * (1 - rule.value / 100)))
        return max(limits) if up else min(limits)


# -- the policies -----------------------------------------------------------------------------------


@dataclass
class Signals:
    """What the metrics pipeline shows at one HPA sync (the last scrape)."""

    now: float
    replicas: int
    ready: int
    demand: float  # calls/s over the last 10 s (the sidecar's rate gauge, summed over pods)
    queue_depth: float  # summed over pods
    cpu: float  # sum over ready pods of their utilisation (metrics-server, a 15 s average)


@dataclass(frozen=True)
class Setup:
    capacity: float
    queue_target: float = 8.0
    queue_k: float = 2.0  # depth per pod = k * rho / (1 - rho)
    cpu_target: float = 0.7
    utilisation: float = 0.8  # the demand and forecast metrics' target: calls/s per pod over capacity
    max_queue: int = 4096  # calls a pod queues before refusing (the sidecar's batch.max_queue)


Policy = Callable[[Signals], list[int]]


def queue_policy(setup: Setup) -> Policy:
    def proposals(s: Signals) -> list[int]:
        average = s.queue_depth / max(s.replicas, 1)
        return [Hpa.proposal(s.replicas, average / setup.queue_target, s.queue_depth / setup.queue_target)]

    return proposals


def cpu_policy(setup: Setup) -> Policy:
    def proposals(s: Signals) -> list[int]:
        # Unready pods count as 0 % when scaling up (the HPA's rule for CPU), so the sum is over ready pods.
        ratio = s.cpu / (setup.cpu_target * max(s.replicas, 1))
        return [Hpa.proposal(s.replicas, ratio, s.cpu / setup.cpu_target)]

    return proposals


def external(setup: Setup, s: Signals, value: float) -> int:
    """An External (or Object) metric with an AverageValue target: pods = value / target."""
    pods = value / setup.capacity
    return Hpa.proposal(s.replicas, pods / (setup.utilisation * max(s.replicas, 1)), pods / setup.utilisation)


def forecast_policy(setup: Setup, forecast: Callable[[float], float | None]) -> Policy:
    reactive = queue_policy(setup)

    def proposals(s: Signals) -> list[int]:
        out = [*reactive(s), external(setup, s, s.demand)]
        ahead = forecast(s.now)
        if ahead is not None:  # no forecast: no metric, the HPA scales on the others
            out.append(external(setup, s, ahead))
        return out

    return proposals


def predictive_policy(setup: Setup, minimum: Callable[[float], int]) -> Policy:
    reactive = queue_policy(setup)

    def proposals(s: Signals) -> list[int]:
        return [*reactive(s), minimum(s.now)]  # AWS raises the minimum capacity; dynamic scaling does the rest

    return proposals


def aws_schedule(trace: Trace, setup: Setup, buffer: float = 300.0, refresh_hours: int = 6,
                 horizon_hours: int = 48, min_history_hours: int = 24) -> Callable[[float], int]:
    """Hourly capacity in the AWS manner. Every ``refresh_hours`` (from the week's start) a forecast of each
    hour's mean load for the next ``horizon_hours`` is made from the complete hours before it: the mean of
    the same hour of past weeks (up to two), or of the past days (up to three) before a week exists."""
    hourly = trace.counts[: (trace.history_days + trace.days) * DAY_MINUTES].reshape(-1, 60).mean(axis=1) / 60.0
    first_hour = trace.history_days * 24
    plan: dict[int, float] = {}  # hour index (from the trace's start) -> forecast calls/s
    for made in range(first_hour, first_hour + trace.days * 24, refresh_hours):
        if made < min_history_hours:
            continue
        for hour in range(made, made + horizon_hours):
            weeks = [hourly[hour - 168 * k] for k in (1, 2) if hour - 168 * k >= 0 and hour - 168 * k < made]
            days = [hourly[hour - 24 * k] for k in (1, 2, 3) if hour - 24 * k >= 0 and hour - 24 * k < made]
            if weeks or days:
                plan[hour] = float(np.mean(weeks)) if weeks else float(np.median(days))

    def minimum(now: float) -> int:
        load = plan.get(first_hour + int((now + buffer) // 3600), 0.0)  # each hour's capacity, `buffer` early
        return math.ceil(load / (setup.capacity * setup.utilisation))

    return minimum


@dataclass
class ForecastTrack:
    """The sidecar's forecast over the week, made the way the sidecar makes it: refreshed at each minute,
    the highest forecast minute from now + lead to now + lead + 60 s, with the data before that minute."""

    lead: float
    per_minute: np.ndarray  # calls/s; NaN: no forecast
    settings: ModelSettings

    @classmethod
    def build(cls, trace: Trace, lead: float, settings: ModelSettings) -> ForecastTrack:
        series = MinuteSeries(trace.start, trace.counts)
        issues = trace.week_start + np.arange(trace.days * DAY_MINUTES, dtype=np.int64)
        first = issues + int(lead // 60)
        best = np.full(issues.shape, np.nan)
        for extra in (0, 1):
            targets = first + extra
            value = predict(series, issues, targets, settings).value / 60.0
            best = np.fmax(best, value)
        return cls(lead, best, settings)

    def at(self, now: float) -> float | None:
        value = self.per_minute[min(int(now // 60), self.per_minute.size - 1)]
        return None if math.isnan(value) else float(value)


# -- the simulation ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    saturated_calls: float = 0.0
    calls: float = 0.0
    pod_seconds: float = 0.0
    peak_replicas: int = 0
    replicas_per_minute: list[int] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.saturated_calls / self.calls if self.calls else 0.0

    @property
    def pod_hours(self) -> float:
        return self.pod_seconds / 3600.0


def simulate(name: str, trace: Trace, setup: Setup, policy: Policy, behavior: Behavior, warm: Callable[[], float],
             initial: int) -> Outcome:
    hpa = Hpa(behavior)
    calls = trace.second_calls
    capacity = setup.capacity
    ready_at: list[float] = [0.0] * initial  # each pod's ready time, in launch order
    backlog = 0.0
    out = Outcome(name)
    window = np.zeros(SYNC)  # per-second utilisation of the last 15 s (metrics-server's CPU average)
    rate_window = np.zeros(10)  # the sidecar's 10 s rate gauge
    signals: Signals | None = None
    for t in range(calls.size):
        if t % SYNC == 0 and signals is not None:
            replicas = len(ready_at)
            target = hpa.step(float(t), replicas, policy(signals))
            if target > replicas:
                ready_at += [t + warm() for _ in range(target - replicas)]
            elif target < replicas:
                ready_at = _scale_in(ready_at, replicas - target, t)
        ready = sum(1 for r in ready_at if r <= t)
        d = calls[t]
        served_capacity = ready * capacity
        if backlog + d > served_capacity:
            out.saturated_calls += d
        # Calls past the pods' queues (the batcher's max_queue each) are refused with 503, not queued.
        backlog = min(max(0.0, backlog + d - served_capacity), setup.max_queue * ready)
        out.calls += d
        out.pod_seconds += len(ready_at)
        rho = min((d + backlog) / served_capacity, 0.999) if served_capacity else 0.999
        window[t % SYNC] = rho
        rate_window[t % 10] = d
        if t % 60 == 0:
            out.replicas_per_minute.append(len(ready_at))
        out.peak_replicas = max(out.peak_replicas, len(ready_at))
        if t % SYNC == SYNC - 1:  # the scrape the next sync reads
            per_pod = setup.queue_k * rho / (1.0 - rho) + (backlog / ready if ready else 0.0)
            signals = Signals(float(t + 1), len(ready_at), ready, float(rate_window.mean()), per_pod * ready,
                              float(window.mean()) * ready)
    return out


def _scale_in(ready_at: list[float], remove: int, now: float) -> list[float]:
    """A ReplicaSet deletes pods that are not ready first, then the newest."""
    order = sorted(range(len(ready_at)), key=lambda i: (ready_at[i] <= now, -i))
    gone = set(order[:remove])
    return [r for i, r in enumerate(ready_at) if i not in gone]


# -- report -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    value: float
    bound: float
    at_least: bool

    @property
    def met(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    def cell(self) -> str:
        shown = "inf" if math.isinf(self.value) else f"{self.value:.3g}"
        return f"{shown} {'met' if self.met else '**not met**'}"


def goals(out: dict[str, Outcome], mape: float | None) -> list[Goal]:
    b, c, d = out["b"], out["c"], out["d"]

    def ratio(x: Outcome) -> float:
        return x.share / d.share if d.share else (math.inf if x.share else 1.0)

    return [
        Goal(ratio(b), 5.0, True),
        Goal(ratio(c), 1.0, True) if d.share else Goal(math.inf if c.share else 1.0, 1.0, True),
        Goal(d.pod_hours / b.pod_hours, 1.1, False),
        Goal(math.inf if mape is None else mape, 0.15, False),
    ]


def table(out: dict[str, Outcome]) -> list[str]:
    lines = ["| policy | calls meeting a cold or saturated pod | vs (b) | pod-hours | vs (b) | most replicas |",
             "|---|---|---|---|---|---|"]
    b = out["b"]
    for o in out.values():
        vs = f"{o.share / b.share:.3f}x" if b.share else "-"
        lines.append(f"| {o.name} | {o.share:.4%} ({o.saturated_calls:,.0f} of {o.calls:,.0f}) | {vs} | "
                     f"{o.pod_hours:,.1f} | {o.pod_hours / b.pod_hours:.3f}x | {o.peak_replicas} |")
    return lines


# -- the plot ---------------------------------------------------------------------------------------


def plot_day(path: Path, trace: Trace, track: ForecastTrack, out: dict[str, Outcome], capacity: float, day: int,
             title: str) -> None:
    """One day: demand and the forecast (top), replicas per policy and the pods demand needs (bottom)."""
    lo = day * DAY_MINUTES
    hours = np.arange(DAY_MINUTES) / 60.0
    demand = trace.counts[trace.history_days * DAY_MINUTES + lo:][:DAY_MINUTES] / 60.0
    ahead = track.per_minute[lo : lo + DAY_MINUTES]
    shift = round(track.lead / 60)  # the forecast drawn at the minute it is for
    ahead_at = np.full(DAY_MINUTES, np.nan)
    ahead_at[shift:] = ahead[: DAY_MINUTES - shift]
    width, height = svgplot.WIDTH, 640
    left, right, top = svgplot.LEFT, svgplot.RIGHT, svgplot.TOP
    panel = (height - top - 2 * svgplot.BOTTOM) // 2
    plot_w = width - left - right
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>']

    def panel_frame(y0: float, y_max: float, label: str, fmt: Callable[[float], str]) -> Callable[[float], float]:
        def py(v: float) -> float:
            return y0 + panel - v / y_max * panel

        for k in range(6):
            v = y_max * k / 5
            svg.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#ddd"/>')
            svg.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{fmt(v)}</text>')
        for hour in range(0, 25, 3):
            x = left + hour / 24 * plot_w
            svg.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + panel}" stroke="#eee"/>')
            svg.append(f'<text x="{x:.1f}" y="{y0 + panel + 15}" text-anchor="middle">{hour:02d}:00</text>')
        svg.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel}" fill="none" stroke="#333"/>')
        svg.append(f'<text x="16" y="{y0 + panel / 2}" transform="rotate(-90 16 {y0 + panel / 2})" '
                   f'text-anchor="middle">{escape(label)}</text>')
        return py

    def line(py: Callable[[float], float], ys: np.ndarray, colour: str, dash: str = "", step: bool = False) -> None:
        points: list[str] = []
        last: float | None = None
        for i, (x, y) in enumerate(zip(hours, ys, strict=True)):
            if math.isnan(y) or (step and y == last and i < len(ys) - 1):
                continue  # a step line needs only its changes
            px = left + x / 24 * plot_w
            if step and last is not None:
                points.append(f"{px:.1f},{py(last):.1f}")
            points.append(f"{px:.1f},{py(float(y)):.1f}")
            last = float(y)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        svg.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{colour}" stroke-width="1.4"{extra}/>')

    def legend(y: float, colour: str, text: str, dash: str = "") -> None:
        x = left + plot_w + 14
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        svg.append(f'<line x1="{x}" x2="{x + 22}" y1="{y - 4}" y2="{y - 4}" stroke="{colour}" '
                   f'stroke-width="2"{extra}/>')
        svg.append(f'<text x="{x + 28}" y="{y}">{escape(text)}</text>')

    top_max = float(np.nanmax([np.nanmax(demand), np.nanmax(ahead_at)])) * 1.1
    py = panel_frame(top, top_max, "calls per second", lambda v: f"{v / 1000:.0f}k")
    line(py, demand, "#333")
    line(py, ahead_at, svgplot.COLOURS[3], dash="5,3")
    legend(top + 20, "#333", "demand")
    legend(top + 40, svgplot.COLOURS[3], f"forecast made {track.lead:.0f} s before", dash="5,3")
    y1 = top + panel + svgplot.BOTTOM
    replicas = {k: np.array(o.replicas_per_minute[lo : lo + DAY_MINUTES], dtype=float) for k, o in out.items()
                if k in "abcd"}
    needed = np.ceil(demand / capacity)
    r_max = max(float(max(np.nanmax(v) for v in replicas.values())), float(np.nanmax(needed))) + 2
    py2 = panel_frame(y1, r_max, "replicas", lambda v: f"{v:.0f}")
    line(py2, needed, "#999", dash="2,2", step=True)
    legend(y1 + 20, "#999", "pods demand needs at 100 %", dash="2,2")
    for i, key in enumerate(replicas):
        colour = svgplot.COLOURS[i % len(svgplot.COLOURS)]
        line(py2, replicas[key], colour, step=True)
        legend(y1 + 40 + 18 * i, colour, out[key].name[:34])
    svg.append(f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle">time of day (UTC)</text>')
    svg.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(svg) + "\n")


# -- measuring on the headline model ----------------------------------------------------------------


def measure(seconds: float = 20.0, record_seconds: float = 30.0) -> tuple[float, float]:
    """Capacity (req/s at saturation, 32 connections) and launch-to-warm (s) of the headline model: a real
    Triton serving bench/models/minilm behind a sidecar that replays what another replica recorded
    (bench/headline.py's case 5, which starts both through tests/servers.py)."""
    import tempfile

    from bench import headline

    args = headline.parse_args(["--cases", "5", "--seconds", str(seconds), "--record-seconds", str(record_seconds),
                                "--out", str(ROOT / "bench" / "out" / "autoscale-measure")])
    with tempfile.TemporaryDirectory(prefix="autoscale-measure-") as tmp:
        bench = headline.Bench(args, Path(tmp))
        bench.case_headline()
    measured = bench.results["5"]
    return measured.result.rps, measured.ready


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capacity", type=float, default=HEADLINE_CAPACITY, help="req/s one pod serves (default: "
                   "the headline's cold-pod case)")
    p.add_argument("--launch-to-warm", type=float, default=HEADLINE_WARM, help="seconds from launch to warm")
    p.add_argument("--warm-jitter", type=float, default=0.15, help="each pod's launch-to-warm varies by this share")
    p.add_argument("--provision", type=float, default=0.0,
                   help="seconds before a pod's containers start (node, scheduling, image pull)")
    p.add_argument("--extra-lead", type=float, default=None,
                   help="forecast.extra_lead (default: --provision + one scrape + one HPA period, 30 s)")
    p.add_argument("--peak", type=float, default=None,
                   help=f"weekday peak demand, req/s (default: {PEAK_PODS:g} pods' capacity, 20,000 req/s at the "
                        "headline's; the spikes stay under maxReplicas 20 at 100 %%)")
    p.add_argument("--surge", type=float, default=1.0,
                   help="a daily weekday surge at 09:00 of this factor (1: none), part of the pattern")
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--history-days", type=int, default=14)
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[7, 8, 9],
                   help="traces to simulate (comma-separated seeds); the plot shows the first")
    p.add_argument("--smoothing", type=int, default=ModelSettings.smoothing, help="forecast.smoothing, minutes")
    p.add_argument("--level-window", type=int, default=ModelSettings.level_window,
                   help="forecast.level_window, minutes")
    p.add_argument("--utilisation", type=float, default=0.8, help="target of the demand and forecast metrics")
    p.add_argument("--queue-utilisation", type=float, default=0.8,
                   help="utilisation at which a pod's queue depth is the HPA's target of 8")
    p.add_argument("--plot", default=str(ROOT / "docs" / "forecast_day.svg"))
    p.add_argument("--plot-day", type=int, default=2, help="day of the week plotted (0: Monday)")
    p.add_argument("--measure", action="store_true", help="measure capacity and launch-to-warm on the headline "
                   "model first (real Triton + sidecar; minutes)")
    return p.parse_args(argv)


@dataclass
class Run:
    seed: int
    trace: Trace
    track: ForecastTrack
    out: dict[str, Outcome]
    mape: dict[str, float | None]


def run_seed(args: argparse.Namespace, seed: int, setup: Setup, lead: float, settings: ModelSettings) -> Run:
    trace = make_trace(args.peak, args.days, args.history_days, seed, surge=args.surge)
    track = ForecastTrack.build(trace, lead, settings)
    policies: dict[str, tuple[str, Policy, Behavior]] = {
        "a": ("(a) HPA, CPU 70 %", cpu_policy(setup), DEFAULT),
        "b": ("(b) HPA, queue depth (shipped)", queue_policy(setup), SHIPPED),
        "c": ("(c) AWS-style predictive + (b)", predictive_policy(setup, aws_schedule(trace, setup)), SHIPPED),
        "d": ("(d) forecast at now + lead + (b)", forecast_policy(setup, track.at), FORECAST),
        # Ablations, not policies of the issue: what (d) owes to its scale-up behavior, to the current-demand
        # metric, and so what the forecast itself adds.
        "b+": ("(b) with (d)'s scale-up (ablation)", queue_policy(setup), FORECAST),
        "d-": ("(d) without the forecast (ablation)", forecast_policy(setup, lambda _: None), FORECAST),
    }
    first_need = math.ceil(trace.second_calls[:60].mean() / (setup.capacity * setup.utilisation))
    out = {}
    for key, (name, policy, behavior) in policies.items():
        print(f"seed {seed}: simulating {name} ...", file=sys.stderr, flush=True)
        rng = np.random.default_rng(seed + 1)  # every policy's pods warm alike

        def warm(rng: np.random.Generator = rng) -> float:
            jitter = float(rng.uniform(1 - args.warm_jitter, 1 + args.warm_jitter))
            return float(args.provision + args.launch_to_warm * jitter)

        out[key] = simulate(name, trace, setup, policy, behavior, warm, max(2, first_need))
    series = MinuteSeries(trace.start, trace.counts)
    week = trace.week_start + np.arange(trace.days * DAY_MINUTES, dtype=np.int64)
    periodic = np.ones(week.size, dtype=bool)
    for spike in trace.spikes:
        lo, hi = spike.span(after=settings.level_window + 30)
        periodic &= (week < lo) | (week >= hi)
    mape = {"periodic": _mape(backtest(series, week[periodic], lead, settings)),
            "all": _mape(backtest(series, week, lead, settings))}
    return Run(seed, trace, track, out, mape)


def _mape(error: ForecastError | None) -> float | None:
    return None if error is None else error.mape


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        args.capacity, args.launch_to_warm = measure()
        print(f"measured: {args.capacity:,.0f} req/s at saturation, launch to warm {args.launch_to_warm:.1f} s",
              file=sys.stderr)
    if args.peak is None:
        args.peak = PEAK_PODS * args.capacity
    rho = args.queue_utilisation
    setup = Setup(args.capacity, queue_k=8.0 * (1 - rho) / rho, utilisation=args.utilisation)
    # The lead the sidecars would measure: the p90 of 100 pods' launch-to-warm times, plus extra_lead.
    sampled = args.launch_to_warm * np.random.default_rng(0).uniform(1 - args.warm_jitter, 1 + args.warm_jitter, 100)
    warm_p90 = percentile([float(x) for x in sampled], 0.9)
    extra = args.extra_lead if args.extra_lead is not None else args.provision + 2 * SYNC
    lead = warm_p90 + extra
    settings = ModelSettings(smoothing=args.smoothing, level_window=args.level_window)
    runs = [run_seed(args, seed, setup, lead, settings) for seed in args.seeds]
    print(f"Per-pod capacity {args.capacity:,.0f} req/s; launch-to-warm {args.launch_to_warm:g} s (+/- "
          f"{args.warm_jitter:.0%}) after {args.provision:g} s of provisioning; forecast lead {lead:.0f} s (p90 "
          f"{warm_p90:.1f} s + extra_lead {extra:g} s); weekday peak {args.peak:,.0f} req/s; {args.days} days "
          f"simulated after {args.history_days} days of history; target utilisation {args.utilisation:.0%}.")
    for r in runs:
        print(f"\n### seed {r.seed}\n")
        print("\n".join(table(r.out)))
        print(f"\nforecast MAPE at the lead horizon (per minute): periodic part {_pct(r.mape['periodic'])}, "
              f"whole week with its spikes {_pct(r.mape['all'])}")
    print("\n### goals\n")
    print("| seed | (b) / (d), cold or saturated calls (>= 5) | (c) / (d) (> 1) | (d) / (b) pod-hours (<= 1.1) "
          "| MAPE, periodic (<= 15 %) |")
    print("|---|---|---|---|---|")
    for r in runs:
        print("| " + " | ".join([str(r.seed)] + [g.cell() for g in goals(r.out, r.mape["periodic"])]) + " |")
    if args.plot:
        first = runs[0]
        plot_day(Path(args.plot), first.trace, first.track, first.out, args.capacity, args.plot_day,
                 f"Day {args.plot_day + 1} of the simulated week (seed {first.seed}): demand, forecast, replicas")
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


if __name__ == "__main__":
    sys.exit(main())

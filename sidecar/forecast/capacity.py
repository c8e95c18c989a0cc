"""What one pod can serve of a model, in calls per second: the denominator of "pods needed".

Three sources, the first known wins, except that a pod never claims less than it has served:

1. ``forecast.capacity`` (``MODEL=REQ/S``): the operator's own figure;
2. the batcher's latency model: with a batch of ``b`` rows taking ``latency(b)`` seconds and ``instances``
   batches in flight, the model server completes ``instances * b / latency(b)`` rows a second; the best
   batch size *seen* counts (never an extrapolation to sizes never measured). Calls answered from the
   cache cost no row, so calls a second = rows a second / the share of calls that miss (floored at
   ``MIN_MISS_SHARE``: a cache-hit share measured in a quiet hour must not promise 100x);
3. the observed peak: the highest per-second rate the pod served, over the last ``window`` seconds. A
   lower bound by construction (the pod served that much), so it also corrects an estimate too low.

None when nothing is known: no ``sidecar_capacity_requests_per_second`` series for that model, and an
autoscaler then falls back on its queue-depth metric.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["MIN_MISS_SHARE", "Capacity", "LatencySource", "PeakRate", "capacity", "from_latency", "parse_overrides"]

MIN_MISS_SHARE = 0.05


class LatencySource(Protocol):
    """What :class:`sidecar.latency.LatencyModel` offers: seconds per batch size seen."""

    def known(self, model: str) -> dict[int, float]: ...


@dataclass(frozen=True)
class Capacity:
    rate: float  # calls per second one pod serves
    source: str  # "configured", "latency" or "peak"

    def as_dict(self) -> dict[str, object]:
        return {"requests_per_second": round(self.rate, 3), "source": self.source}


def from_latency(latency: LatencySource, model: str, *, instances: int = 1, miss_share: float = 1.0) -> float | None:
    """Calls a second the model server gives this model at the best batch size measured, or None."""
    best = max((batch / seconds for batch, seconds in latency.known(model).items() if seconds > 0 and batch > 0),
               default=None)
    if best is None:
        return None
    return best * max(1, instances) / min(1.0, max(miss_share, MIN_MISS_SHARE))


class PeakRate:
    """The highest rate served per model over a sliding window, kept as one maximum per ``bucket`` seconds
    (bounded: ``window / bucket`` numbers per model)."""

    def __init__(self, window: float = 86400.0, bucket: float = 60.0) -> None:
        self.window = window
        self.bucket = bucket
        self._buckets: dict[str, deque[tuple[int, float]]] = {}

    def observe(self, model: str, rate: float, now: float) -> None:
        slot = int(now // self.bucket)
        buckets = self._buckets.setdefault(model, deque())
        if buckets and buckets[-1][0] == slot:
            if rate > buckets[-1][1]:
                buckets[-1] = (slot, rate)
        elif rate > 0:
            buckets.append((slot, rate))
        oldest = int((now - self.window) // self.bucket)
        while buckets and buckets[0][0] < oldest:
            buckets.popleft()

    def peak(self, model: str, now: float) -> float | None:
        oldest = int((now - self.window) // self.bucket)
        rates = [r for slot, r in self._buckets.get(model, ()) if slot >= oldest]
        return max(rates, default=None)

    def forget(self, keep: set[str]) -> None:
        for model in [m for m in self._buckets if m not in keep]:
            del self._buckets[model]


def capacity(model: str, *, configured: Mapping[str, float], estimate: float | None,
             peak: float | None) -> Capacity | None:
    if model in configured:
        return Capacity(configured[model], "configured")
    if estimate is not None and (peak is None or estimate >= peak):
        return Capacity(estimate, "latency")
    if peak is not None:
        return Capacity(peak, "peak")
    return None


def parse_overrides(items: tuple[str, ...]) -> dict[str, float]:
    """``forecast.capacity``'s MODEL=REQ/S pairs (already validated by the configuration)."""
    out = {}
    for item in items:
        model, _, rate = item.rpartition("=")
        out[model] = float(rate)
    return out

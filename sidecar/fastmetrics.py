"""Lock-free labelled counters and histograms for the per-call hot path.

prometheus_client guards every value with a lock (five lock round-trips per proxied call for a
counter and two histograms). The sidecar's data path runs on one event loop, and scrapes are
served by that same loop, so plain integers suffice: observing is a dict lookup, a bisect and two
additions. The families are handed to prometheus_client at scrape time as a custom collector, so
the exposition format is its own.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric


class FastCounter:
    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in sorted(self.values.items()):
            family.add_metric(list(key), value)
        yield family


class _Series:
    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last one is +Inf
        self.sum = 0.0


class FastHistogram:
    def __init__(self, name: str, documentation: str, labels: Sequence[str], buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.bounds = sorted(buckets)
        self.series: dict[tuple[str, ...], _Series] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series(len(self.bounds))
        series.counts[bisect.bisect_left(self.bounds, value)] += 1
        series.sum += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, series in sorted(self.series.items()):
            cumulative, running = [], 0
            for bound, count in zip([*map(_le, self.bounds), "+Inf"], series.counts, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            family.add_metric(list(key), cumulative, series.sum)
        yield family


def _le(bound: float) -> str:
    return repr(float(bound))


class FastCollector:
    """Registers fast families with a prometheus_client registry."""

    def __init__(self, *families: FastCounter | FastHistogram) -> None:
        self.families = families

    def describe(self) -> Iterator[Metric]:
        """Names and types only (no samples): what the registry checks for clashes."""
        for f in self.families:
            yield from _empty(f).collect()

    def collect(self) -> Iterator[Metric]:
        for f in self.families:
            yield from f.collect()


def _empty(f: FastCounter | FastHistogram) -> FastCounter | FastHistogram:
    if isinstance(f, FastCounter):
        return FastCounter(f.name, f.documentation, f.labels)
    return FastHistogram(f.name, f.documentation, f.labels, f.bounds)

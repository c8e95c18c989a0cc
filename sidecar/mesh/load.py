"""Per-model load of the data port: calls in flight, and calls per second over a sliding window.

One tracker feeds both the autoscaler gauges (``sidecar_queue_depth``,
``sidecar_model_requests_per_second``) and the ORCA reports Envoy weights pods by, so both say
the same thing. The data port calls ``begin``/``end`` around every inference call; that costs
two dict updates and a clock read. Rates are summed only when someone asks (a scrape, a report).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

WINDOW_SECONDS = 10
_RATE_REUSE = 0.1


class LoadTracker:
    def __init__(self, window: int = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self.in_flight: dict[str, int] = {}  # a model leaves the dict when its last call ends: bounded
        self.total = 0
        self._started = clock()
        # One bucket per whole second of arrivals: (second, {model: count}), oldest first.
        self._buckets: collections.deque[tuple[int, dict[str, int]]] = collections.deque()
        self._rate, self._rate_at = 0.0, float("-inf")

    def __repr__(self) -> str:
        return f"<LoadTracker in_flight={self.total} models={len(self.in_flight)}>"

    def begin(self, model: str) -> None:
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        self.total += 1
        second = int(self.clock())
        buckets = self._buckets
        if not buckets or buckets[-1][0] != second:
            buckets.append((second, {}))
            while buckets[0][0] <= second - self.window:
                buckets.popleft()
        counts = buckets[-1][1]
        counts[model] = counts.get(model, 0) + 1

    def end(self, model: str) -> None:
        left = self.in_flight.get(model, 0) - 1
        if left > 0:
            self.in_flight[model] = left
        else:
            self.in_flight.pop(model, None)
        self.total = max(0, self.total - 1)

    def rates(self) -> dict[str, float]:
        """Calls per second per model that began within the window."""
        now = self.clock()
        oldest = int(now) - self.window + 1
        counts: dict[str, int] = {}
        for second, bucket in self._buckets:
            if second >= oldest:
                for model, n in bucket.items():
                    counts[model] = counts.get(model, 0) + n
        # The window is the last whole seconds plus the current partial one, and never longer
        # than the process has lived: a new pod's first calls are not spread over time it was not up.
        span = min(self.window - 1 + (now - int(now)), now - self._started)
        span = max(span, 1.0)
        return {model: n / span for model, n in counts.items()}

    def rate(self) -> float:
        """All models' calls per second; summed at most every ``_RATE_REUSE`` s, as ORCA asks on every answer."""
        now = self.clock()
        if now - self._rate_at >= _RATE_REUSE:
            self._rate, self._rate_at = sum(self.rates().values()), now
        return self._rate

"""Where the history's counts come from: running per-model call totals the data port keeps anyway.

The data port already counts every inference call per model (for ``sidecar_requests_total`` and the
load it reports); the feed reads those totals on each tick (the history's flush interval) and adds
what each model gained since the last tick to the current minute. Nothing is added to the data path,
and a tick costs one dict walk whatever the traffic. Totals that go down (a counter reset) restart
from the new value without adding a negative count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping

from .history import History

__all__ = ["CounterFeed", "by_model"]

Clock = Callable[[], float]


def by_model(values: Mapping[tuple[str, ...], float], model_index: int = 1,
             skip: Collection[str] = ("", "other")) -> dict[str, float]:
    """Sums a labelled counter's values (``FastCounter.values``: (route, model, status) -> total) per model.
    ``skip``: no model (health checks and the like) and ``other`` (names the server does not have)."""
    totals: dict[str, float] = {}
    for key, value in values.items():
        model = key[model_index]
        if model not in skip:
            totals[model] = totals.get(model, 0.0) + value
    return totals


class CounterFeed:
    def __init__(self, history: History, totals: Callable[[], Mapping[str, float]], *,
                 clock: Clock = time.time) -> None:
        self.history = history
        self._totals = totals
        self._clock = clock
        self._last: dict[str, float] = dict(totals())  # calls before the feed started are not this minute's

    def tick(self) -> None:
        minute = int(self._clock() // 60)
        now = dict(self._totals())
        for model, total in now.items():
            gained = total - self._last.get(model, 0.0)
            if gained >= 1:
                self.history.add(model, minute, int(gained))
                now[model] = self._last.get(model, 0.0) + int(gained)  # a fraction waits for the next tick
            elif gained < 0:
                now[model] = total  # the counter was reset
            else:
                now[model] = self._last.get(model, 0.0)
        self._last = now

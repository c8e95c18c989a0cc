"""Latency per batch size, per model, learned from warm-up and live traffic (moving averages).

The batcher asks for the largest batch whose predicted latency keeps within a target. Sizes never
seen are predicted by linear interpolation between the nearest seen ones, and beyond the largest
by extending the line through the two largest (a batch costs at least what a smaller one does).
"""

from __future__ import annotations

import bisect

_ALPHA = 0.2  # weight of a new observation in the moving average


class LatencyModel:
    def __init__(self) -> None:
        self._seconds: dict[str, dict[int, float]] = {}

    def __repr__(self) -> str:
        return f"<LatencyModel {len(self._seconds)} models>"

    def observe(self, model: str, batch: int, seconds: float) -> None:
        known = self._seconds.setdefault(model, {})
        old = known.get(batch)
        known[batch] = seconds if old is None else old + _ALPHA * (seconds - old)

    def seed(self, model: str, batch: int, seconds: float) -> None:
        """What another part measured (warm-up's latencies, from the control plane): taken only where this
        model has not learned the size from live batches itself."""
        known = self._seconds.setdefault(model, {})
        known.setdefault(batch, seconds)

    def table(self) -> dict[str, dict[int, float]]:
        """Everything learned, for the control plane's snapshot."""
        return {model: dict(sizes) for model, sizes in self._seconds.items()}

    def known(self, model: str) -> dict[int, float]:
        return dict(sorted(self._seconds.get(model, {}).items()))

    def predict(self, model: str, batch: int) -> float | None:
        known = self._seconds.get(model)
        if not known:
            return None
        sizes = sorted(known)
        if batch in known:
            return known[batch]
        i = bisect.bisect_left(sizes, batch)
        if i == 0:
            return known[sizes[0]]  # smaller than anything seen: at most what the smallest costs
        if i == len(sizes):
            if len(sizes) == 1:
                return known[sizes[-1]] * batch / sizes[-1]
            (b0, b1) = sizes[-2], sizes[-1]
            slope = max(0.0, (known[b1] - known[b0]) / (b1 - b0))
            return known[b1] + slope * (batch - b1)
        b0, b1 = sizes[i - 1], sizes[i]
        return known[b0] + (known[b1] - known[b0]) * (batch - b0) / (b1 - b0)

    def knee(self, model: str, max_batch: int, share: float = 0.95) -> int:
        """The smallest measured batch size whose rows per second are within ``share`` of the best measured:
        past it a batch adds waiting, not throughput. ``max_batch`` until two sizes are known."""
        known = {b: s for b, s in self._seconds.get(model, {}).items() if 0 < b <= max_batch and s > 0}
        if len(known) < 2:
            return max_batch
        best = max(b / s for b, s in known.items())
        return min(b for b, s in known.items() if b / s >= share * best)

    def cap(self, model: str, target: float, max_batch: int) -> int:
        """The largest batch (1..max_batch) predicted to answer within ``target`` seconds; ``max_batch``
        with no target or no data, 1 when even one row is predicted slower."""
        if target <= 0 or not self._seconds.get(model):
            return max_batch
        best = 1
        for batch in range(1, max_batch + 1):
            predicted = self.predict(model, batch)
            if predicted is not None and predicted > target:
                break
            best = batch
        return best

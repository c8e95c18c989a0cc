"""Space-Saving heavy-hitter sketch (Metwally, Agrawal, El Abbadi, ICDT 2005), weighted variant.

The recorder sees every request but may remember only ``capacity`` identities between two flushes.
Space-Saving keeps at most ``capacity`` counters; a new key takes over the smallest counter and
inherits its count as overestimation ``error``. Guarantees (``total`` = sum of offered counts):

- every key whose true count exceeds ``total / capacity`` is present;
- for each present key, ``count - error <= true count <= count``;
- the counts sum to ``total``.

Implementation: a dict of counters plus a min-heap holding exactly one entry per key. Counts only
grow, so a heap entry may lag behind its counter ("lazy increase-key"); when the heap's minimum is
stale it is pushed back with the current count and the next minimum is examined. Each re-push pays
for at least one earlier increment, so ``offer`` is O(log k) amortised and the heap never holds
more than ``capacity`` entries.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["SpaceSaving"]

K = TypeVar("K", bound=Hashable)


class _Counter:
    __slots__ = ("count", "error")

    def __init__(self, count: int, error: int) -> None:
        self.count = count
        self.error = error


class SpaceSaving(Generic[K]):
    """At most ``capacity`` (key, count, error) counters; see the module docstring."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.total = 0
        self._counters: dict[K, _Counter] = {}
        # (count when pushed, tie-breaker, key); the tie-breaker keeps keys from ever being compared.
        self._heap: list[tuple[int, int, K]] = []
        self._sequence = itertools.count()

    def offer(self, key: K, count: int = 1) -> K | None:
        """Counts ``count`` sightings of ``key``; returns the key evicted to make room, if any.

        The recorder uses the returned key to drop what it keeps beside the sketch (payloads).
        """
        if count < 1:
            raise ValueError(f"count must be positive, got {count}")
        self.total += count
        counter = self._counters.get(key)
        if counter is not None:
            counter.count += count  # its heap entry is now stale-low; fixed lazily in _pop_min
            return None
        if len(self._counters) < self.capacity:
            self._insert(key, count, 0)
            return None
        evicted, floor = self._pop_min()
        self._insert(key, floor + count, floor)
        return evicted

    def top(self, n: int) -> list[tuple[K, int, int]]:
        """The ``n`` largest counters as (key, count, error), count descending."""
        if n <= 0:
            return []
        best = heapq.nlargest(n, self._counters.items(), key=lambda item: item[1].count)
        return [(key, c.count, c.error) for key, c in best]

    def items(self) -> list[tuple[K, int, int]]:
        """Every counter as (key, count, error), count descending."""
        return self.top(len(self._counters))

    def clear(self) -> None:
        self._counters.clear()
        self._heap.clear()
        self.total = 0

    def drain(self) -> list[tuple[K, int, int]]:
        """``items()``, then ``clear()``: what the recorder flushes once per interval."""
        entries = self.items()
        self.clear()
        return entries

    def __len__(self) -> int:
        return len(self._counters)

    def __contains__(self, key: object) -> bool:
        return key in self._counters

    def __repr__(self) -> str:
        return f"<SpaceSaving {len(self)}/{self.capacity} total={self.total}>"

    def _insert(self, key: K, count: int, error: int) -> None:
        self._counters[key] = _Counter(count, error)
        heapq.heappush(self._heap, (count, next(self._sequence), key))

    def _pop_min(self) -> tuple[K, int]:
        """Removes the key with the smallest current count; returns it and that count."""
        while True:
            pushed, _, key = self._heap[0]
            current = self._counters[key].count
            if current == pushed:
                heapq.heappop(self._heap)
                del self._counters[key]
                return key, current
            heapq.heapreplace(self._heap, (current, next(self._sequence), key))

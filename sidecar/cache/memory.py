"""The in-process tier: bounded in bytes, W-TinyLFU admission and eviction.

Plain LRU lets a burst of one-off answers flush out the answers everyone asks for. W-TinyLFU
(Einziger, Friedman, Manes, "TinyLFU: A Highly Efficient Cache Admission Policy", 2017; the policy
of Caffeine) keeps a small LRU *window* for newcomers and a segmented LRU *main* space (probation
and protected). An answer leaving the window enters the main space only if a frequency sketch says
it is asked for more often than the main space's next victim. Under a skewed (Zipf) workload this
keeps the frequent answers at the same memory, where LRU churns.

Sizes are bytes, so one large answer may need several victims: it is admitted only if it is more
frequent than each of them, otherwise it is the one dropped. The sketch (count-min, 4 rows, small
saturating counters) is halved every ``10 x capacity`` increments so that popularity ages.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .entry import Entry

Key = bytes  # a cache_key digest (32 bytes)
_WINDOW_SHARE = 0.01
_PROTECTED_SHARE = 0.8
_COUNTER_MAX = 15


class FrequencySketch:
    """Count-min sketch of recent popularity over 32-byte digests (4 hashes from the digest itself)."""

    def __init__(self, expected_entries: int) -> None:
        width = 64
        while width < 4 * max(expected_entries, 16):
            width *= 2
        self.mask = width - 1
        self.rows = [bytearray(width) for _ in range(4)]
        self.increments = 0
        self.reset_at = 10 * max(expected_entries, 16)

    def _slots(self, key: Key) -> list[int]:
        mask = self.mask
        return [int.from_bytes(key[i : i + 4], "little") & mask for i in (0, 4, 8, 12)]

    def increment(self, key: Key) -> None:
        for row, slot in zip(self.rows, self._slots(key), strict=True):
            if row[slot] < _COUNTER_MAX:
                row[slot] += 1
        self.increments += 1
        if self.increments >= self.reset_at:
            self._age()

    def estimate(self, key: Key) -> int:
        return min(row[slot] for row, slot in zip(self.rows, self._slots(key), strict=True))

    def _age(self) -> None:
        self.increments //= 2
        self.rows = [bytearray(c >> 1 for c in row) for row in self.rows]


@dataclass(slots=True)
class _Node:
    entry: Entry
    model: str


class MemoryTier:
    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.window_max = max(1, int(max_bytes * _WINDOW_SHARE))
        main = max_bytes - self.window_max
        self.protected_max = int(main * _PROTECTED_SHARE)
        self.sketch = FrequencySketch(max(1024, max_bytes // 4096))
        self.window: OrderedDict[Key, _Node] = OrderedDict()
        self.probation: OrderedDict[Key, _Node] = OrderedDict()
        self.protected: OrderedDict[Key, _Node] = OrderedDict()
        self.bytes = {"window": 0, "probation": 0, "protected": 0}
        self.evictions = 0
        self.rejections = 0

    def __repr__(self) -> str:
        return f"<MemoryTier {len(self)} entries, {self.used}/{self.max_bytes} bytes>"

    def __len__(self) -> int:
        return len(self.window) + len(self.probation) + len(self.protected)

    @property
    def used(self) -> int:
        return sum(self.bytes.values())

    # -- reads ---------------------------------------------------------------------------------------

    def get(self, key: Key, *, stale_for: float = 0.0) -> Entry | None:
        """The entry if fresh; with ``stale_for``, also one expired less than that many seconds ago (the
        caller tells the two apart by ``expires_at``)."""
        self.sketch.increment(key)
        for name, segment in (("protected", self.protected), ("probation", self.probation), ("window", self.window)):
            node = segment.get(key)
            if node is None:
                continue
            if node.entry.expires_at + stale_for <= self.clock():
                return None
            if name == "probation":
                self._promote(key, node)
            else:
                segment.move_to_end(key)
            return node.entry
        return None

    # -- writes --------------------------------------------------------------------------------------

    def put(self, key: Key, model: str, entry: Entry) -> bool:
        """Store ``entry``; False when it is larger than the whole tier or was not admitted."""
        if entry.size > self.max_bytes:
            return False
        self.remove(key)
        self.window[key] = _Node(entry, model)
        self.bytes["window"] += entry.size
        while self.bytes["window"] > self.window_max and self.window:
            candidate_key, candidate = self.window.popitem(last=False)
            self.bytes["window"] -= candidate.entry.size
            self._admit(candidate_key, candidate)
        return key in self.window or key in self.probation or key in self.protected

    def remove(self, key: Key) -> None:
        for name, segment in (("window", self.window), ("probation", self.probation), ("protected", self.protected)):
            node = segment.pop(key, None)
            if node is not None:
                self.bytes[name] -= node.entry.size
                return

    def flush(self, model: str | None = None) -> int:
        """Forget every entry (of one model); returns how many."""
        gone = 0
        for name, segment in (("window", self.window), ("probation", self.probation), ("protected", self.protected)):
            for key in [k for k, n in segment.items() if model is None or n.model == model]:
                node = segment.pop(key)
                self.bytes[name] -= node.entry.size
                gone += 1
        return gone

    def entries_by_model(self) -> dict[str, tuple[int, int]]:
        """model -> (entries, bytes), for metrics and /status."""
        out: dict[str, tuple[int, int]] = {}
        for segment in (self.window, self.probation, self.protected):
            for node in segment.values():
                n, b = out.get(node.model, (0, 0))
                out[node.model] = (n + 1, b + node.entry.size)
        return out

    # -- policy --------------------------------------------------------------------------------------

    def _main_bytes(self) -> int:
        return self.bytes["probation"] + self.bytes["protected"]

    def _admit(self, key: Key, node: _Node) -> bool:
        """Move a window evictee into probation if the main space has room or it out-ranks the victims."""
        main_max = self.max_bytes - self.window_max
        need = self._main_bytes() + node.entry.size - main_max
        if need > 0:
            frequency = self.sketch.estimate(key)
            victims: list[Key] = []
            freed = 0
            for victim_key, victim in self._victims():
                if freed >= need:
                    break
                if self._expired(victim) or self.sketch.estimate(victim_key) < frequency:
                    victims.append(victim_key)
                    freed += victim.entry.size
                else:
                    self.rejections += 1
                    return False  # a victim at least as popular stays; the newcomer goes
            if freed < need:
                self.rejections += 1
                return False
            for victim_key in victims:
                self.remove(victim_key)
                self.evictions += 1
        self.probation[key] = node
        self.bytes["probation"] += node.entry.size
        return True

    def _victims(self) -> Iterator[tuple[Key, _Node]]:
        """Eviction order: probation's least recent first, then protected's."""
        return itertools.chain(self.probation.items(), self.protected.items())

    def _promote(self, key: Key, node: _Node) -> None:
        del self.probation[key]
        self.bytes["probation"] -= node.entry.size
        self.protected[key] = node
        self.bytes["protected"] += node.entry.size
        while self.bytes["protected"] > self.protected_max and len(self.protected) > 1:
            demoted_key, demoted = self.protected.popitem(last=False)
            self.bytes["protected"] -= demoted.entry.size
            self.probation[demoted_key] = demoted
            self.bytes["probation"] += demoted.entry.size

    def _expired(self, node: _Node) -> bool:
        return node.entry.expires_at <= self.clock()

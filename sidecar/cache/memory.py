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
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from . import entry as entries
from .entry import Entry

Key = bytes  # a cache_key digest (32 bytes)
_WINDOW_SHARE = 0.01
_PROTECTED_SHARE = 0.8
_COUNTER_MAX = 15
_FOUR_WORDS = struct.Struct("<4I")
_HALVED = bytes(c >> 1 for c in range(256))  # the four row hashes: the digest's first 16 bytes


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

    def _slots(self, key: Key) -> tuple[int, ...]:
        mask = self.mask
        return tuple(word & mask for word in _FOUR_WORDS.unpack_from(key))

    def increment(self, key: Key) -> None:
        for row, slot in zip(self.rows, self._slots(key)):  # noqa: B905 - four rows, four slots
            if row[slot] < _COUNTER_MAX:
                row[slot] += 1
        self.increments += 1
        if self.increments >= self.reset_at:
            self._age()

    def estimate(self, key: Key) -> int:
        return min(row[slot] for row, slot in zip(self.rows, self._slots(key)))  # noqa: B905 - as above

    def _age(self) -> None:
        # In C (bytes.translate), not a Python loop over every counter: 4 rows of up to 256k counters would
        # stall the event loop for about 0.1 s every ``reset_at`` lookups.
        self.increments //= 2
        self.rows = [bytearray(row.translate(_HALVED)) for row in self.rows]


# A stored answer is one bytes object (the shared tier's byte form behind a small prefix), never a graph of
# objects: bytes are invisible to CPython's cyclic collector. Objects per answer would be walked by every
# full collection (with 500k answers a 0.3 s pause of the whole process: data path, probes and all) and,
# as each new answer survives into the oldest generation, they would also make full collections frequent.
# An Entry is built again on a read (a few us), except for the answers read most recently, whose Entry is
# kept (a small, bounded number of objects).
#   node: <f64 expires_at><u64 size><u16 len(model)><model, UTF-8><entry.encode(response, stored_at)>
_Node = bytes
_PREFIX = struct.Struct("<dQH")
_EXPIRES_AT = struct.Struct("<d")
_SIZE_AT = struct.Struct("<Q")
_THAWED_MAX = 128


def freeze(model: str, entry: Entry) -> _Node:
    name = model.encode()
    return b"".join([_PREFIX.pack(entry.expires_at, entry.size, len(name)), name,
                     entries.encode(entry.response, entry.stored_at)])


def thaw(node: _Node) -> Entry:
    expires_at, size, n = _PREFIX.unpack_from(node)
    response, stored_at = entries.decode(node[_PREFIX.size + n :])
    return Entry(response, stored_at, expires_at, size)


def _expires(node: _Node) -> float:
    value: float = _EXPIRES_AT.unpack_from(node)[0]
    return value


def node_size(node: _Node) -> int:
    value: int = _SIZE_AT.unpack_from(node, 8)[0]
    return value


def node_model(node: _Node) -> str:
    n = node[16] | node[17] << 8
    return node[_PREFIX.size : _PREFIX.size + n].decode()


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
        # Recently read answers as objects: key -> (the node it was built from, its Entry).
        self._thawed: dict[Key, tuple[_Node, Entry]] = {}
        # model -> [entries, bytes], kept as answers come and go: metrics scrapes never walk the tier.
        self._models: dict[str, list[int]] = {}

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
            if _expires(node) + stale_for <= self.clock():
                return None
            if name == "probation":
                self._promote(key, node)
            else:
                segment.move_to_end(key)
            thawed = self._thawed.get(key)
            if thawed is not None and thawed[0] is node:
                return thawed[1]
            try:
                entry = thaw(node)
            except ValueError:  # what put() wrote always reads back; should it not, it is a miss
                self.remove(key)
                return None
            if len(self._thawed) >= _THAWED_MAX:
                self._thawed.clear()
            self._thawed[key] = (node, entry)
            return entry
        return None

    # -- writes --------------------------------------------------------------------------------------

    def put(self, key: Key, model: str, entry: Entry) -> bool:
        """Store ``entry``; False when it is larger than the whole tier or was not admitted."""
        if entry.size > self.max_bytes:
            return False
        self.remove(key)
        node = freeze(model, entry)
        self.window[key] = node
        self.bytes["window"] += entry.size
        self._count(node, 1)
        while self.bytes["window"] > self.window_max and self.window:
            candidate_key, candidate = self.window.popitem(last=False)
            self.bytes["window"] -= node_size(candidate)
            if not self._admit(candidate_key, candidate):
                self._gone(candidate_key, candidate)
        return key in self.window or key in self.probation or key in self.protected

    def remove(self, key: Key) -> None:
        for name, segment in (("window", self.window), ("probation", self.probation), ("protected", self.protected)):
            node = segment.pop(key, None)
            if node is not None:
                self.bytes[name] -= node_size(node)
                self._gone(key, node)
                return

    def flush(self, model: str | None = None) -> int:
        """Forget every entry (of one model); returns how many."""
        if model is not None and model not in self._models:
            return 0
        self._thawed.clear()
        gone = 0
        for name, segment in (("window", self.window), ("probation", self.probation), ("protected", self.protected)):
            for key in [k for k, n in segment.items() if model is None or node_model(n) == model]:
                node = segment.pop(key)
                self.bytes[name] -= node_size(node)
                self._count(node, -1)
                gone += 1
        return gone

    def entries_by_model(self) -> dict[str, tuple[int, int]]:
        """model -> (entries, bytes), for metrics and /status."""
        return {model: (n, b) for model, (n, b) in self._models.items()}

    def accounted(self) -> dict[str, tuple[int, int]]:
        """``entries_by_model()`` counted afresh from the entries held (the tier keeps it incrementally; tests
        check that the two agree, and that their bytes add up to ``used``)."""
        out: dict[str, tuple[int, int]] = {}
        for segment in (self.window, self.probation, self.protected):
            for node in segment.values():
                n, b = out.get(node_model(node), (0, 0))
                out[node_model(node)] = (n + 1, b + node_size(node))
        return out

    def _count(self, node: _Node, sign: int) -> None:
        model = node_model(node)
        counts = self._models.get(model)
        if counts is None:
            counts = self._models[model] = [0, 0]
        counts[0] += sign
        counts[1] += sign * node_size(node)
        if counts[0] == 0:
            del self._models[model]

    def _gone(self, key: Key, node: _Node) -> None:
        """``node`` left the tier (removed, evicted or refused admission)."""
        self._thawed.pop(key, None)
        self._count(node, -1)

    # -- policy --------------------------------------------------------------------------------------

    def _main_bytes(self) -> int:
        return self.bytes["probation"] + self.bytes["protected"]

    def _admit(self, key: Key, node: _Node) -> bool:
        """Move a window evictee into probation if the main space has room or it out-ranks the victims."""
        main_max = self.max_bytes - self.window_max
        need = self._main_bytes() + node_size(node) - main_max
        if need > 0:
            frequency = self.sketch.estimate(key)
            victims: list[Key] = []
            freed = 0
            for victim_key, victim in self._victims():
                if freed >= need:
                    break
                if self._expired(victim) or self.sketch.estimate(victim_key) < frequency:
                    victims.append(victim_key)
                    freed += node_size(victim)
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
        self.bytes["probation"] += node_size(node)
        return True

    def _victims(self) -> Iterator[tuple[Key, _Node]]:
        """Eviction order: probation's least recent first, then protected's."""
        return itertools.chain(self.probation.items(), self.protected.items())

    def _promote(self, key: Key, node: _Node) -> None:
        del self.probation[key]
        size = node_size(node)
        self.bytes["probation"] -= size
        self.protected[key] = node
        self.bytes["protected"] += size
        while self.bytes["protected"] > self.protected_max and len(self.protected) > 1:
            demoted_key, demoted = self.protected.popitem(last=False)
            demoted_size = node_size(demoted)
            self.bytes["protected"] -= demoted_size
            self.probation[demoted_key] = demoted
            self.bytes["probation"] += demoted_size

    def _expired(self, node: _Node) -> bool:
        return _expires(node) <= self.clock()

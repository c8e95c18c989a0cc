"""Per-model, per-minute call counts: the forecast's memory.

Time is in whole minutes since the Unix epoch (UTC). A day of one model is a *day vector*: 1,440
unsigned 32-bit counts, big-endian, the layout both backends store (Redis ``BITFIELD u32`` strings,
SQLite blobs), so a day costs 5.6 KiB whatever its traffic and 14 days of 1,000 models stay under
80 MiB.

Zero or missing? A minute with no calls and a minute nobody recorded look alike in counts, and the
forecast must not learn "zero demand" from an outage. So the history also keeps *coverage*: one bit
per minute, set when some replica was recording then (it flushed during that minute, or counted a
call in it). :meth:`History.series` answers NaN for uncovered minutes, a number (possibly 0) for the
others.

Writes are buffered: :meth:`History.add` only adds to an in-memory :class:`Pending`; each
:meth:`History.flush` writes all of it in one step (one SQLite transaction, one Redis round trip), so
a replica's cost is one write per flush interval whatever its traffic.

Bounds: ``retention`` (``forecast.history``) in time, ``max_models`` in models (the least recently
seen are dropped first), and the pending buffer in entries (a store that stays down loses the oldest
minutes, counted in ``dropped``, instead of growing).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "DAY_MINUTES",
    "WORD",
    "Batch",
    "History",
    "HistoryLimits",
    "MinuteSeries",
    "Pending",
    "covered_by_day",
    "day_of",
    "decode_coverage",
    "decode_day",
]

DAY_MINUTES = 1440
WORD = 4  # bytes per minute in a day vector
DAY_BYTES = DAY_MINUTES * WORD
COVERAGE_BYTES = DAY_MINUTES // 8
COUNT_MAX = 2**32 - 1  # a minute's count saturates here (71 million calls a second)
# A pending buffer this many (model, minute) entries large drops its oldest minutes: a store that stays
# down must not grow the sidecar's memory without limit (two hours of 1,000 models is 120,000).
PENDING_MAX = 200_000
# Flushes further apart than this (a stalled or suspended process) do not claim the minutes between
# them as recorded: only the minutes of the two flushes themselves.
GAP_MINUTES = 2

Counts = npt.NDArray[np.float64]


def day_of(minute: int) -> int:
    return minute // DAY_MINUTES


def decode_day(raw: bytes | None) -> npt.NDArray[np.uint32]:
    """A stored day vector (shorter when its last minutes were never written; None: nothing) as counts."""
    out = np.zeros(DAY_MINUTES, dtype=np.uint32)
    if raw:
        data = np.frombuffer(bytes(raw[:DAY_BYTES]), dtype=">u4")
        out[: data.size] = data
    return out


def decode_coverage(raw: bytes | None) -> npt.NDArray[np.bool_]:
    """A stored coverage bitmap (bit i of the day, most significant bit first, as Redis SETBIT) as booleans."""
    out = np.zeros(DAY_MINUTES, dtype=np.bool_)
    if raw:
        bits = np.unpackbits(np.frombuffer(bytes(raw[:COVERAGE_BYTES]), dtype=np.uint8))
        out[: bits.size] = bits.astype(np.bool_)
    return out


def encode_day(counts: npt.NDArray[np.uint32]) -> bytes:
    return counts.astype(">u4").tobytes()


def encode_coverage(covered: npt.NDArray[np.bool_]) -> bytes:
    return np.packbits(covered.astype(np.uint8)).tobytes()


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    retention: float = 14 * 86400.0  # seconds of history kept
    max_models: int = 1000
    namespace: str = "warm-sidecar"  # Redis key prefix (several fleets can share one Redis)

    def __post_init__(self) -> None:
        if not self.retention > 0:
            raise ValueError(f"retention must be positive, got {self.retention}")
        if self.max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {self.max_models}")
        if not self.namespace or "{" in self.namespace or "}" in self.namespace:
            raise ValueError("namespace must be non-empty and without braces")

    @property
    def retention_minutes(self) -> int:
        return math.ceil(self.retention / 60)

    def first_kept_day(self, now_minute: int) -> int:
        """Days before this one hold only minutes older than the retention: they are deleted."""
        return day_of(now_minute - self.retention_minutes)


@dataclass(frozen=True)
class MinuteSeries:
    """Calls per minute of one model over ``[start, start + len(counts))``; NaN where nobody recorded."""

    start: int
    counts: Counts

    @property
    def end(self) -> int:
        return self.start + int(self.counts.size)

    def first_seen(self) -> int | None:
        """The first minute with a call, or None when the model had none in the series."""
        seen = np.flatnonzero(np.nan_to_num(self.counts) > 0)
        return None if seen.size == 0 else self.start + int(seen[0])

    def window(self, start: int, end: int) -> Counts:
        """Counts over ``[start, end)``, NaN outside the series."""
        out = np.full(max(0, end - start), np.nan)
        lo, hi = max(start, self.start), min(end, self.end)
        if lo < hi:
            out[lo - start : hi - start] = self.counts[lo - self.start : hi - self.start]
        return out


@dataclass
class Pending:
    """Counts and covered minutes added since the last flush; what one flush writes."""

    max_models: int = 1000
    max_entries: int = PENDING_MAX
    recording: bool = True  # a live replica: each flush claims the minutes since the last as recorded
    counts: dict[tuple[str, int], int] = field(default_factory=dict)
    replaced: dict[tuple[str, int], int] = field(default_factory=dict)  # minutes set outright (imports)
    covered: set[int] = field(default_factory=set)
    models: set[str] = field(default_factory=set)  # every model this replica has accepted (the cap's memory)
    dropped: int = 0  # calls not kept: a model over the cap, or the buffer full
    last_flush: int | None = None  # minute of the last flush

    def add(self, model: str, minute: int, count: int) -> None:
        if count <= 0 or not self._accept(model, count):
            return
        key = (model, minute)
        self.counts[key] = self.counts.get(key, 0) + count
        self.covered.add(minute)
        if len(self) > self.max_entries:
            self._drop_oldest()

    def replace(self, model: str, minute: int, count: int) -> None:
        if count < 0 or not self._accept(model, count):
            return
        key = (model, minute)
        self.counts.pop(key, None)
        self.replaced[key] = count
        self.covered.add(minute)
        if len(self) > self.max_entries:
            self._drop_oldest()

    def _accept(self, model: str, count: int) -> bool:
        if model not in self.models:
            if len(self.models) >= self.max_models:
                self.dropped += count
                return False
            self.models.add(model)
        return True

    def cover(self, minute: int) -> None:
        """Marks ``minute`` as recorded: its zeros are real zeros."""
        self.covered.add(minute)

    def flushing(self, now_minute: int) -> None:
        """Called at each flush: the minutes since the last flush were recorded, unless the gap is suspect."""
        if not self.recording:
            return
        last = self.last_flush
        start = last + 1 if last is not None and 0 <= now_minute - last <= GAP_MINUTES else now_minute
        self.covered.update(range(start, now_minute + 1))
        self.last_flush = now_minute

    def take(self) -> Batch:
        batch = Batch(self.counts, self.replaced, self.covered)
        self.counts, self.replaced, self.covered = {}, {}, set()
        return batch

    def put_back(self, batch: Batch) -> None:
        """A flush that surely wrote nothing returns its work, merged under what arrived meanwhile."""
        for key, count in batch.counts.items():
            if key not in self.replaced:
                self.counts[key] = self.counts.get(key, 0) + count
        for key, count in batch.replaced.items():
            if key not in self.replaced:
                self.replaced[key] = count + self.counts.pop(key, 0)
        self.covered.update(batch.covered)
        if len(self) > self.max_entries:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        keys = sorted([*self.counts, *self.replaced], key=lambda k: k[1])
        for key in keys[: len(self) - self.max_entries]:
            self.dropped += self.counts.pop(key, 0) + self.replaced.pop(key, 0)

    def __len__(self) -> int:
        return len(self.counts) + len(self.replaced)


class Buffered:
    """What both histories share: calls are counted into a bounded :class:`Pending` between flushes."""

    def __init__(self, limits: HistoryLimits, recording: bool) -> None:
        # recording=False for tools (import, export): their flushes claim no minute as recorded.
        self._pending = Pending(max_models=limits.max_models, recording=recording)
        self._failed = 0  # calls of flushes given up on (not put back for the next one)

    @property
    def dropped(self) -> int:
        return self._pending.dropped + self._failed

    def add(self, model: str, minute: int, count: int) -> None:
        self._pending.add(model, minute, count)

    def replace(self, model: str, minute: int, count: int) -> None:
        self._pending.replace(model, minute, count)

    def cover(self, minute: int) -> None:
        self._pending.cover(minute)


@dataclass(frozen=True)
class Batch:
    """What one flush writes: counts to add, counts to set (imports), minutes recorded."""

    counts: dict[tuple[str, int], int]
    replaced: dict[tuple[str, int], int]
    covered: set[int]

    def __bool__(self) -> bool:
        return bool(self.counts or self.replaced or self.covered)

    def calls(self) -> int:
        return sum(self.counts.values()) + sum(self.replaced.values())

    def last_seen(self) -> dict[str, int]:
        seen: dict[str, int] = {}
        for model, minute in [*self.counts, *self.replaced]:
            seen[model] = max(minute, seen.get(model, minute))
        return seen


def group_by_day(counts: dict[tuple[str, int], int]) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """(model, day) -> [(minute of the day, count)], the unit both backends write."""
    days: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for (model, minute), count in counts.items():
        days.setdefault((model, day_of(minute)), []).append((minute % DAY_MINUTES, min(count, COUNT_MAX)))
    return days


def covered_by_day(covered: Iterable[int]) -> dict[int, list[int]]:
    """day -> [minutes of the day], sorted."""
    days: dict[int, list[int]] = {}
    for minute in sorted(covered):
        days.setdefault(day_of(minute), []).append(minute % DAY_MINUTES)
    return days


def assemble(start: int, end: int, days: dict[int, npt.NDArray[np.uint32]],
             coverage: dict[int, npt.NDArray[np.bool_]]) -> MinuteSeries:
    """A series over ``[start, end)`` from day vectors and coverage bitmaps (absent days: uncovered)."""
    counts = np.full(max(0, end - start), np.nan)
    if end > start:
        for day in range(day_of(start), day_of(end - 1) + 1):
            covered = coverage.get(day)
            if covered is None:
                continue
            lo, hi = max(start, day * DAY_MINUTES), min(end, (day + 1) * DAY_MINUTES)
            values = days.get(day, np.zeros(DAY_MINUTES, dtype=np.uint32)).astype(np.float64)
            values[~covered] = np.nan
            counts[lo - start : hi - start] = values[lo - day * DAY_MINUTES : hi - day * DAY_MINUTES]
    return MinuteSeries(start, counts)


class History(Protocol):
    kind: str  # "sqlite" | "redis"
    limits: HistoryLimits

    @property
    def dropped(self) -> int:
        """Calls counted but never stored (store down, a model over the cap, the buffer full)."""
        ...

    def add(self, model: str, minute: int, count: int) -> None:
        """Buffers ``count`` calls of ``model`` in ``minute``; never blocks, never raises."""
        ...

    def replace(self, model: str, minute: int, count: int) -> None:
        """Buffers setting a minute's count outright (imports: importing a file twice changes nothing)."""
        ...

    def cover(self, minute: int) -> None:
        """Marks a minute as recorded although no call arrived (imports; tests)."""
        ...

    async def flush(self) -> None:
        """Writes everything buffered in one step; drops it (counted) if the store is unavailable."""
        ...

    async def series(self, model: str, start: int, end: int) -> MinuteSeries:
        """Calls per minute over ``[start, end)``: NaN where nobody recorded; all NaN if unavailable."""
        ...

    async def run(self, interval: float, sleep: Callable[[float], Awaitable[None]] = ...) -> None:
        """Flushes every ``interval`` seconds until cancelled (the sidecar runs this as a task)."""
        ...

    async def models(self) -> list[str]:
        """Models in the history, most recently seen first (at most ``max_models``)."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> str:
        """For logs and status; never includes a password."""
        ...

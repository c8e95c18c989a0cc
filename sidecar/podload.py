"""Calls in flight per model, pod-wide: one row of counters per data-plane worker in a shared file.

With several workers the batcher's rule "a call goes alone while the model has capacity, calls gather
while it is busy" must hold for the pod, not for each worker: a model allowing one call at a time is
busy when another worker has one in flight. Each worker writes only its own row: per model, its calls
in flight and when its oldest waiting call arrived. Taking a free place (``claim``) is atomic across the
workers (a byte-range lock on the model's counter, held for a few microseconds) and first come, first
served: a worker whose oldest waiting call is younger than another worker's leaves the place to it, so
the workers' batches alternate and each carries what gathered while the others' ran, as one worker's
batches would. A model's counter is chosen by a hash of its name; two models sharing one look busier
than they are (they gather sooner), never idler.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import time
import zlib
from collections.abc import Iterator

SLOTS = 1024
_FIELDS = 2  # per worker and model: calls in flight; the oldest waiting call's arrival (microseconds, 0: none)
_INT = 8


class PodLoad:
    def __init__(self, path: str, workers: int, index: int) -> None:
        self.workers = workers
        self.index = index
        size = workers * SLOTS * _FIELDS * _INT
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)
        self._counts = memoryview(self._map).cast("q")
        self._slots: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<PodLoad worker {self.index} of {self.workers}>"

    def slot(self, model: str) -> int:
        slot = self._slots.get(model)
        if slot is None:
            slot = self._slots[model] = zlib.crc32(model.encode()) % SLOTS
        return slot

    def _at(self, worker: int, slot: int) -> int:
        return (worker * SLOTS + slot) * _FIELDS

    def set(self, model: str, in_flight: int) -> None:
        """This worker's calls in flight for ``model`` now."""
        self._counts[self._at(self.index, self.slot(model))] = in_flight

    def waiting(self, model: str, since: float | None) -> None:
        """When this worker's oldest call waiting for ``model`` arrived (``time.monotonic()``), None: none."""
        self._counts[self._at(self.index, self.slot(model)) + 1] = 0 if since is None else max(1, int(since * 1e6))

    def others(self, model: str) -> int:
        """Calls in flight for ``model`` in the other workers."""
        slot = self.slot(model)
        counts = self._counts
        return sum(counts[self._at(w, slot)] for w in range(self.workers) if w != self.index)

    def claim(self, model: str, in_flight: int, limit: int) -> bool:
        """Take one of ``model``'s ``limit`` places if one is free pod-wide and no other worker's call has
        waited longer for it; on success this worker's count is ``in_flight + 1``."""
        slot = self.slot(model)
        counts = self._counts
        with self._locked(slot):
            total = sum(counts[self._at(w, slot)] for w in range(self.workers))
            if total >= limit:
                return False
            mine = counts[self._at(self.index, slot) + 1] or int(time.monotonic() * 1e6)
            older = sum(1 for w in range(self.workers)
                        if w != self.index and 0 < counts[self._at(w, slot) + 1] < mine)
            if older >= limit - total:
                return False
            counts[self._at(self.index, slot)] = in_flight + 1
            return True

    @contextlib.contextmanager
    def _locked(self, slot: int) -> Iterator[None]:
        # A record lock on the slot's byte: released by the kernel should its holder die.
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, slot)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, slot)

    def clear(self, index: int) -> None:
        """Zero a worker's row (it died: its calls are no longer in flight or waiting)."""
        start = self._at(index, 0)
        for i in range(start, start + SLOTS * _FIELDS):
            self._counts[i] = 0

    def close(self) -> None:
        self._counts.release()
        self._map.close()
        os.close(self._fd)

"""Calls in flight per model, pod-wide: one row of counters per data-plane worker in a shared file.

With several workers the batcher's rule "a call goes alone while the model has capacity, calls gather
while it is busy" must hold for the pod, not for each worker: a model allowing 2 calls at a time is busy
when two workers each have one in flight. Each worker writes only its own row (no lock: one writer per
counter) and reads the others' when it decides. A model's counter is chosen by a hash of its name; two
models sharing a counter look busier than they are (they gather sooner), never idler.
"""

from __future__ import annotations

import mmap
import os
import zlib

SLOTS = 1024
_INT = 4


class PodLoad:
    def __init__(self, path: str, workers: int, index: int) -> None:
        self.workers = workers
        self.index = index
        size = workers * SLOTS * _INT
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._counts = memoryview(self._map).cast("i")
        self._own = index * SLOTS
        self._slots: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<PodLoad worker {self.index} of {self.workers}>"

    def slot(self, model: str) -> int:
        slot = self._slots.get(model)
        if slot is None:
            slot = self._slots[model] = zlib.crc32(model.encode()) % SLOTS
        return slot

    def set(self, model: str, in_flight: int) -> None:
        """This worker's calls in flight for ``model`` now."""
        self._counts[self._own + self.slot(model)] = in_flight

    def others(self, model: str) -> int:
        """Calls in flight for ``model`` in the other workers."""
        slot = self.slot(model)
        counts = self._counts
        return sum(counts[w * SLOTS + slot] for w in range(self.workers) if w != self.index)

    def clear(self, index: int) -> None:
        """Zero a worker's row (it died: its calls are no longer in flight)."""
        for i in range(index * SLOTS, (index + 1) * SLOTS):
            self._counts[i] = 0

    def close(self) -> None:
        self._counts.release()
        self._map.close()

"""The pod's one in-process tier when data-plane workers share it: answers in a memory-mapped LMDB file.

With several worker processes, an answer one worker stored must be a hit in every other, and the memory
held for answers must be ``cache.max_bytes`` once, not once per worker (nginx keeps its proxy_cache keys
in one shared-memory zone for the same reason). LMDB is a B-tree in one memory-mapped file: every process
reads it without copies or locks (MVCC), writers take turns under its own robust lock. A read costs about
2 us, a write about 6 us; a hit never waits on another worker.

The byte form of an answer is the in-process tier's (``memory.freeze``) behind an 8-byte sequence number.
Eviction is by age of last use: hits are noted locally and moved to the young end of the order once a
second (one write for all of them), so a hit never writes. A newcomer that would evict an answer the
worker's frequency sketch counts as more popular is refused (TinyLFU admission; each worker sees a fair
share of the pod's calls, so its sketch ranks the pod's answers).

Tables: ``a`` key -> <u64 seq><node>; ``o`` <u64 seq, big-endian> -> key (eviction order);
``x`` model NUL key (a model's keys, for flushes); ``s`` the pod-wide counts (bytes, entries, evictions,
per model).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from typing import Any

import lmdb

from .entry import Entry
from .memory import FrequencySketch, Key, freeze, node_model, node_size, thaw

_U64 = struct.Struct("<Q")
_SEQ = struct.Struct(">Q")  # big-endian: LMDB orders keys bytewise, so the oldest comes first
_EXPIRES = struct.Struct("<d")
_NODE_AT = 8
_THAWED_MAX = 128
_TOUCHED_MAX = 8192
_VICTIMS_MAX = 64  # answers looked at to make room for one
_KEY_MAX = 400  # LMDB keys are at most 511 bytes: a longer cache key is stored by its digest
_USED, _COUNT, _EVICTED, _NEXT = b"used", b"count", b"evicted", b"next"
TOUCH_EVERY = 1.0


def map_size(max_bytes: int) -> int:
    """The file's address space: twice the budget (B-tree pages, pages freed while a reader holds them)."""
    return 2 * max_bytes + 64 * 1024 * 1024


def room_needed(max_bytes: int) -> int:
    """What the file may really take (it is sparse): the budget, B-tree pages and pages freed under readers."""
    return max_bytes * 5 // 4 + 16 * 1024 * 1024


_PREFIX = "warm-sidecar-cache-"


def make_dir(max_bytes: int) -> str:
    """A fresh directory for the pod's tier: in /dev/shm when it has room (memory, never written back to a
    disk), else in the temporary directory. The control process makes it and removes it at exit; what a
    killed one left behind is removed here first (a pod's emptyDir outlives a restarted container)."""
    for base in ("/dev/shm", tempfile.gettempdir()):
        remove_stale(base)
    for base in ("/dev/shm", tempfile.gettempdir()):
        try:
            st = os.statvfs(base)
        except OSError:
            continue
        if st.f_bavail * st.f_frsize >= room_needed(max_bytes) and os.access(base, os.W_OK):
            return tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base)
    return tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")


def remove_stale(base: str) -> None:
    """Remove the tiers of control processes that are gone: their pid runs nothing, or is this process's own
    (a container restarted in a fresh pid namespace gets the same pid)."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        pid = name[len(_PREFIX):].partition("-")[0]
        if not name.startswith(_PREFIX) or not pid.isdigit():
            continue
        if int(pid) == os.getpid() or not _running(int(pid)):
            remove_dir(os.path.join(base, name))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class PodTier:
    """The :class:`~sidecar.cache.memory.MemoryTier` interface over a file every worker of the pod maps."""

    def __init__(self, path: str, max_bytes: int, readers: int = 126, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.clock = clock
        # No writemap: a full tmpfs then fails a write (a refused answer), where a mapped write would SIGBUS.
        self.env = lmdb.open(path, map_size=map_size(max_bytes), max_dbs=4, max_readers=max(126, readers),
                             sync=False, metasync=False, readahead=False, lock=True)
        self.answers = self.env.open_db(b"a")
        self.order = self.env.open_db(b"o")
        self.index = self.env.open_db(b"x")
        self.stats = self.env.open_db(b"s")
        self.env.reader_check()  # reader slots of a worker that was killed: their pages may be reused
        self.sketch = FrequencySketch(max(1024, max_bytes // 4096))
        self.rejections = 0
        self.failures = 0  # writes LMDB refused (map full): answers not stored
        self._thawed: dict[bytes, tuple[bytes, Entry]] = {}
        self._touched: set[bytes] = set()

    def __repr__(self) -> str:
        return f"<PodTier {self.path} {len(self)} entries, {self.used}/{self.max_bytes} bytes>"

    def __len__(self) -> int:
        return self._stat(_COUNT)

    @property
    def used(self) -> int:
        return self._stat(_USED)

    @property
    def evictions(self) -> int:
        return self._stat(_EVICTED)

    def _stat(self, name: bytes) -> int:
        with self.env.begin(db=self.stats) as txn:
            raw = txn.get(name)
        return _U64.unpack(raw)[0] if raw else 0

    # -- reads ---------------------------------------------------------------------------------------

    def get(self, key: Key, *, stale_for: float = 0.0) -> Entry | None:
        self.sketch.increment(key)
        k = _stored_key(key)
        with self.env.begin(db=self.answers, buffers=True) as txn:
            value = txn.get(k)
            if value is None:
                return None
            if _EXPIRES.unpack_from(value, _NODE_AT)[0] + stale_for <= self.clock():
                return None
            seq = bytes(value[:_NODE_AT])
            thawed = self._thawed.get(k)
            if thawed is not None and thawed[0] == seq:
                entry = thawed[1]
            else:
                try:
                    entry = thaw(bytes(value[_NODE_AT:]))
                except ValueError:
                    return None
                if len(self._thawed) >= _THAWED_MAX:
                    self._thawed.clear()
                self._thawed[k] = (seq, entry)
        if len(self._touched) < _TOUCHED_MAX:
            self._touched.add(k)
        return entry

    # -- writes --------------------------------------------------------------------------------------

    def put(self, key: Key, model: str, entry: Entry) -> bool:
        """Store ``entry``; False when it is larger than the tier, was not admitted, or LMDB refused it."""
        if entry.size > self.max_bytes:
            return False
        k = _stored_key(key)
        node = freeze(model, entry)
        try:
            with self.env.begin(write=True) as txn:
                self._remove(txn, k)
                need = _get(txn, self.stats, _USED) + entry.size - self.max_bytes
                if need > 0 and not self._make_room(txn, key, need):
                    self.rejections += 1
                    return False
                seq = _get(txn, self.stats, _NEXT) + 1
                _set(txn, self.stats, _NEXT, seq)
                txn.put(k, _U64.pack(seq) + node, db=self.answers)
                txn.put(_SEQ.pack(seq), k, db=self.order)
                txn.put(model.encode() + b"\0" + k, b"", db=self.index)
                self._count(txn, model, 1, entry.size)
        except lmdb.Error:
            self.failures += 1
            return False
        return True

    def remove(self, key: Key) -> None:
        try:
            with self.env.begin(write=True) as txn:
                self._remove(txn, _stored_key(key))
        except lmdb.Error:
            self.failures += 1

    def flush(self, model: str | None = None) -> int:
        """Forget every answer (of one model) for the whole pod; returns how many. A flush LMDB cannot do
        (its map full) forgets nothing: the answers are already unreachable (their keys' generation moved)
        and age out."""
        self._thawed.clear()
        try:
            return self._flush(model)
        except lmdb.Error:
            self.failures += 1
            return 0

    def _flush(self, model: str | None) -> int:
        with self.env.begin(write=True) as txn:
            if model is None:
                gone = _get(txn, self.stats, _COUNT)
                evicted = _get(txn, self.stats, _EVICTED)
                for db in (self.answers, self.order, self.index, self.stats):
                    txn.drop(db, delete=False)
                _set(txn, self.stats, _NEXT, 1)
                _set(txn, self.stats, _EVICTED, evicted)
                return gone
            prefix = model.encode() + b"\0"
            keys = []
            cursor = txn.cursor(db=self.index)
            if cursor.set_range(prefix):
                for index_key in cursor.iternext(values=False):
                    if not index_key.startswith(prefix):
                        break
                    keys.append(index_key[len(prefix):])
            for k in keys:
                self._remove(txn, k)
            return len(keys)

    def entries_by_model(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        with self.env.begin(db=self.stats) as txn:
            cursor = txn.cursor()
            if cursor.set_range(b"m:"):
                for name, raw in cursor:
                    if not name.startswith(b"m:"):
                        break
                    n, b = struct.unpack("<QQ", raw)
                    if n:
                        out[name[2:].decode()] = (n, b)
        return out

    def accounted(self) -> dict[str, tuple[int, int]]:
        """``entries_by_model()`` counted afresh from the answers held (tests check that the two agree)."""
        out: dict[str, tuple[int, int]] = {}
        with self.env.begin(db=self.answers) as txn:
            for _, value in txn.cursor():
                node = value[_NODE_AT:]
                n, b = out.get(node_model(node), (0, 0))
                out[node_model(node)] = (n + 1, b + node_size(node))
        return out

    # -- recency -------------------------------------------------------------------------------------

    def touch(self) -> int:
        """Move the answers hit since the last call to the young end of the eviction order (one write)."""
        touched, self._touched = self._touched, set()
        if not touched:
            return 0
        try:
            return self._touch(touched)
        except lmdb.Error:
            self.failures += 1
            return 0

    def _touch(self, touched: set[bytes]) -> int:
        moved = 0
        with self.env.begin(write=True) as txn:
            seq = _get(txn, self.stats, _NEXT)
            for k in touched:
                value = txn.get(k, db=self.answers)
                if value is None:
                    continue
                seq += 1
                txn.delete(value[:_NODE_AT][::-1], db=self.order)  # little-endian seq, read big-endian
                txn.put(_SEQ.pack(seq), k, db=self.order)
                txn.put(k, _U64.pack(seq) + value[_NODE_AT:], db=self.answers)
                moved += 1
            _set(txn, self.stats, _NEXT, seq)
        return moved

    async def run(self) -> None:
        """Background task: note hits in the eviction order once a second."""
        while True:
            await asyncio.sleep(TOUCH_EVERY)
            self.touch()

    def close(self) -> None:
        self.env.close()

    # -- within one write transaction ------------------------------------------------------------------

    def _remove(self, txn: Any, k: bytes) -> int:
        value = txn.pop(k, db=self.answers)
        if value is None:
            return 0
        node = value[_NODE_AT:]
        model, size = node_model(node), node_size(node)
        txn.delete(value[:_NODE_AT][::-1], db=self.order)
        txn.delete(model.encode() + b"\0" + k, db=self.index)
        self._count(txn, model, -1, -size)
        self._thawed.pop(k, None)
        return size

    def _make_room(self, txn: Any, key: Key, need: int) -> bool:
        """Evict the least recently used answers until ``need`` bytes are free, unless one of them is more
        popular than the newcomer (then nothing is evicted)."""
        frequency = self.sketch.estimate(key)
        now = self.clock()
        victims: list[bytes] = []
        freed = 0
        for _, victim in txn.cursor(db=self.order):
            if freed >= need or len(victims) >= _VICTIMS_MAX:
                break
            value = txn.get(victim, db=self.answers)
            if value is None:
                continue
            node = value[_NODE_AT:]
            if _EXPIRES.unpack_from(node)[0] > now and self.sketch.estimate(victim) > frequency:
                return False
            victims.append(victim)
            freed += node_size(node)
        if freed < need:
            return False
        for victim in victims:
            self._remove(txn, victim)
        _set(txn, self.stats, _EVICTED, _get(txn, self.stats, _EVICTED) + len(victims))
        return True

    def _count(self, txn: Any, model: str, entries: int, size: int) -> None:
        _set(txn, self.stats, _USED, max(0, _get(txn, self.stats, _USED) + size))
        _set(txn, self.stats, _COUNT, max(0, _get(txn, self.stats, _COUNT) + entries))
        name = b"m:" + model.encode()
        raw = txn.get(name, db=self.stats)
        n, b = struct.unpack("<QQ", raw) if raw else (0, 0)
        n, b = max(0, n + entries), max(0, b + size)
        if n:
            txn.put(name, struct.pack("<QQ", n, b), db=self.stats)
        else:
            txn.delete(name, db=self.stats)


def _stored_key(key: Key) -> bytes:
    return key if len(key) <= _KEY_MAX else hashlib.blake2b(key, digest_size=32).digest() + b"#"


def _get(txn: Any, db: Any, name: bytes) -> int:
    raw = txn.get(name, db=db)
    return _U64.unpack(raw)[0] if raw else 0


def _set(txn: Any, db: Any, name: bytes, value: int) -> None:
    txn.put(name, _U64.pack(value), db=db)

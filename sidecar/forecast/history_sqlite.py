"""The history in one SQLite file: one pod's counts, surviving restarts of the sidecar.

Tables: ``days`` (model, day) -> day vector (1,440 big-endian u32, see history.py), ``coverage`` day ->
bitmap, ``models`` model -> last minute seen. One connection, owned by one worker thread (the event
loop never waits on SQLite); each flush is one ``BEGIN IMMEDIATE`` transaction that reads, adds to and
writes back the day vectors it touches, so several processes may share the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from ..sqlite_thread import SQLiteThread, transaction
from .history import (
    COUNT_MAX,
    Batch,
    Buffered,
    HistoryLimits,
    MinuteSeries,
    assemble,
    covered_by_day,
    day_of,
    decode_coverage,
    decode_day,
    encode_coverage,
    encode_day,
    group_by_day,
)

__all__ = ["SQLiteHistory"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS days (model TEXT NOT NULL, day INTEGER NOT NULL, counts BLOB NOT NULL,
                                 PRIMARY KEY (model, day)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS days_by_day ON days (day);
CREATE TABLE IF NOT EXISTS coverage (day INTEGER PRIMARY KEY, bits BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS models (model TEXT PRIMARY KEY, last_minute INTEGER NOT NULL) WITHOUT ROWID;
"""


class SQLiteHistory(Buffered):
    kind = "sqlite"

    def __init__(self, path: str | Path, limits: HistoryLimits, *, clock: Clock = time.time,
                 recording: bool = True) -> None:
        self.path = Path(path)
        self.limits = limits
        self._clock = clock
        super().__init__(limits, recording)
        try:
            self._sqlite = SQLiteThread(f"forecast history {self.path}", self._connect, "forecast-history")
        except (OSError, sqlite3.Error) as error:
            raise ConfigError(f"forecast history: cannot open SQLite file {self.path}: {error}") from error

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def __repr__(self) -> str:
        return f"<SQLiteHistory {self.path} pending={len(self._pending)} dropped={self.dropped}>"

    # -- the interface (add, replace, cover: Buffered)

    async def flush(self) -> None:
        now_minute = int(self._clock() // 60)
        self._pending.flushing(now_minute)
        batch = self._pending.take()
        if not batch:
            return
        if await self._sqlite.run("flush", lambda db: self._write(db, batch, now_minute)) is None:
            # The transaction rolled back: nothing was written, so the next flush may try again.
            self._pending.put_back(batch)

    async def series(self, model: str, start: int, end: int) -> MinuteSeries:
        found = await self._sqlite.run("series", lambda db: self._read(db, model, start, end))
        if found is None:
            return MinuteSeries(start, np.full(max(0, end - start), np.nan))
        days, coverage = found
        return assemble(start, end, days, coverage)

    async def models(self) -> list[str]:
        rows = await self._sqlite.run("models", lambda db: db.execute(
            "SELECT model FROM models ORDER BY last_minute DESC, model LIMIT ?", (self.limits.max_models,)
        ).fetchall())
        return [model for (model,) in rows or []]

    async def run(self, interval: float, sleep: Sleep = asyncio.sleep) -> None:
        """Flushes every ``interval`` seconds until cancelled."""
        while True:
            await self.flush()
            await sleep(interval)

    async def close(self) -> None:
        if self._sqlite.closed:
            return
        with contextlib.suppress(Exception):
            await self.flush()
        await self._sqlite.close()

    # -- on the worker thread

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # Losing the last flush to a power cut costs one second of counts; an fsync per second does not pay.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _write(self, db: sqlite3.Connection, batch: Batch, now_minute: int) -> bool:
        first_day = self.limits.first_kept_day(now_minute)
        added, replaced = group_by_day(batch.counts), group_by_day(batch.replaced)
        with transaction(db, "BEGIN IMMEDIATE"):  # the read-add-write of each day vector is atomic
            for model, day in {*added, *replaced}:
                if day < first_day:
                    continue
                row = db.execute("SELECT counts FROM days WHERE model = ? AND day = ?", (model, day)).fetchone()
                vector = decode_day(row[0] if row else None).astype(np.uint64)
                for minute, count in replaced.get((model, day), ()):
                    vector[minute] = count
                for minute, count in added.get((model, day), ()):
                    vector[minute] += count
                saturated = np.minimum(vector, COUNT_MAX).astype(np.uint32)
                db.execute("INSERT OR REPLACE INTO days (model, day, counts) VALUES (?, ?, ?)",
                           (model, day, encode_day(saturated)))
            db.executemany(
                "INSERT INTO models (model, last_minute) VALUES (?, ?) ON CONFLICT (model) DO UPDATE SET "
                "last_minute = max(last_minute, excluded.last_minute)", list(batch.last_seen().items()))
            for day, minutes in covered_by_day(batch.covered).items():
                if day < first_day:
                    continue
                row = db.execute("SELECT bits FROM coverage WHERE day = ?", (day,)).fetchone()
                bits = decode_coverage(row[0] if row else None)
                bits[minutes] = True
                db.execute("INSERT OR REPLACE INTO coverage (day, bits) VALUES (?, ?)", (day, encode_coverage(bits)))
            self._prune(db, first_day, now_minute)
        return True

    def _prune(self, db: sqlite3.Connection, first_day: int, now_minute: int) -> None:
        db.execute("DELETE FROM days WHERE day < ?", (first_day,))
        db.execute("DELETE FROM coverage WHERE day < ?", (first_day,))
        db.execute("DELETE FROM models WHERE last_minute < ?", (now_minute - self.limits.retention_minutes,))
        (count,) = db.execute("SELECT count(*) FROM models").fetchone()
        extra = count - self.limits.max_models
        if extra > 0:
            gone = db.execute("SELECT model FROM models ORDER BY last_minute, model LIMIT ?", (extra,)).fetchall()
            db.executemany("DELETE FROM models WHERE model = ?", gone)
            db.executemany("DELETE FROM days WHERE model = ?", gone)

    def _read(self, db: sqlite3.Connection, model: str, start: int, end: int
              ) -> tuple[dict[int, npt.NDArray[np.uint32]], dict[int, npt.NDArray[np.bool_]]]:
        if end <= start:
            return {}, {}
        lo, hi = day_of(start), day_of(end - 1)
        with transaction(db):  # one snapshot: counts and coverage agree
            days = {day: decode_day(raw) for day, raw in db.execute(
                "SELECT day, counts FROM days WHERE model = ? AND day BETWEEN ? AND ?", (model, lo, hi))}
            coverage = {day: decode_coverage(raw) for day, raw in db.execute(
                "SELECT day, bits FROM coverage WHERE day BETWEEN ? AND ?", (lo, hi))}
        return days, coverage

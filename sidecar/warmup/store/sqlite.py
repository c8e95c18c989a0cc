"""The traffic memory in an embedded SQLite file: one replica's memory, surviving its restarts."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ...errors import ConfigError
from ...sqlite_thread import SQLiteThread, error_text, transaction
from .base import (
    RESCALE_AFTER,
    Clock,
    Sample,
    StoredRequest,
    StoreLimits,
    _decay,
    _pow2,
    _storable,
)

log = logging.getLogger("sidecar.warmup.store")

# -- SQLite -----------------------------------------------------------------------------------------

_WAL_LIMIT = 4 * 1024 * 1024  # bytes of write-ahead log kept after a checkpoint
_PAYLOAD_CHUNK = 2 * 1024 * 1024  # bytes of payloads written per transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    model TEXT NOT NULL,
    key TEXT NOT NULL,
    score REAL NOT NULL,
    shape TEXT NOT NULL,
    batch INTEGER NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (model, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_score ON entries (model, score);
-- Payloads live apart from counts so bumping a count never rewrites a large blob.
CREATE TABLE IF NOT EXISTS payloads (
    model TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (model, key)
);
CREATE TABLE IF NOT EXISTS shapes (
    model TEXT NOT NULL,
    shape TEXT NOT NULL,
    batch INTEGER NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (model, shape, batch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS models (model TEXT PRIMARY KEY, score REAL NOT NULL) WITHOUT ROWID;
"""

_UPSERT_ENTRY = """
INSERT INTO entries (model, key, score, shape, batch, last_seen) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (model, key) DO UPDATE SET
    score = score + excluded.score, shape = excluded.shape, batch = excluded.batch,
    last_seen = max(last_seen, excluded.last_seen)
"""
# A key names one request identity, so a payload already stored for it is the same bytes.
_INSERT_PAYLOAD = "INSERT INTO payloads (model, key, size, data) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
_UPSERT_SHAPE = """
INSERT INTO shapes (model, shape, batch, score) VALUES (?, ?, ?, ?)
ON CONFLICT (model, shape, batch) DO UPDATE SET score = score + excluded.score
"""
_UPSERT_MODEL = """
INSERT INTO models (model, score) VALUES (?, ?) ON CONFLICT (model) DO UPDATE SET score = score + excluded.score
"""
_DELETE_EXPIRED_PAYLOADS = """
DELETE FROM payloads WHERE NOT EXISTS (
    SELECT 1 FROM entries e WHERE e.model = payloads.model AND e.key = payloads.key AND e.last_seen >= ?)
"""
_SELECT_TOP = """
SELECT e.key, e.score, e.shape, e.batch, p.data FROM entries e
JOIN payloads p ON p.model = e.model AND p.key = e.key
WHERE e.model = ? AND e.last_seen >= ? ORDER BY e.score DESC LIMIT ?
"""


def _chunks(rows: list[tuple[str, str, int, bytes]], max_bytes: int) -> Iterator[list[tuple[str, str, int, bytes]]]:
    chunk: list[tuple[str, str, int, bytes]] = []
    size = 0
    for row in rows:
        if chunk and size + row[2] > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += row[2]
    if chunk:
        yield chunk


class SQLiteStore:
    """Traffic memory in one SQLite file (WAL mode), several processes may share it.

    One connection, created and used by one worker thread: the event loop never blocks on SQLite.
    Each call is one transaction, so a cancelled caller leaves either all of its work or none.
    """

    kind = "sqlite"

    def __init__(self, path: str | Path, limits: StoreLimits, *, clock: Clock = time.time) -> None:
        self.path = Path(path)
        self.limits = limits
        self.dropped = 0
        self._clock = clock
        try:
            self._sqlite = SQLiteThread(f"traffic store {self.path}", self._open, "traffic-store")
        except (OSError, sqlite3.Error) as error:
            raise ConfigError(f"traffic store: cannot open SQLite file {self.path}: {error}") from error

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path} dropped={self.dropped}{' closed' if self._sqlite.closed else ''}>"

    # -- the interface

    async def add(self, samples: Sequence[Sample]) -> None:
        batch = [s for s in samples if s.count > 0]
        if not batch:
            return
        now = self._clock()
        if self._sqlite.closed or await self._sqlite.run("add", lambda db: self._add(db, batch, now)) is None:
            self.dropped += len(batch)

    async def top(self, model: str, n: int) -> list[StoredRequest]:
        if n <= 0:
            return []
        now = self._clock()
        return await self._sqlite.run("top", lambda db: self._top(db, model, n, now)) or []

    async def shapes(self, model: str) -> list[tuple[str, int, float]]:
        now = self._clock()
        return await self._sqlite.run("shapes", lambda db: self._shapes(db, model, now)) or []

    async def models(self) -> list[tuple[str, float]]:
        now = self._clock()
        return await self._sqlite.run("models", lambda db: self._models(db, now)) or []

    async def close(self) -> None:
        await self._sqlite.close()

    # -- on the worker thread

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.OperationalError:
            raise  # cannot open or lock: a configuration or permission problem, not corruption
        except sqlite3.DatabaseError as error:
            # Not a database (or corrupt): the memory is a cache, so start afresh and keep the old file.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("traffic store %s unreadable (%s); moved aside to %s", self.path, error_text(error), aside)
            self.path.replace(aside)
            for suffix in ("-wal", "-shm"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        try:
            # The byte budget holds on disk too: freed pages go back to the file system (incremental
            # vacuum; an older file without it is vacuumed once), and the write-ahead log is truncated to
            # a few MiB after each checkpoint instead of keeping its largest size.
            if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                db.execute("VACUUM")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            # A lost last flush after a power cut is acceptable for a cache; fsync per commit is not.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db


    # -- jobs (worker thread only)

    def _add(self, db: sqlite3.Connection, samples: Sequence[Sample], now: float) -> bool:
        limits = self.limits
        with transaction(db, "BEGIN IMMEDIATE"):  # IMMEDIATE: the epoch read below is the one we write with
            growth = self._growth(db, now)
            calls = [s for s in samples if s.key]  # keyless samples are batch shapes only (the batcher's)
            db.executemany(_UPSERT_ENTRY, [(s.model, s.key, s.count * growth, s.shape, s.batch, now) for s in calls])
            db.executemany(_UPSERT_SHAPE, [(s.model, s.shape, s.batch, s.count * growth) for s in samples])
            db.executemany(_UPSERT_MODEL, [(s.model, s.count * growth) for s in calls])
            for model in {s.model for s in samples}:
                self._trim(db, model)
            db.execute(_DELETE_EXPIRED_PAYLOADS, (now - limits.payload_ttl,))
        # Payloads go in transactions of a few MiB each, within the budget after each: one large flush
        # must not grow the write-ahead log (or the file) past what the budget allows.
        payloads = [(s.model, s.key, len(p), p) for s in samples if (p := _storable(s.payload, limits))]
        for chunk in _chunks(payloads, _PAYLOAD_CHUNK):
            with transaction(db, "BEGIN IMMEDIATE"):
                self._enforce_budget(db, incoming=sum(row[2] for row in chunk))  # room first: no transient excess
                db.executemany(_INSERT_PAYLOAD, chunk)
                self._enforce_budget(db)
        db.execute("PRAGMA incremental_vacuum")
        # Freed pages leave the file only once the log is checkpointed; PASSIVE never waits for readers.
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return True

    def _growth(self, db: sqlite3.Connection, now: float) -> float:
        """``2**((now - epoch) / half_life)``, first moving the epoch (and rescaling) if it is too old."""
        half_life = self.limits.half_life
        epoch = self._epoch(db)
        if epoch is None or now - epoch > RESCALE_AFTER * half_life:
            if epoch is not None:
                factor = _pow2(-(now - epoch) / half_life)
                for table in ("entries", "shapes", "models"):
                    db.execute(f"UPDATE {table} SET score = score * ?", (factor,))
            db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('epoch', ?)", (now,))
            return 1.0
        return _pow2((now - epoch) / half_life)

    @staticmethod
    def _epoch(db: sqlite3.Connection) -> float | None:
        row = db.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()
        return None if row is None else float(row[0])

    def _trim(self, db: sqlite3.Connection, model: str) -> None:
        """Keeps the ``capacity`` heaviest entries (and shapes) of ``model``."""
        capacity = self.limits.capacity
        (count,) = db.execute("SELECT count(*) FROM entries WHERE model = ?", (model,)).fetchone()
        if count > capacity:
            rows = db.execute(
                "SELECT key FROM entries WHERE model = ? ORDER BY score, key LIMIT ?", (model, count - capacity)
            ).fetchall()
            gone = [(model, key) for (key,) in rows]
            db.executemany("DELETE FROM entries WHERE model = ? AND key = ?", gone)
            db.executemany("DELETE FROM payloads WHERE model = ? AND key = ?", gone)
        (count,) = db.execute("SELECT count(*) FROM shapes WHERE model = ?", (model,)).fetchone()
        if count > capacity:
            db.execute(
                "DELETE FROM shapes WHERE model = ? AND (shape, batch) IN "
                "(SELECT shape, batch FROM shapes WHERE model = ? ORDER BY score LIMIT ?)",
                (model, model, count - capacity),
            )

    def _enforce_budget(self, db: sqlite3.Connection, incoming: int = 0) -> None:
        """Drops the lowest-weight payloads until all of them (and ``incoming`` more bytes) fit in
        ``max_total_bytes``."""
        (total,) = db.execute("SELECT coalesce(sum(size), 0) FROM payloads").fetchone()
        excess = total + incoming - self.limits.max_total_bytes
        if excess <= 0:
            return
        rows = db.execute(
            "SELECT p.model, p.key, p.size FROM payloads p JOIN entries e ON e.model = p.model AND e.key = p.key "
            "ORDER BY e.score"
        ).fetchall()
        victims: list[tuple[str, str]] = []
        for model, key, size in rows:
            if excess <= 0:
                break
            victims.append((model, key))
            excess -= size
        db.executemany("DELETE FROM payloads WHERE model = ? AND key = ?", victims)

    def _top(self, db: sqlite3.Connection, model: str, n: int, now: float) -> list[StoredRequest]:
        with transaction(db):
            decay = _decay(now, self._epoch(db), self.limits.half_life)
            rows = db.execute(_SELECT_TOP, (model, now - self.limits.payload_ttl, n)).fetchall()
        return [
            StoredRequest(model, key, score * decay, shape, batch, bytes(data))
            for key, score, shape, batch, data in rows
        ]

    def _shapes(self, db: sqlite3.Connection, model: str, now: float) -> list[tuple[str, int, float]]:
        with transaction(db):
            decay = _decay(now, self._epoch(db), self.limits.half_life)
            rows = db.execute(
                "SELECT shape, batch, score FROM shapes WHERE model = ? ORDER BY score DESC", (model,)
            ).fetchall()
        return [(shape, batch, score * decay) for shape, batch, score in rows]

    def _models(self, db: sqlite3.Connection, now: float) -> list[tuple[str, float]]:
        with transaction(db):
            decay = _decay(now, self._epoch(db), self.limits.half_life)
            rows = db.execute("SELECT model, score FROM models ORDER BY score DESC").fetchall()
        return [(model, score * decay) for model, score in rows]



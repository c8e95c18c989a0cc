"""Traffic memory: which requests and batch shapes each model has seen, weighted by recency.

The recorder hands the store aggregated :class:`Sample` values once per flush interval; on start the
planner asks for the top requests per model (with their payloads, to replay them) and the batch-shape
histogram. Two stores share one interface (:class:`TrafficStore`), chosen by :func:`open_store`:

- :class:`SQLiteStore`, an embedded file (default; in Kubernetes an ``emptyDir``): one replica's memory,
  surviving restarts of the sidecar process;
- :class:`RedisStore`, shared by the fleet: every replica adds to and reads the same counts, so a new
  replica warms up with what the whole fleet has seen.

Decay: forward decay with a shared epoch
----------------------------------------
A weight must halve every ``half_life`` seconds. Instead of multiplying every stored weight
periodically (which, shared by many replicas, needs a lock, a leader or idempotent bookkeeping to run
exactly once per period), a sighting at time ``t`` adds ``count * 2**((t - epoch) / half_life)`` to the
stored *score*; the weight at time ``now`` is ``score * 2**(-(now - epoch) / half_life)``
(Cormode et al., "Forward Decay", ICDE 2009). Consequences:

- the ranking of scores *is* the ranking of decayed weights at any moment, so sorted sets and SQL
  indexes stay ordered without rewriting anything as time passes;
- adding is commutative: replicas add concurrently, in any order, and the sums are exact;
- the only state shared between writers is the ``epoch``. Scores grow by 2x per half-life, so when the
  epoch is more than ``RESCALE_AFTER`` half-lives old the writer multiplies every score by
  ``2**(-(now - epoch) / half_life)`` and moves the epoch to ``now``. In Redis this happens inside the
  same Lua script that adds (scripts run atomically), in SQLite inside the same ``BEGIN IMMEDIATE``
  transaction: a writer always reads the epoch it scales against in the same atomic step, so no replica
  can ever add with a stale epoch, and the rescale needs no lock.

Replicas use their own clocks: a skew of ``s`` seconds mis-weighs that replica's sightings by
``2**(s / half_life)``, i.e. nothing for seconds of skew against a one-day half-life.

Payload TTL: an entry's payload is *live* while ``now - last_seen <= payload_ttl`` (by the injected
clock, so tests need no sleeping). Redis additionally puts a real ``EXPIRE`` on each payload key,
refreshed on every sighting, so it reclaims the memory by itself.

Failure policy: the memory is an optimisation, never a dependency. No method raises because Redis is
down, slow or refusing, or the SQLite file is unwritable: ``add`` drops the samples (counted in
``dropped``), reads answer empty, one warning is logged per outage and one info line on recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from ..errors import ConfigError

__all__ = [
    "RESCALE_AFTER",
    "Clock",
    "RedisStore",
    "SQLiteStore",
    "Sample",
    "StoreLimits",
    "StoredRequest",
    "TrafficStore",
    "open_store",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]

# Half-lives the epoch may lag behind before scores are rescaled: scores stay below 2**32 times a
# count, far from float overflow, and a rescale (which touches every entry) happens once a month
# with the default one-day half-life.
RESCALE_AFTER = 32.0
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


# -- values -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """Aggregated observations of one request identity since the last flush."""

    model: str
    key: str  # hex digest of the canonical request identity; "" for a batch shape only (the batcher's)
    shape: str  # shape signature, e.g. "INPUT0:FP32[4,16];INPUT1:INT64[4]"
    batch: int  # leading (batch) dimension, 1 if none
    count: int  # how many times seen since the last flush
    payload: bytes  # opaque serialized request (b"" if the recorder dropped it for size)


@dataclass(frozen=True, slots=True)
class StoredRequest:
    model: str
    key: str
    weight: float  # decayed count
    shape: str
    batch: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class StoreLimits:
    capacity: int = 400  # entries kept per model (lowest weight evicted); also shapes per model
    max_payload_bytes: int = 1 << 20
    max_total_bytes: int = 256 << 20  # all payloads together; lowest-weight payloads dropped first
    payload_ttl: float = 7 * 86400  # seconds since last seen
    half_life: float = 86400  # weights halve every half_life seconds
    namespace: str = "warm-sidecar"  # Redis key prefix (several fleets can share one Redis)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {self.capacity}")
        if self.max_payload_bytes < 0 or self.max_total_bytes < 0:
            raise ValueError("payload byte limits must not be negative")
        if not (self.payload_ttl > 0 and self.half_life > 0):
            raise ValueError("payload_ttl and half_life must be positive")
        if not self.namespace:
            raise ValueError("namespace must not be empty")


class TrafficStore(Protocol):
    kind: str  # "sqlite" | "redis"
    dropped: int  # samples dropped because the store was unavailable

    async def add(self, samples: Sequence[Sample]) -> None: ...

    async def top(self, model: str, n: int) -> list[StoredRequest]:
        """Up to ``n`` entries with a live payload, weight descending."""
        ...

    async def shapes(self, model: str) -> list[tuple[str, int, float]]:
        """(shape, batch, weight), weight descending."""
        ...

    async def models(self) -> list[tuple[str, float]]:
        """(model, total weight), weight descending."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> str:
        """For logs and status; never includes a password."""
        ...


def open_store(location: str, limits: StoreLimits, *, clock: Clock = time.time) -> TrafficStore:
    """``redis://``, ``rediss://``, ``unix://`` -> :class:`RedisStore`; anything else is a SQLite file.

    Opening SQLite creates the parent directories, the file and the schema (a short blocking step
    meant for start-up); a location that cannot be opened raises :class:`ConfigError`. Redis
    connects lazily, so opening it never fails for an unreachable server.
    """
    if location.lower().startswith(REDIS_SCHEMES):
        try:
            return RedisStore(location, limits, clock=clock)
        except ValueError as error:
            raise ConfigError(f"traffic store: unusable Redis URL {redact_url(location)}: {error}") from None
    return SQLiteStore(Path(location), limits, clock=clock)


# -- shared helpers ---------------------------------------------------------------------------------


def _pow2(exponent: float) -> float:
    # Clamped: a clock far behind the epoch must not overflow (2 ** 1024 raises OverflowError).
    return math.pow(2.0, min(exponent, 1000.0))


def _decay(now: float, epoch: float | None, half_life: float) -> float:
    """Factor turning a forward score into the weight at ``now``."""
    return 1.0 if epoch is None else _pow2(-(now - epoch) / half_life)


def redact_url(url: str) -> str:
    """``url`` without user, password or query (which may carry ``password=``)."""
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() == "unix":
            return f"unix://{parts.path}"
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _error_text(error: BaseException) -> str:
    # Type and a bounded message: store errors name hosts and files, never payloads.
    return f"{type(error).__name__}: {str(error)[:200]}"


class _Health:
    """One warning when an outage starts, one info line when it ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = True

    def failed(self, what: str, error: BaseException) -> None:
        if self.up:
            log.warning(
                "traffic store %s unavailable (%s during %s); carrying on without it until it returns",
                self.name, _error_text(error), what,
            )  # fmt: skip
        self.up = False

    def ok(self) -> None:
        if not self.up:
            log.info("traffic store %s available again", self.name)
        self.up = True


def _storable(payload: bytes, limits: StoreLimits) -> bytes:
    """The payload to keep, or b"" when it is over the per-payload limit (its counts still count)."""
    return payload if len(payload) <= limits.max_payload_bytes else b""


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


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    db.execute(begin)
    try:
        yield
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


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
        self._closed = False
        self._db: sqlite3.Connection | None = None
        self._health = _Health(self.describe())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="traffic-store")
        try:
            self._executor.submit(self._open).result()
        except (OSError, sqlite3.Error) as error:
            self._executor.shutdown(wait=False)
            raise ConfigError(f"traffic store: cannot open SQLite file {self.path}: {error}") from error

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path} dropped={self.dropped}{' closed' if self._closed else ''}>"

    # -- the interface

    async def add(self, samples: Sequence[Sample]) -> None:
        batch = [s for s in samples if s.count > 0]
        if not batch:
            return
        now = self._clock()
        if self._closed or await self._run("add", lambda db: self._add(db, batch, now)) is None:
            self.dropped += len(batch)

    async def top(self, model: str, n: int) -> list[StoredRequest]:
        if n <= 0:
            return []
        now = self._clock()
        return await self._run("top", lambda db: self._top(db, model, n, now)) or []

    async def shapes(self, model: str) -> list[tuple[str, int, float]]:
        now = self._clock()
        return await self._run("shapes", lambda db: self._shapes(db, model, now)) or []

    async def models(self) -> list[tuple[str, float]]:
        now = self._clock()
        return await self._run("models", lambda db: self._models(db, now)) or []

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        with contextlib.suppress(sqlite3.Error):
            await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=False)

    # -- running jobs on the worker thread

    async def _run(self, what: str, job: Callable[[sqlite3.Connection], T]) -> T | None:
        """``job(connection)`` on the worker thread; None (and one warning per outage) if SQLite fails."""
        if self._closed:
            return None
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self._with_db, job)
        except (sqlite3.Error, OSError) as error:
            self._health.failed(what, error)
            return None
        self._health.ok()
        return result

    def _with_db(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self._open()  # an earlier open failed: the file may be usable again
        assert self._db is not None
        return job(self._db)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._connect()
        except sqlite3.OperationalError:
            raise  # cannot open or lock: a configuration or permission problem, not corruption
        except sqlite3.DatabaseError as error:
            # Not a database (or corrupt): the memory is a cache, so start afresh and keep the old file.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("traffic store %s unreadable (%s); moved aside to %s", self.path, _error_text(error), aside)
            self.path.replace(aside)
            for suffix in ("-wal", "-shm"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            self._db = self._connect()

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

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- jobs (worker thread only)

    def _add(self, db: sqlite3.Connection, samples: Sequence[Sample], now: float) -> bool:
        limits = self.limits
        with _transaction(db, "BEGIN IMMEDIATE"):  # IMMEDIATE: the epoch read below is the one we write with
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
            with _transaction(db, "BEGIN IMMEDIATE"):
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
        with _transaction(db):
            decay = _decay(now, self._epoch(db), self.limits.half_life)
            rows = db.execute(_SELECT_TOP, (model, now - self.limits.payload_ttl, n)).fetchall()
        return [
            StoredRequest(model, key, score * decay, shape, batch, bytes(data))
            for key, score, shape, batch, data in rows
        ]

    def _shapes(self, db: sqlite3.Connection, model: str, now: float) -> list[tuple[str, int, float]]:
        with _transaction(db):
            decay = _decay(now, self._epoch(db), self.limits.half_life)
            rows = db.execute(
                "SELECT shape, batch, score FROM shapes WHERE model = ? ORDER BY score DESC", (model,)
            ).fetchall()
        return [(shape, batch, score * decay) for shape, batch, score in rows]

    def _models(self, db: sqlite3.Connection, now: float) -> list[tuple[str, float]]:
        with _transaction(db):
            decay = _decay(now, self._epoch(db), self.limits.half_life)
            rows = db.execute("SELECT model, score FROM models ORDER BY score DESC").fetchall()
        return [(model, score * decay) for model, score in rows]


# -- Redis ------------------------------------------------------------------------------------------
#
# Keys, all under the namespace ``ns`` (a model name is followed by a one-letter part, a request key
# is hex, so no two models' keys can collide):
#   ns:epoch              string   forward-decay epoch (seconds)
#   ns:models             zset     model -> score
#   ns:m:<model>:w        zset     request key -> score (at most ``capacity``)
#   ns:m:<model>:h        hash     request key -> "<last seen>\n<batch>\n<shape>"
#   ns:m:<model>:s        zset     "<batch>\n<shape>" -> score (at most ``capacity``)
#   ns:p:<model>:<key>    string   payload, EXPIRE payload_ttl refreshed on every sighting
#   ns:payloads           zset     "<key>\n<model>" -> score, for the global byte budget
#   ns:sizes              hash     "<key>\n<model>" -> payload size
#   ns:bytes              string   sum of ns:sizes (approximate: payloads expire by themselves)
# The scripts derive key names from ARGV, so they need a standalone Redis (or a proxy / Sentinel
# primary), not Redis Cluster.

_LUA_COMMON = r"""
local ns = ARGV[1]
local epoch_key, models_key = ns .. ':epoch', ns .. ':models'
local payloads_key, sizes_key, bytes_key = ns .. ':payloads', ns .. ':sizes', ns .. ':bytes'

local function model_key(model, part)
  return ns .. ':m:' .. model .. ':' .. part
end

local function payload_key(model, key)
  return ns .. ':p:' .. model .. ':' .. key
end
"""

_ADD_LUA = _LUA_COMMON + r"""
local now, half_life = tonumber(ARGV[2]), tonumber(ARGV[3])
local capacity, max_total = tonumber(ARGV[4]), tonumber(ARGV[5])
local expire, rescale_after = tonumber(ARGV[6]), tonumber(ARGV[7])
local FIRST, FIELDS = 8, 6

local function num(x)
  return string.format('%.17g', x)
end

local function scale_zset(zkey, factor)
  local items = redis.call('ZRANGE', zkey, 0, -1, 'WITHSCORES')
  for i = 1, #items, 2 do
    redis.call('ZADD', zkey, num(tonumber(items[i + 1]) * factor), items[i])
  end
end

local function rescale(factor)
  for _, model in ipairs(redis.call('ZRANGE', models_key, 0, -1)) do
    scale_zset(model_key(model, 'w'), factor)
    scale_zset(model_key(model, 's'), factor)
  end
  scale_zset(models_key, factor)
  scale_zset(payloads_key, factor)
end

-- The epoch is read and moved inside this atomic script, so every replica scales against the same one.
local function growth()
  local epoch = tonumber(redis.call('GET', epoch_key))
  if epoch == nil or now - epoch > rescale_after * half_life then
    if epoch ~= nil then
      rescale(2 ^ (-(now - epoch) / half_life))
    end
    redis.call('SET', epoch_key, num(now))
    return 1
  end
  return 2 ^ ((now - epoch) / half_life)
end

local function drop_payload(model, key)
  local member = key .. '\n' .. model
  local size = redis.call('HGET', sizes_key, member)
  if size then
    redis.call('DECRBY', bytes_key, size)
    redis.call('HDEL', sizes_key, member)
  end
  redis.call('ZREM', payloads_key, member)
  redis.call('DEL', payload_key(model, key))
end

local function keep_payload(model, key, payload, score)
  local member = key .. '\n' .. model
  local pkey = payload_key(model, key)
  if redis.call('EXPIRE', pkey, expire) == 1 then
    redis.call('ZADD', payloads_key, score, member)
  elseif #payload > 0 then
    redis.call('SET', pkey, payload, 'EX', expire)
    local old = tonumber(redis.call('HGET', sizes_key, member) or 0)
    redis.call('HSET', sizes_key, member, #payload)
    redis.call('INCRBY', bytes_key, #payload - old)
    redis.call('ZADD', payloads_key, score, member)
  else
    drop_payload(model, key) -- expired by itself: release its share of the budget
  end
end

local function trim(model)
  local weights = model_key(model, 'w')
  local extra = redis.call('ZCARD', weights) - capacity
  if extra > 0 then
    local meta = model_key(model, 'h')
    for _, key in ipairs(redis.call('ZRANGE', weights, 0, extra - 1)) do
      redis.call('HDEL', meta, key)
      drop_payload(model, key)
    end
    redis.call('ZREMRANGEBYRANK', weights, 0, extra - 1)
  end
  local shapes = model_key(model, 's')
  extra = redis.call('ZCARD', shapes) - capacity
  if extra > 0 then
    redis.call('ZREMRANGEBYRANK', shapes, 0, extra - 1)
  end
end

local function enforce_budget()
  while tonumber(redis.call('GET', bytes_key) or 0) > max_total do
    local lowest = redis.call('ZRANGE', payloads_key, 0, 0)
    if #lowest == 0 then
      redis.call('SET', bytes_key, 0) -- the counter drifted: nothing is left to account for
      return
    end
    local nl = string.find(lowest[1], '\n', 1, true)
    drop_payload(string.sub(lowest[1], nl + 1), string.sub(lowest[1], 1, nl - 1))
  end
end

local g = growth()
local touched = {}
for i = FIRST, #ARGV, FIELDS do
  local model, key, shape, batch = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local inc = num(tonumber(ARGV[i + 4]) * g)
  redis.call('ZINCRBY', model_key(model, 's'), inc, batch .. '\n' .. shape)
  if key ~= '' then -- a keyless sample is a batch shape only (the batcher's)
    local score = redis.call('ZINCRBY', model_key(model, 'w'), inc, key)
    redis.call('HSET', model_key(model, 'h'), key, num(now) .. '\n' .. batch .. '\n' .. shape)
    redis.call('ZINCRBY', models_key, inc, model)
    keep_payload(model, key, ARGV[i + 5], score)
  end
  touched[model] = true
end
for model in pairs(touched) do
  trim(model)
end
enforce_budget()
return 1
"""

# Returns {epoch, key1, score1, meta1, payload1, ...}: the n heaviest entries with a live payload.
_TOP_LUA = _LUA_COMMON + r"""
local model, n, now, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local weights, meta = model_key(model, 'w'), model_key(model, 'h')
local out = {redis.call('GET', epoch_key) or ''}
local found, start, page_size = 0, 0, math.max(2 * n, 32)
while found < n do
  local page = redis.call('ZREVRANGE', weights, start, start + page_size - 1, 'WITHSCORES')
  for i = 1, #page, 2 do
    local key = page[i]
    local info = redis.call('HGET', meta, key)
    if info and now - tonumber(string.match(info, '^[^\n]*')) <= ttl then
      local payload = redis.call('GET', payload_key(model, key))
      if payload then
        out[#out + 1] = key
        out[#out + 1] = page[i + 1]
        out[#out + 1] = info
        out[#out + 1] = payload
        found = found + 1
        if found == n then
          break
        end
      end
    end
  end
  if #page < 2 * page_size then
    break
  end
  start = start + page_size
end
return out
"""


def _float_or_none(raw: bytes | str | None) -> float | None:
    return float(raw) if raw else None


class RedisStore:
    """Fleet-wide traffic memory in Redis: one Lua script per ``add`` (one round trip, atomic).

    Short timeouts (``connect_timeout``, ``op_timeout``) and at most one immediate retry, on a
    broken connection only, bound every call to about ``connect_timeout + op_timeout`` seconds; the
    pool reconnects by itself once Redis is back, and the scripts are reloaded when a restarted
    Redis has forgotten them.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        limits: StoreLimits,
        *,
        clock: Clock = time.time,
        connect_timeout: float = 0.5,
        op_timeout: float = 1.0,
    ) -> None:
        self.limits = limits
        self.dropped = 0
        self._clock = clock
        self._closed = False
        self._deadline = connect_timeout + op_timeout
        self._description = f"redis {redact_url(url)} namespace={limits.namespace}"
        self._health = _Health(self._description)
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=op_timeout,
            # The default retries ten times with backoff; a dead Redis must cost one quick failure.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._add_script = self._redis.register_script(_ADD_LUA)
        self._top_script = self._redis.register_script(_TOP_LUA)

    def describe(self) -> str:
        return self._description

    def __repr__(self) -> str:
        state = "up" if self._health.up else "down"
        return f"<RedisStore {self._description} {state} dropped={self.dropped}>"

    # -- the interface

    async def add(self, samples: Sequence[Sample]) -> None:
        batch = [s for s in samples if s.count > 0]
        if not batch:
            return
        args = self._add_args(batch)
        if self._closed or await self._guard("add", lambda: self._add_script(args=args)) is None:
            self.dropped += len(batch)

    async def top(self, model: str, n: int) -> list[StoredRequest]:
        if n <= 0:
            return []
        now = self._clock()
        args: list[str | int | float] = [self.limits.namespace, model, n, now, self.limits.payload_ttl]
        raw = await self._guard("top", lambda: self._top_script(args=args))
        return [] if raw is None else self._decode_top(model, raw, now)

    async def shapes(self, model: str) -> list[tuple[str, int, float]]:
        now = self._clock()
        found = await self._guard("shapes", lambda: self._ranked(f"{self.limits.namespace}:m:{model}:s"))
        if found is None:
            return []
        decay = _decay(now, found[0], self.limits.half_life)
        shapes = []
        for member, score in found[1]:
            batch, _, shape = member.decode().partition("\n")
            shapes.append((shape, int(batch), score * decay))
        return shapes

    async def models(self) -> list[tuple[str, float]]:
        now = self._clock()
        found = await self._guard("models", lambda: self._ranked(f"{self.limits.namespace}:models"))
        if found is None:
            return []
        decay = _decay(now, found[0], self.limits.half_life)
        return [(member.decode(), score * decay) for member, score in found[1]]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RedisError, OSError):
            async with asyncio.timeout(self._deadline):
                await self._redis.aclose()

    # -- internals

    async def _guard(self, what: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """``await call()`` within the deadline; None (one warning per outage) if Redis fails."""
        if self._closed:
            return None
        try:
            async with asyncio.timeout(self._deadline):
                result = await call()
        except (RedisError, OSError) as error:  # OSError covers TimeoutError and refused connections
            self._health.failed(what, error)
            return None
        self._health.ok()
        return result

    def _add_args(self, samples: Sequence[Sample]) -> list[str | int | float | bytes]:
        limits = self.limits
        args: list[str | int | float | bytes] = [
            limits.namespace,
            self._clock(),
            limits.half_life,
            limits.capacity,
            limits.max_total_bytes,
            max(1, math.ceil(limits.payload_ttl)),  # EXPIRE takes whole seconds
            RESCALE_AFTER,
        ]
        for s in samples:
            args += [s.model, s.key, s.shape, s.batch, s.count, _storable(s.payload, limits)]
        return args

    async def _ranked(self, zset: str) -> tuple[float | None, list[tuple[bytes, float]]]:
        """The epoch and a sorted set, heaviest first, read atomically (MULTI) against rescales."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(f"{self.limits.namespace}:epoch")
            pipe.zrange(zset, 0, -1, desc=True, withscores=True)
            epoch, items = await pipe.execute()
        return _float_or_none(epoch), [(bytes(m), float(s)) for m, s in items]

    def _decode_top(self, model: str, raw: list[Any], now: float) -> list[StoredRequest]:
        decay = _decay(now, _float_or_none(raw[0]), self.limits.half_life)
        found = []
        for i in range(1, len(raw) - 3, 4):
            key, score, info, payload = raw[i : i + 4]
            _, batch, shape = bytes(info).decode().split("\n", 2)
            found.append(StoredRequest(model, key.decode(), float(score) * decay, shape, int(batch), bytes(payload)))
        return found

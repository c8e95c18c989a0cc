"""Traffic memory: which requests and batch shapes each model has seen, weighted by recency.

The recorder hands the store aggregated :class:`Sample` values once per flush interval; on start the
planner asks for the top requests per model (with their payloads, to replay them) and the batch-shape
histogram. Two stores share one interface (:class:`TrafficStore`), chosen by :func:`open_store`:

- ``SQLiteStore`` (``store/sqlite.py``), an embedded file (default; in Kubernetes an ``emptyDir``): one
  replica's memory, surviving restarts of the sidecar process;
- ``RedisStore`` (``store/redis.py``), shared by the fleet: every replica adds to and reads the same
  counts, so a new replica warms up with what the whole fleet has seen. It talks to Redis through the
  sidecar's one Redis client layer (``sidecar/redis``).

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

import time
from pathlib import Path

from ...errors import ConfigError
from ...redis.client import RedisClients
from ...redis.urls import SCHEMES as REDIS_SCHEMES
from ...redis.urls import is_redis, redact
from .base import RESCALE_AFTER, Clock, Sample, StoredRequest, StoreLimits, TrafficStore
from .redis import RedisStore
from .sqlite import SQLiteStore

__all__ = [
    "REDIS_SCHEMES",
    "RESCALE_AFTER",
    "Clock",
    "Sample",
    "StoreLimits",
    "StoredRequest",
    "TrafficStore",
    "open_store",
    "redact",
]


def open_store(location: str, limits: StoreLimits, *, clock: Clock = time.time,
               redis: RedisClients | None = None) -> TrafficStore:
    """``redis://``, ``rediss://``, ``unix://`` -> ``RedisStore`` (through ``redis``, the sidecar's clients, or a
    client of its own); anything else is a SQLite file.

    Opening SQLite creates the parent directories, the file and the schema (a short blocking step
    meant for start-up); a location that cannot be opened raises :class:`ConfigError`. Redis
    connects lazily, so opening it never fails for an unreachable server.
    """
    if is_redis(location):
        clients = redis or RedisClients(failures=3, cooldown=2.0)
        try:
            return RedisStore(clients.get(location), limits, clock=clock, owns_client=redis is None)
        except ValueError as error:
            raise ConfigError(f"traffic store: unusable Redis URL {redact(location)}: {error}") from None
    return SQLiteStore(Path(location), limits, clock=clock)

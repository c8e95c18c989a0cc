"""The response cache stage: in-process tier, shared Redis tier, single-flight, stale-if-error.

Placed after the recorder (which sees every caller) and before the batcher (only misses batch).
A hit never waits on anything but a dictionary (and, on an in-process miss, one Redis read of a
few ms at most). Identical calls in flight together cost one upstream call: the first starts it
as a task of its own and every caller, the first included, awaits it shielded, so a caller that
leaves never cancels the call for the others; when the last one leaves, the call is cancelled and
its entry is gone with it. Answers are canonical responses, so each front re-encodes them for its
own caller (its encoding, its id, its outputs).

Safe by default: only models in ``cache.models``; never errors or non-200 answers, calls with
``Cache-Control: no-store``, sequence calls, calls the codecs pass through raw, or calls carrying
credentials unless ``cache.scope_header`` scopes the key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..cache import entry as entries
from ..cache.fingerprint import Fingerprints
from ..cache.generation import Generations
from ..cache.memory import MemoryTier
from ..cache.podtier import PodTier
from ..cache.redis import RedisTier
from ..calls import Call, Reply
from ..config import CacheConfig
from ..errors import DecodeError, UpstreamTimeout, UpstreamUnavailable
from ..identity import cache_key
from ..metrics import Metrics
from ..protocols import forwarded
from ..protocols.request import InferenceResponse
from .stage import Next

log = logging.getLogger("sidecar.cache")


@dataclass(eq=False)
class _Flight:
    key: bytes
    task: asyncio.Task[Reply]
    waiters: int = 0


@dataclass
class ModelStats:
    hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    coalesced: int = 0
    bypassed: int = 0
    stale: int = 0

    @property
    def hit_ratio(self) -> float:
        asked = self.hits + self.redis_hits + self.misses + self.coalesced
        return (self.hits + self.redis_hits + self.coalesced) / asked if asked else 0.0


@dataclass
class CacheStats:
    models: dict[str, ModelStats] = field(default_factory=dict)

    def of(self, model: str) -> ModelStats:
        stats = self.models.get(model)
        if stats is None:
            stats = self.models[model] = ModelStats()
        return stats


class CacheStage:
    name = "cache"

    def __init__(self, cfg: CacheConfig, memory: MemoryTier | PodTier, shared: RedisTier | None,
                 generations: Generations, metrics: Metrics, clock: Callable[[], float] = time.time,
                 sharing: Callable[[], Awaitable[bool]] | None = None,
                 fingerprints: Fingerprints | None = None) -> None:
        self.cfg = cfg
        self.fingerprints = fingerprints  # what each model answers: part of the shared tier's key
        # Whether what the model server checks of a caller is known (forwarded.Rules, RestrictionProbe): until
        # it is, no answer is shared, for it might go to a caller the server would refuse. Asked only while
        # the answer was last "not yet" (a call may wait briefly for the server to be asked).
        self._sharing = sharing
        self._shares = sharing is None
        self.memory = memory
        self.shared = shared
        self.generations = generations
        self.metrics = metrics
        self.clock = clock
        self.every_model = "*" in cfg.models
        self.enabled = frozenset(m for m in cfg.models if m != "*")
        self.ttls = {m: float(t) for m, _, t in (item.rpartition("=") for item in cfg.model_ttl)}
        self.flights: dict[bytes, _Flight] = {}
        self.stats = CacheStats()
        self.corrupt = 0  # shared-tier entries that did not decode (read as misses)

    def __repr__(self) -> str:
        return f"<CacheStage {self.memory!r} flights={len(self.flights)} shared={self.shared!r}>"

    def caches(self, model: str) -> bool:
        return self.every_model or model in self.enabled

    async def __call__(self, call: Call, next: Next) -> Reply:
        if not self._shares and self._sharing is not None:
            self._shares = await self._sharing()
        if self._bypass(call) or not self._shares:
            self._count(call.request.model, "bypass", call.origin)
            reply = await next(call)
            reply.cache = reply.cache or "bypass"
            return reply
        model = call.request.model
        if self.shared is not None:
            self._follow_epoch(model, self.shared.epoch(model))
        ident = _identity(call)
        key = ident + self.generations.key(model)
        if not call.no_cache:
            found = self.memory.get(key)
            if found is not None:
                self._count(model, "hit", call.origin)
                return Reply(200, response=found.response, source="cache", cache="hit")
        # Only on an in-process miss: a hit never pays for the shared tier's key (nor for the fingerprint).
        answers = self._answers(call)
        shared_key = self.shared.key(model, f"{self.generations.versions.get(model, '')}|{answers}", ident) \
            if self.shared is not None and answers is not None else b""
        if not call.no_cache:
            hit = await self._lookup_shared(model, key, shared_key, call.origin)
            if hit is not None:
                return hit
        return await self._fetch(call, key, shared_key, next)

    def _follow_epoch(self, model: str, epoch: tuple[int, int]) -> None:
        """The fleet-wide epoch of ``model`` moved (a flush or a reload on any replica, read back by the epoch
        refresh): this replica's in-process answers of that model go too, not only the shared tier's."""
        if self.generations.follow_fleet(model, epoch):  # an answer in flight now is stored where nobody looks
            self.memory.flush(model)

    # -- reads ---------------------------------------------------------------------------------------

    def _answers(self, call: Call) -> str | None:
        """What this model answers (``cache.fingerprint``), part of the shared tier's key; None until known,
        and then the shared tier is skipped both ways (the first answer stored finds it out)."""
        if self.fingerprints is None:
            return ""
        return self.fingerprints.current(call.request.model)

    async def _lookup_shared(self, model: str, key: bytes, shared_key: bytes, origin: str) -> Reply | None:
        if self.shared is None or not shared_key:
            return None
        data = await self.shared.get(shared_key, patient=origin == "fill")
        if data is None:
            return None
        try:
            response, stored_at = entries.decode(data)
        except ValueError:
            self.corrupt += 1
            return None
        expires_at = stored_at + self.ttl(model)
        if expires_at <= self.clock():
            return None
        self.memory.put(key, model, entries.Entry(response, stored_at, expires_at, entries.response_size(response)))
        self._count(model, "redis_hit", origin)
        return Reply(200, response=response, source="cache", cache="hit")

    # -- misses: one upstream call for identical calls in flight ----------------------------------------

    async def _fetch(self, call: Call, key: bytes, shared_key: bytes, next: Next) -> Reply:
        model = call.request.model
        flight = self.flights.get(key)
        if flight is not None and call.no_cache:
            # A revalidating caller (warm-up measures the model) never rides on another's call.
            return await self._lead(call, key, shared_key, next)
        leading = flight is None
        if flight is None:
            task = asyncio.get_running_loop().create_task(self._lead(call, key, shared_key, next))
            flight = self.flights[key] = _Flight(key, task)
            task.add_done_callback(functools.partial(self._landed_task, flight))
        flight.waiters += 1
        try:
            if leading:
                # The leader's deadline is enforced downstream, by the upstream client's one timer, exactly as
                # with the cache off. A timeout context here would cost about as much again as the rest of a
                # miss (measured: some 25 us of sidecar CPU per call). Followers may have earlier deadlines.
                reply = await asyncio.shield(flight.task)
            else:
                async with asyncio.timeout_at(call.deadline):
                    reply = await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            self._leave(flight)
            raise
        except TimeoutError:
            self._leave(flight)
            return self._stale_or_raise(model, key, UpstreamTimeout("model server did not answer before the "
                                                                    "call's deadline"))
        except UpstreamTimeout as e:
            flight.waiters -= 1
            if not leading and asyncio.get_running_loop().time() < call.deadline:
                # The leader's own deadline ran out, not this caller's: it asks on its own, as it would alone.
                return await self._fetch(call, key, shared_key, next)
            return self._stale_or_raise(model, key, e)
        except UpstreamUnavailable as e:
            flight.waiters -= 1
            return self._stale_or_raise(model, key, e)
        flight.waiters -= 1
        if leading:
            self._count(model, "miss", call.origin)
            reply.cache = "miss"
            return reply
        return await self._follow(call, reply, next)

    async def _follow(self, call: Call, reply: Reply, next: Next) -> Reply:
        """A coalesced caller gets the shared answer re-encoded for it. An error it never shares: the leader's
        error answer is the server's word on the leader's request (its id, its deadline, its priority), so
        the follower asks for itself, as does one whose answer cannot be modelled."""
        if not reply.ok:
            return await next(call)
        try:
            response = reply.response()
        except (DecodeError, ValueError):
            return await next(call)
        self._count(call.request.model, "coalesced", call.origin)
        return Reply(200, response=response, source="coalesced", cache="coalesced")

    async def _lead(self, call: Call, key: bytes, shared_key: bytes, next: Next) -> Reply:
        reply = await next(call)
        if reply.ok:
            self._store(call, key, shared_key, reply)
        return reply

    def _store(self, call: Call, key: bytes, shared_key: bytes, reply: Reply) -> None:
        try:
            response = reply.response()
        except (DecodeError, ValueError):
            return  # an answer the codecs cannot read is passed on, never stored
        size = entries.response_size(response)
        if size > self.cfg.max_entry_bytes:
            return
        model = call.request.model
        now = self.clock()
        ttl = self.ttl(model)
        self.memory.put(key, model, entries.Entry(response, now, now + ttl, size))
        if self.shared is not None and shared_key:
            self.shared.put(shared_key, entries.encode(response, now), ttl)
        elif self.fingerprints is not None and self.fingerprints.current(model) is None:
            keys = forwarded.restriction_keys(call.context)
            if keys == call.context:  # forwarded headers shape the answer: not one every replica can ask
                self.fingerprints.observe(call.request, response, keys, self._write_later(call, key, response, now))

    def _write_later(self, call: Call, key: bytes, response: InferenceResponse,
                     stored_at: float) -> Callable[[str], None] | None:
        """Once the model's digest is known, the answer goes to the shared tier too - unless the model's
        generation moved meanwhile (a flush, a reload): then it belongs to nobody."""
        shared = self.shared
        if shared is None:
            return None
        model = call.request.model
        generation, epoch, ident = self.generations.key(model), shared.epoch(model), _identity(call)
        versions = self.generations.versions.get(model, "")

        def write(answers: str) -> None:
            if self.generations.key(model) == generation and shared.epoch(model) == epoch:
                shared_key = shared.key(model, f"{versions}|{answers}", ident)
                shared.put(shared_key, entries.encode(response, stored_at), self.ttl(model))

        return write

    def _landed_task(self, flight: _Flight, _task: asyncio.Task[Reply]) -> None:
        self._landed(flight)

    def _landed(self, flight: _Flight) -> None:
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]

    def _leave(self, flight: _Flight) -> None:
        flight.waiters -= 1
        if flight.waiters <= 0 and not flight.task.done():
            # Nobody is left waiting: the upstream call is cancelled as a caller's own would be, and the
            # entry goes at once, so a caller arriving now starts afresh instead of joining a cancelled call.
            self._landed(flight)
            flight.task.cancel()

    def _stale_or_raise(self, model: str, key: bytes, error: UpstreamUnavailable | UpstreamTimeout) -> Reply:
        if self.cfg.stale_if_error > 0:
            stale = self.memory.get(key, stale_for=self.cfg.stale_if_error)
            if stale is not None:
                self._count(model, "stale")
                return Reply(200, response=stale.response, source="cache", cache="stale")
        raise error

    # -- policy ---------------------------------------------------------------------------------------

    def _bypass(self, call: Call) -> bool:
        return not call.shareable or call.no_store or not self.caches(call.request.model)

    def ttl(self, model: str) -> float:
        return self.ttls.get(model, self.cfg.ttl)

    def recheck_sharing(self) -> None:
        """What the server checks of callers must be asked again (it restarted): nothing is shared till then."""
        if self._sharing is not None:
            self._shares = False

    def report(self) -> dict[str, Any]:
        """For /status: per-model hit ratios and counts, the in-process tier's size, the shared tier's state."""
        stored = self.memory.entries_by_model()
        return {
            "entries": len(self.memory), "bytes": self.memory.used, "max_bytes": self.memory.max_bytes,
            "shared": None if self.shared is None else f"redis, breaker {self.shared.breaker.state}",
            "fingerprints": self.fingerprints.report() if self.fingerprints is not None else {},
            "models": {model: {"hit_ratio": round(m.hit_ratio, 4), "hits": m.hits, "redis_hits": m.redis_hits,
                               "misses": m.misses, "coalesced": m.coalesced, "bypassed": m.bypassed,
                               "stale": m.stale, "entries": stored.get(model, (0, 0))[0]}
                       for model, m in sorted(self.stats.models.items())},
        }

    def _count(self, model: str, result: str, origin: str = "") -> None:
        if origin in ("warmup", "fill"):
            return  # the sidecar's own calls (measuring the model, filling the cache): no caller's hit or miss
        stats = self.stats.of(self.metrics.model_label(model))
        if result == "hit":
            stats.hits += 1
        elif result == "redis_hit":
            stats.redis_hits += 1
        elif result == "miss":
            stats.misses += 1
        elif result == "coalesced":
            stats.coalesced += 1
        elif result == "stale":
            stats.stale += 1
        else:
            stats.bypassed += 1


def _identity(call: Call) -> bytes:
    """The call's cache identity; computed once for every call that shares its memo (identical bytes)."""
    scope = call.scope if not call.context else call.scope + b"\0" + forwarded.encode(call.context)
    memo = call.memo
    if memo is None or memo.request is not call.request:
        return cache_key(call.request, "", scope)
    ident = memo.idents.get(scope)
    if ident is None:
        if len(memo.idents) >= 4:  # one per tenant seen with these bytes; a handful is plenty
            memo.idents.clear()
        ident = memo.idents[scope] = cache_key(call.request, "", scope)
    return ident


class CacheCollector:
    """The cache's Prometheus families, read from the stage at scrape time."""

    def __init__(self, stage: CacheStage) -> None:
        self.stage = stage

    def describe(self) -> Iterator[Metric]:
        return iter(self._families(CacheStats(), {}, None))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.stage.stats, self.stage.memory.entries_by_model(), self.stage))

    def _families(self, stats: CacheStats, stored: dict[str, tuple[int, int]],
                  stage: CacheStage | None) -> list[Metric]:
        requests = CounterMetricFamily("sidecar_cache_requests", "Cache lookups by model and result (hit: "
                                       "in-process, redis_hit: shared tier, miss, coalesced, bypass, stale)",
                                       labels=["model", "result"])
        for model, s in sorted(stats.models.items()):
            for result, n in (("hit", s.hits), ("redis_hit", s.redis_hits), ("miss", s.misses),
                              ("coalesced", s.coalesced), ("bypass", s.bypassed), ("stale", s.stale)):
                requests.add_metric([model, result], n)
        entries = GaugeMetricFamily("sidecar_cache_entries", "Answers in the in-process tier", labels=["model"])
        size = GaugeMetricFamily("sidecar_cache_bytes", "Bytes of the in-process tier", labels=["model"])
        label = self.stage.metrics.model_label
        for model, (n, b) in sorted(stored.items()):
            entries.add_metric([label(model)], n)
            size.add_metric([label(model)], b)
        evictions = CounterMetricFamily("sidecar_cache_evictions", "Answers evicted from the in-process tier")
        evictions.add_metric([], stage.memory.evictions if stage else 0)
        errors = CounterMetricFamily("sidecar_cache_redis_errors", "Shared-tier failures by kind", labels=["kind"])
        breaker = GaugeMetricFamily("sidecar_cache_redis_breaker_open", "1 while the shared tier is skipped")
        shared = stage.shared if stage else None
        for kind, n in sorted((shared.errors if shared else {}).items()):
            errors.add_metric([kind], n)
        breaker.add_metric([], 1.0 if shared is not None and shared.breaker.state != "closed" else 0.0)
        openings = CounterMetricFamily("sidecar_cache_redis_breaker_openings", "Times the shared tier's breaker "
                                       "opened (Redis skipped after consecutive failures)")
        openings.add_metric([], shared.breaker.opened if shared else 0)
        dropped = CounterMetricFamily("sidecar_cache_redis_dropped_writes", "Answers not written to the shared "
                                      "tier (write queue full, breaker open, failed or unfinished writes)")
        dropped.add_metric([], shared.dropped_writes if shared else 0)
        return [requests, entries, size, evictions, errors, breaker, openings, dropped]

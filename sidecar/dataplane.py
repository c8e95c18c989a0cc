"""The data plane: both data ports, the edge, the stages, the upstream clients, the cache tiers.

Built here with everything it needs, in the order calls meet them. It reads the control plane only
through a :class:`~sidecar.planes.View` (the latest snapshot) and tells it what it sees through
:class:`~sidecar.planes.Observations`: reading ``DataPlane.__init__`` shows the whole data path.

What a new snapshot means here (``_apply``): a model whose loaded versions changed, a flush, a
restart of the model server, a restriction key learned - each makes earlier cached answers of the
models concerned unreachable; the fleet's cache epochs and warm-up's latencies come in; while the
server does not look ready no upstream connection is kept idle (a stopping Triton waits for them).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .cache.fingerprint import Fingerprints
from .cache.generation import Generations
from .cache.memory import MemoryTier
from .cache.podtier import PodTier
from .cache.redis import fleet_tier
from .calls import Call, Reply
from .config import Config, split_host_port
from .errors import ConfigError
from .forecast.feed import by_model
from .front.budget import MemoryBudget
from .front.decoding import RequestDecoder
from .front.edge import Edge
from .front.grpc import GrpcFront
from .front.h1server import H1Server
from .front.http import HttpFront
from .latency import LatencyModel
from .mesh.envoy import DataPortSignals
from .mesh.load import LoadTracker
from .mesh.orca import warm_capacity
from .metrics import Metrics
from .pipeline.batcher import Batcher
from .pipeline.cache import CacheCollector, CacheStage
from .pipeline.gate import Gate
from .pipeline.recorder import Recorder
from .pipeline.stage import Stage, chain
from .planes import INFERENCE_ROUTES, Demand, Observations, Snapshot, View
from .podload import PodLoad
from .protocols import forwarded, kserve_http, restrict
from .protocols.request import InferenceRequest, InferenceResponse
from .redis.client import RedisClients
from .state import State
from .supervise import Supervisor
from .upstream.grpc import GrpcUpstream
from .upstream.http import HttpUpstream
from .upstream.models import ModelCatalog
from .upstream.router import UpstreamRouter

log = logging.getLogger("sidecar")

# File descriptors kept back from the data port's connection limit: admin port, the model server pool, files.
_FD_RESERVE = 128
# Seconds a call waits for the model server to say what it restricts before it goes by the cache.
_PROBE_WAIT = 1.0
# Seconds between looks for models the fleet shares whose answers this replica has not fingerprinted.
_ADOPT_EVERY = 2.0
_NOT_READY = frozenset({State.STARTING, State.LOADING, State.COLD})


@dataclass(frozen=True)
class PodParts:
    """What a worker shares with the pod's other workers: the one answer tier and the batcher's load view."""

    tier: PodTier
    load: PodLoad


class DataPlane:
    def __init__(self, cfg: Config, metrics: Metrics, view: View, observations: Observations,
                 redis: RedisClients, supervisor: Supervisor, pod: PodParts | None = None) -> None:
        self.cfg = cfg
        # A worker among several (``workers``): the pod's shared tier and load view, ports shared with the others.
        self.pod_shared = pod is not None
        self.observations = observations
        self.metrics = metrics
        self.view = view
        self.supervisor = supervisor
        # The model server, over HTTP and gRPC; the calls the sidecar builds carry its own inference key.
        inference_key = restrict.inference_key(restrict.parse(cfg.restricted_api))
        self.upstream = HttpUpstream(cfg.upstream, metrics, cfg.limits.max_answer_bytes,
                                     [inference_key] if inference_key else [])
        self.grpc_upstream = GrpcUpstream(cfg.upstream, metrics, cfg.limits.max_body_bytes,
                                          cfg.limits.max_answer_bytes, lambda: view.snapshot.protocol)
        self.router = UpstreamRouter(self.upstream, self.grpc_upstream)
        self.catalog = ModelCatalog(self.upstream, cfg.warmup.max_batch)
        # What the model server reads outside a call's body: forwarded headers, a restriction key (both ports).
        self.rules = forwarded.Rules(forwarded.compile_pattern(cfg.upstream.http_header_forward_pattern),
                                     forwarded.compile_pattern(cfg.upstream.grpc_header_forward_pattern))
        self.shared_cache = fleet_tier(cfg, redis)
        # What each model answers (a digest of its answer to the fleet's probe request): part of the shared
        # tier's key, so replicas share only answers of models that answer alike.
        self.fingerprints = Fingerprints(self.shared_cache, self._ask_for_fingerprint, self._model_answers_otherwise)
        self._adopting: asyncio.Task[None] | None = None
        self.memory: MemoryTier | PodTier = pod.tier if pod is not None else MemoryTier(cfg.cache.max_bytes)
        self.cache = CacheStage(cfg.cache, self.memory, self.shared_cache, Generations(),
                                metrics, sharing=self._restrictions_known, fingerprints=self.fingerprints)
        self.latency = LatencyModel()
        self.batcher = Batcher(cfg.batch, self.catalog, self.latency, metrics,
                               on_batch=observations.batched if cfg.record.enabled else None,
                               pod_load=pod.load if pod is not None else None)
        # The data path, in order. The upstream router is the terminal.
        self.stages: list[Stage] = [Gate(cfg.gate, view, observations, metrics)]
        if cfg.record.enabled:
            self.stages.append(Recorder(observations))
        if cfg.cache.models:
            self.stages.append(self.cache)
        if cfg.batch.models:
            self.stages.append(self.batcher)
        self.pipeline = chain(self.stages, self.router.send)
        # Warm-up replay enters at the cache, so its answers fill it (and never come from it); the fill behind
        # readiness enters there too, and its misses are batched.
        self._fill = chain([s for s in self.stages if s is self.cache or s is self.batcher], self.router.send)
        self._replay: Callable[[Call], Awaitable[Reply]] = (
            chain([self.cache], self.upstream.send) if cfg.cache.models else self.upstream.send)
        # Both fronts' one edge, and the fronts themselves: wire parsing and writing only.
        self.load = LoadTracker()
        self.edge = Edge(self.pipeline, self.router, observations, self.load, self.rules, cfg.cache.scope_header,
                         cfg.upstream.timeout)
        kserve_http.keep_float_texts(cfg.cache.text_bytes)
        self.decoder = RequestDecoder(cfg.limits.inline_decode_bytes, cfg.limits.decode_workers,
                                      cfg.limits.max_body_bytes)
        self.http = HttpFront(cfg, self.edge, view, metrics, self.decoder, MemoryBudget(cfg.limits.max_inflight_bytes),
                              DataPortSignals(cfg.mesh, view, self.load))
        self.data_port: H1Server = self.http.server(connection_limit(cfg))
        self.grpc = GrpcFront(cfg, self.edge, view, metrics, self.catalog, reuse_port=self.pod_shared) \
            if cfg.grpc_listen else None
        metrics.registry.register(CacheCollector(self.cache))
        metrics.in_flight.set_function(lambda: self.http.in_flight + (self.grpc.in_flight if self.grpc else 0))
        metrics.watch_load(lambda: self.load.in_flight, self.load.rates,
                           lambda: warm_capacity(view.snapshot.state, view.snapshot.progress))
        view.subscribe(self._apply)

    def __repr__(self) -> str:
        return f"<DataPlane listen={self.cfg.listen} {self.view!r} upstream={self.upstream.base}>"

    @property
    def in_flight(self) -> int:
        return self.http.in_flight + (self.grpc.in_flight if self.grpc else 0)

    async def replay(self, call: Call) -> Reply:
        return await self._replay(call)

    async def fill(self, call: Call) -> Reply | None:
        model = call.request.model
        if not self.cfg.cache.models or not self.cache.caches(model):
            return None
        if self.shared_cache is not None and self.fingerprints.current(model) is None:
            await self._adopt()  # the fleet's answers are readable only once this model's fingerprint is known
        return await self._fill(call)

    async def _adopt(self) -> None:
        """One look at what the fleet's models answer here, shared by every caller that waits for it."""
        if self._adopting is None or self._adopting.done():
            self._adopting = asyncio.get_running_loop().create_task(self.fingerprints.adopt())
        await asyncio.shield(self._adopting)

    def demand(self) -> Demand:
        """Inference calls answered per model (the request counter's totals) and their rates now."""
        totals = by_model({k: v for k, v in self.metrics.requests.values.items() if k[0] in INFERENCE_ROUTES})
        return Demand(totals, self.load.rates())

    def report(self) -> dict[str, Any]:
        """For the control plane's /status: what the cache and the batcher hold and learned."""
        return {"cache": self.cache.report(), "batch": self.batcher.report()}

    async def refresh(self) -> None:
        """Nothing to ask: this data plane is in the control plane's process."""

    def workers_report(self) -> dict[str, Any]:
        return {"setting": self.cfg.workers, "count": 1, "running": 1, "restarts": 0, "pids": []}

    # -- what a snapshot means here -------------------------------------------------------------------------

    def _apply(self, previous: Snapshot, current: Snapshot) -> None:
        # A data plane's first snapshot (a worker that just started among others) adopts what the pod flushed
        # before it: nothing it holds is older, and the pod's shared tier must not be flushed for it.
        first = previous.seq == 0
        if current.restarts != previous.restarts and not first:
            # Every model reloaded with the server: earlier configurations and fingerprints go (answers below).
            self.catalog.forget()
            self.batcher.forget()
            self.fingerprints.forget()
            self.cache.recheck_sharing()
        for model in self.cache.generations.follow(current.restarts, current.flush_all, current.flushes):
            if not first:
                self.cache.memory.flush(None if model == "*" else model)
        if current.loaded is not None and current.loaded != previous.loaded:
            # A model whose loaded versions changed gets a new cache generation: no answer of a gone version.
            for model in self.cache.generations.observe(current.loaded):
                if not first:
                    self.cache.memory.flush(model)
                self.catalog.forget(model)
                self.batcher.forget(model)
        if self.pod_shared:
            self.metrics.known_models.update(current.known_models)  # the models other workers' calls found
        if self.shared_cache is not None:
            self.shared_cache.epochs = dict(current.fleet_epochs)
            self.shared_cache.fleet_epoch = current.fleet_epoch
        self.rules.http_learned, self.rules.grpc_learned = current.learned
        if current.latencies is not previous.latencies:
            for model, sizes in current.latencies.items():
                for batch, seconds in sizes.items():
                    self.latency.seed(model, batch, seconds)
        # A stopping model server answers "ready" on open connections for its whole exit timeout, and waits for
        # them: while it does not look ready, no connection is kept idle.
        not_ready = current.state in _NOT_READY
        self.upstream.pool.keep_alive = not not_ready
        if not_ready:
            self.upstream.pool.drop_idle()

    async def _restrictions_known(self) -> bool:
        """Answers are shared once the sidecar knows whom the model server would refuse: its own restriction of
        inference is the server's (restricted_api), or the server was asked; TF Serving restricts nothing. A
        call may wait a moment for the question being asked (at start, and after a restart)."""
        if restrict.inference_key(self.http.restrictions) is not None:
            return True
        return await self.view.until(lambda s: s.restrictions_known or s.protocol == "tfserving", _PROBE_WAIT)

    # -- fingerprints -----------------------------------------------------------------------------------------

    async def _ask_for_fingerprint(self, request: InferenceRequest, key: forwarded.Context) -> InferenceResponse | None:
        """The model server's own answer to a fingerprint probe (never the cache's, never batched)."""
        deadline = asyncio.get_running_loop().time() + self.cfg.upstream.timeout
        call = Call(request, "fingerprint", deadline, None, origin="fingerprint")
        call.context = key
        reply = await self.router.send(call)
        return reply.response() if reply.ok else None

    def _model_answers_otherwise(self, model: str) -> None:
        """A model reloaded in place answers otherwise: its in-process answers go (its shared key moved). With
        workers sharing one tier, the control plane flushes the model for all of them (their keys stay alike)."""
        if self.pod_shared:
            self.cache.memory.flush(model)
            self.observations.answers_changed(model)
        else:
            self.cache.generations.bump(model)
            self.cache.memory.flush(model)

    async def _verify_fingerprints(self) -> None:
        """Background task: learn what the models the fleet shares answer here, and ask every fingerprinted
        model again every cache.verify_interval seconds."""
        interval = self.cfg.cache.verify_interval
        while True:
            await asyncio.sleep(min(interval, _ADOPT_EVERY) if interval > 0 else _ADOPT_EVERY)
            if self.view.snapshot.state in (State.WARMING, State.WARM):
                await self.fingerprints.adopt()
                if interval > 0:
                    await self.fingerprints.verify(interval)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on both data ports; ConfigError when a port cannot be had."""
        try:
            host, port = split_host_port(self.cfg.listen)
            await self.data_port.listen(host, port, reuse_port=self.pod_shared)
        except OSError as e:
            raise ConfigError(f"listen {self.cfg.listen}: cannot listen ({e.strerror or e})") from None
        if self.grpc is not None:
            await self.grpc.start()
        self.decoder.start()
        if self.cfg.cache.models and (self.cfg.cache.verify_interval > 0 or self.shared_cache is not None):
            self.supervisor.spawn("cache-fingerprints", self._verify_fingerprints)
        if self.shared_cache is not None:
            self.supervisor.spawn("cache-writer", self.shared_cache.run_writer)
        if isinstance(self.memory, PodTier) and self.cfg.cache.models:
            self.supervisor.spawn("cache-recency", self.memory.run)

    def draining(self) -> None:
        """Readiness has failed: answers now say Connection: close, so clients move elsewhere."""
        self.data_port.draining = True

    async def stop(self, grace: float) -> None:
        """Stop accepting; let calls in flight finish for up to ``grace`` seconds on both ports."""
        self.data_port.stop_listening()
        grpc_drained = asyncio.ensure_future(self.grpc.stop(grace)) if self.grpc else None
        if not await self.data_port.drain(grace):
            log.warning("shutdown grace of %.1f s over with calls still in flight; closing them", grace)
        await self.data_port.close()
        if grpc_drained is not None:
            await grpc_drained

    async def close(self) -> None:
        """Release every resource; safe after a start that failed half-way."""
        await self.data_port.close()
        if self.grpc is not None:
            await self.grpc.stop(0)
        await self.upstream.close()
        await self.grpc_upstream.close()
        if self.shared_cache is not None:
            await self.shared_cache.close()
        await self.decoder.close()


def connection_limit(cfg: Config) -> int:
    """``limits.max_connections``, or what the file-descriptor limit leaves after the reserve."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        # Servers raise their own soft limit to the hard one; the kernel allows it without privilege.
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    room = max(16, soft - _FD_RESERVE - cfg.upstream.pool_size)
    return min(cfg.limits.max_connections, room) if cfg.limits.max_connections else room

"""The composition root: the one place where the sidecar's parts are built and wired.

Reading ``Sidecar.__init__`` shows the whole pipeline, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
from pathlib import Path

from aiohttp import web

from .cache.fingerprint import Fingerprints
from .cache.generation import Generations
from .cache.memory import MemoryTier
from .cache.redis import Breaker, RedisTier
from .config import Config, split_host_port
from .errors import ConfigError
from .front import restrict
from .front.admin import AdminActions, AdminFront
from .front.budget import MemoryBudget
from .front.decoding import RequestDecoder
from .front.grpc import GrpcFront
from .front.h1server import H1Server
from .front.http import HttpFront
from .health import UpstreamMonitor
from .loading.book import BookCollector, ModelBook
from .loading.ondemand import OnDemandLoader
from .mesh.agent import AgentServer
from .mesh.orca import warm_capacity
from .metrics import Metrics
from .pipeline.batcher import Batcher
from .pipeline.cache import CacheCollector, CacheStage
from .pipeline.gate import Gate
from .pipeline.latency import LatencyModel
from .pipeline.recorder import Recorder
from .pipeline.stage import Call, Stage, chain
from .protocols import forwarded
from .protocols.request import InferenceRequest, InferenceResponse
from .state import State, StateMachine
from .supervise import Supervisor
from .upstream.grpc import GrpcUpstream
from .upstream.http import HttpUpstream
from .upstream.models import ModelCatalog
from .upstream.restrictions import RestrictionProbe
from .upstream.router import UpstreamRouter
from .warmup import planner
from .warmup.store import REDIS_SCHEMES, StoreLimits, open_store
from .warmup.warmer import Warmer

log = logging.getLogger("sidecar")

# File descriptors kept back from the data port's connection limit: admin port, the model server pool, files.
_FD_RESERVE = 128
# Seconds a call waits for the model server to say what it restricts before it goes by the cache.
_PROBE_WAIT = 1.0
# Seconds between looks for models the fleet shares whose answers this replica has not fingerprinted.
_ADOPT_EVERY = 2.0


def store_limits(cfg: Config) -> StoreLimits:
    r = cfg.record
    return StoreLimits(
        capacity=max(4 * r.top_n, 64), max_payload_bytes=r.max_payload_bytes, max_total_bytes=r.max_total_bytes,
        payload_ttl=r.payload_ttl, half_life=r.half_life,
    )


class Sidecar:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.machine = StateMachine()
        # Each model's own load and warm state, beside the pod's.
        self.book = ModelBook(lambda: self.machine.state in (State.WARMING, State.WARM))
        self.metrics.watch_state([s.value for s in State], lambda: self.machine.state.value,
                                 lambda: self.machine.progress)
        self.supervisor = Supervisor(self.metrics)
        inference_key = restrict.inference_key(restrict.parse(cfg.restricted_api))
        self.upstream = HttpUpstream(cfg.upstream, self.metrics, cfg.limits.max_answer_bytes,
                                     [inference_key] if inference_key else [])
        limits = store_limits(cfg)
        self.store = open_store(cfg.store, limits)
        self.recorder = Recorder(cfg.record, self.store, self.metrics, limits.capacity,
                                 secret_headers=planner.secret_headers(cfg))
        self.catalog = ModelCatalog(self.upstream, cfg.warmup.max_batch)
        self.latency = LatencyModel()
        self.batcher = Batcher(cfg.batch, self.catalog, self.latency, self.metrics,
                               on_batch=self.recorder.observe_batch if cfg.record.enabled else None)
        self.shared_cache = shared_tier(cfg)
        # What the model server reads outside a call's body: forwarded headers, a restriction key (both ports).
        self.rules = forwarded.Rules(forwarded.compile_pattern(cfg.upstream.http_header_forward_pattern),
                                     forwarded.compile_pattern(cfg.upstream.grpc_header_forward_pattern))
        # What each model answers (a digest of its answer to the fleet's probe request): part of the shared
        # tier's key, so replicas share only answers of models that answer alike.
        self.fingerprints = Fingerprints(self.shared_cache, self._ask_for_fingerprint, self._model_answers_otherwise)
        self.cache = CacheStage(cfg.cache, MemoryTier(cfg.cache.max_bytes), self.shared_cache, Generations(),
                                self.metrics, sharing=self._restrictions_known, fingerprints=self.fingerprints)
        self.metrics.registry.register(CacheCollector(self.cache))
        self.metrics.registry.register(BookCollector(self.book))
        # The data path, in order. The upstream client is the terminal.
        self.stages: list[Stage] = [Gate(cfg.gate, self.machine, self.metrics, self.book)]
        if cfg.record.enabled:
            self.stages.append(self.recorder)
        if cfg.cache.models:
            self.stages.append(self.cache)
        if cfg.batch.models:
            self.stages.append(self.batcher)
        # The terminal routes: gRPC callers' own requests over gRPC, everything else over HTTP.
        self.grpc_upstream = GrpcUpstream(cfg.upstream, self.metrics, cfg.limits.max_body_bytes,
                                          cfg.limits.max_answer_bytes, lambda: self.monitor.protocol)
        self.router = UpstreamRouter(self.upstream, self.grpc_upstream)
        self.restriction_probe = RestrictionProbe(self.rules, self.upstream,
                                                  self.grpc_upstream if cfg.grpc_listen else None)
        self._probing: asyncio.Task[None] | None = None
        self.machine.subscribe(self._state_changed)
        self.pipeline = chain(self.stages, self.router.send)
        # Warm-up replay enters at the cache, so its answers fill it (and never comes from it); its
        # latencies per batch size teach the batcher's latency model.
        self.warmer = Warmer(cfg, self.store, self.upstream, self.machine, self.metrics,
                             send=chain([self.cache], self.upstream.send) if cfg.cache.models else None,
                             catalog=self.catalog, latency=self.latency, book=self.book)
        self.monitor = UpstreamMonitor(self.upstream, cfg.upstream, self.machine, self.metrics, self.warmer,
                                       cfg.warmup.retry_interval)
        self.monitor.subscribe(self._models_loaded, self._server_restarted)
        self.warmer.loaded = lambda: self.monitor.loaded
        self.warmer.repository.grpc = self.grpc_upstream
        self.monitor.own_loading = lambda: self.warmer.loading > 0
        self.monitor.own_models = lambda: {n for n, e in self.book.models.items() if e.loaded_by_sidecar}
        self.loader = OnDemandLoader(cfg.models, self.warmer, self.book, self.monitor)
        self.decoder = RequestDecoder(cfg.limits.inline_decode_bytes, cfg.limits.decode_workers,
                                      cfg.limits.max_body_bytes)
        self.http = HttpFront(cfg, self.upstream, self.pipeline, self.metrics, self.machine, self.decoder,
                              MemoryBudget(cfg.limits.max_inflight_bytes), on_upstream_down=self.monitor.poke,
                              on_model_reload=self.flush_cache, rules=self.rules,
                              on_rules_changed=self._rules_changed)
        self.http.book = self.book
        self.data_port: H1Server = self.http.server(connection_limit(cfg))
        # The gRPC data port: the same pipeline, state machine and per-model load as the HTTP one.
        self.grpc = GrpcFront(cfg, self.pipeline, self.grpc_upstream, self.machine, self.metrics, self.catalog,
                              self.monitor, self.http.mesh.load, on_upstream_down=self.monitor.poke,
                              on_model_reload=self.flush_cache, book=self.book, rules=self.rules,
                              on_rules_changed=self._rules_changed) if cfg.grpc_listen else None
        self.metrics.in_flight.set_function(lambda: self.http.in_flight + (self.grpc.in_flight if self.grpc else 0))
        load = self.http.mesh.load
        self.metrics.watch_load(lambda: load.in_flight, load.rates,
                                lambda: warm_capacity(self.machine.state, self.machine.progress))
        actions = AdminActions(self.flush_cache, self.monitor.rewarm, lambda: admin_token(cfg), self.cache.report,
                               self.batcher.report, self.book.report)
        self.admin = AdminFront(self.machine, self.metrics, self.monitor, self.warmer, self.supervisor,
                                degraded_while_warming=cfg.mesh.degraded_while_warming, actions=actions)
        # HAProxy's agent-check port: the pod's weight and state in HAProxy's words (off by default).
        self.agent = AgentServer(cfg.mesh.agent_listen, self.machine) if cfg.mesh.agent_listen else None
        self._admin_runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"<Sidecar {self.machine.state} listen={self.cfg.listen} upstream={self.upstream.base}>"

    def _models_loaded(self, loaded: frozenset[tuple[str, str]]) -> None:
        """A model whose loaded versions changed gets a new cache generation: no answer of a gone version."""
        for model in self.cache.generations.observe(loaded):
            self.cache.memory.flush(model)
            self.catalog.forget(model)
            self.batcher.forget(model)

    def _server_restarted(self) -> None:
        """Every model reloads with the server: earlier in-process answers become unreachable, and their
        configurations (and what the server restricts) are asked again."""
        self.cache.flush()
        self.catalog.forget()
        self.batcher.forget()
        self.book.forget_all()
        self.restriction_probe.forget()
        self.fingerprints.forget()
        self.cache.recheck_sharing()
        self._state_changed(self.machine.state)

    async def _restrictions_known(self) -> bool:
        """Answers are shared once the sidecar knows whom the model server would refuse: its own restriction of
        inference is the server's (restricted_api), or the server was asked; TF Serving restricts nothing. A
        call may wait a moment for the question being asked (at start, and after a restart)."""
        if self.monitor.protocol == "tfserving" or restrict.inference_key(self.http.restrictions) is not None:
            return True
        probing = self._probing
        if not self.restriction_probe.known and probing is not None and not probing.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(probing), _PROBE_WAIT)
        return self.restriction_probe.known

    def _state_changed(self, state: State) -> None:
        """The model server answers: ask it what it restricts, once per time it comes up."""
        if state not in (State.LOADING, State.WARMING, State.WARM) or self.restriction_probe.known:
            return
        if self.monitor.protocol not in ("", "triton") or (self._probing and not self._probing.done()):
            return
        self._probing = asyncio.get_running_loop().create_task(self._probe_restrictions())

    async def _probe_restrictions(self) -> None:
        try:
            if await self.restriction_probe.run():
                self._rules_changed()
        except Exception as e:  # asked again when the server next comes up; until then nothing is shared
            log.warning("could not ask the model server what it restricts (%s)", type(e).__name__)

    async def _ask_for_fingerprint(self, request: InferenceRequest, key: forwarded.Context) -> InferenceResponse | None:
        """The model server's own answer to a fingerprint probe (never the cache's, never batched)."""
        deadline = asyncio.get_running_loop().time() + self.cfg.upstream.timeout
        call = Call(request, "fingerprint", deadline, None, origin="fingerprint")
        call.context = key
        reply = await self.router.send(call)
        return reply.response() if reply.ok else None

    def _model_answers_otherwise(self, model: str) -> None:
        """A model reloaded in place answers otherwise: its in-process answers go (its shared key moved)."""
        self.cache.generations.bump(model)
        self.cache.memory.flush(model)

    async def _verify_fingerprints(self) -> None:
        """Background task: learn what the models the fleet shares answer here, and ask every fingerprinted
        model again every cache.verify_interval seconds."""
        interval = self.cfg.cache.verify_interval
        while True:
            await asyncio.sleep(min(interval, _ADOPT_EVERY) if interval > 0 else _ADOPT_EVERY)
            if self.machine.state in (State.WARMING, State.WARM):
                await self.fingerprints.adopt()
                if interval > 0:
                    await self.fingerprints.verify(interval)

    def _rules_changed(self) -> None:
        """A restriction key learned (or gone): answers cached without it must never be served again."""
        self.cache.flush()

    async def flush_cache(self, model: str | None) -> int:
        """Admin action: forget cached answers (of one model), here and, through the epoch, fleet-wide."""
        gone = self.cache.flush(model)
        if self.shared_cache is not None:
            await self.shared_cache.bump_epoch(model or None)
        return gone

    async def _refresh_epochs(self) -> None:
        """Background task: read the fleet's cache epochs, so a flush elsewhere reaches this replica."""
        assert self.shared_cache is not None
        while True:
            await self.shared_cache.refresh_epochs(self.cache.generations.versions.keys() | self.cache.stats.models)
            await asyncio.sleep(self.cfg.upstream.health_interval)

    async def start(self) -> None:
        """Listen on both ports and start the background tasks; ConfigError when a port cannot be had."""
        runner = web.AppRunner(self.admin.application(), handle_signals=False, access_log=None)
        await runner.setup()
        self._admin_runner = runner
        try:
            host, port = split_host_port(self.cfg.admin)
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as e:
            raise ConfigError(f"admin {self.cfg.admin}: cannot listen ({e.strerror or e})") from None
        try:
            host, port = split_host_port(self.cfg.listen)
            await self.data_port.listen(host, port)
        except OSError as e:
            raise ConfigError(f"listen {self.cfg.listen}: cannot listen ({e.strerror or e})") from None
        if self.grpc is not None:
            await self.grpc.start()
        if self.agent is not None:
            await self.agent.start()
        self.decoder.start()
        self.supervisor.spawn("upstream-monitor", self.monitor.run)
        if self.cfg.record.enabled:
            self.supervisor.spawn("recorder", self.recorder.run)
        self.supervisor.spawn("model-loader", self.loader.run)
        if self.cfg.cache.models and (self.cfg.cache.verify_interval > 0 or self.shared_cache is not None):
            self.supervisor.spawn("cache-fingerprints", self._verify_fingerprints)
        if self.shared_cache is not None:
            self.supervisor.spawn("cache-writer", self.shared_cache.run_writer)
            self.supervisor.spawn("cache-epochs", self._refresh_epochs)
        log.info("listening: data %s, admin %s; upstream %s", self.cfg.listen, self.cfg.admin, self.upstream.base)

    async def stop(self, delay: float = 0.0) -> None:
        """Refuse readiness at once, keep serving for ``delay`` seconds (load balancers stop sending),
        then stop accepting, let in-flight calls finish for up to ``shutdown_grace``, and close."""
        self.machine.to(State.DRAINING, "shutting down")
        self.data_port.draining = True  # answers now say Connection: close, so clients move elsewhere
        if delay > 0:
            await asyncio.sleep(delay)
        self.data_port.stop_listening()
        # The gRPC port stops accepting and drains alongside, within the same grace.
        grpc_drained = asyncio.ensure_future(self.grpc.stop(self.cfg.shutdown_grace)) if self.grpc else None
        if not await self.data_port.drain(self.cfg.shutdown_grace):
            log.warning("shutdown grace of %.1f s over with calls still in flight; closing them",
                        self.cfg.shutdown_grace)
        await self.data_port.close()
        if grpc_drained is not None:
            await grpc_drained
        await self.supervisor.stop()
        await self.monitor.stop()
        try:
            if self.cfg.record.enabled:
                await self.recorder.close()  # what was seen is written before the store closes
        finally:
            await self.close()
        log.info("stopped")

    async def close(self) -> None:
        """Release every resource; safe after a start that failed half-way."""
        await self.data_port.close()
        if self.agent is not None:
            await self.agent.stop()  # only now: it says "drain" for as long as the data port is open
        await self.store.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        if self.grpc is not None:
            await self.grpc.stop(0)
        await self.upstream.close()
        await self.grpc_upstream.close()
        if self.shared_cache is not None:
            await self.shared_cache.close()
        await self.decoder.close()


def admin_token(cfg: Config) -> str:
    """The admin bearer token, read at each use so a rotated Secret takes effect; "" when none."""
    if cfg.admin_token_file:
        try:
            return Path(cfg.admin_token_file).read_text().strip()
        except OSError:
            log.warning("admin token file %s unreadable: admin actions refused", cfg.admin_token_file)
            return ""
    return cfg.admin_token


def shared_tier(cfg: Config) -> RedisTier | None:
    """The cache's Redis tier: cache.redis, else the traffic store's Redis, unless 'off' or caching is off."""
    url = cfg.cache.redis or (cfg.store if cfg.store.lower().startswith(REDIS_SCHEMES) else "")
    if not cfg.cache.models or not url or url == "off":
        return None
    breaker = Breaker(cfg.cache.redis_failures, cfg.cache.redis_cooldown)
    try:
        return RedisTier(url, f"warm-sidecar:{cfg.cache.namespace or 'default'}", cfg.cache.redis_timeout, breaker)
    except ValueError as e:
        raise ConfigError(f"config key cache.redis: unusable Redis URL ({e})") from None


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


async def serve(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT, then drain. Returns the process exit status."""
    sidecar = Sidecar(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sidecar.start()
    except ConfigError:
        await sidecar.close()
        raise
    await stop.wait()
    log.info("signal received: not ready now, draining in %.1f s (grace %.1f s, %d in flight)",
             cfg.shutdown_delay, cfg.shutdown_grace, sidecar.http.in_flight)
    await sidecar.stop(cfg.shutdown_delay)
    return 0

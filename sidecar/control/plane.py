"""The control plane: what the pod knows, and the ports that say it.

The state machine and the monitor that drives it, the model book, warm-up and layered loading, the
traffic memory (the recorder's aggregation and its store), what the model server restricts, cache
flushes and the fleet's cache epochs, the admin port and HAProxy's agent port. Built here with
everything it needs; reading ``ControlPlane.__init__`` shows every part.

It publishes one :class:`~sidecar.planes.Snapshot` at each change of what a data plane must know, and
receives what data planes observe (it is their :class:`~sidecar.planes.Observations`, through the
:class:`~sidecar.planes.Link`). It never imports the data plane: what it asks of it (warm-up's replays
through its cache, its report for ``/status``, the demand it served) goes through
:class:`~sidecar.planes.DataSide`, which the composition root hands it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from ..cache.redis import fleet_tier
from ..calls import Call
from ..config import Config, split_host_port
from ..errors import ConfigError
from ..latency import LatencyModel
from ..loading.book import BookCollector, ModelBook
from ..mesh.agent import AgentServer
from ..metrics import Metrics
from ..planes import DataSide, Link, Snapshot
from ..protocols import forwarded
from ..redis.client import RedisClients
from ..state import State, StateMachine
from ..supervise import Supervisor
from ..upstream.grpc import GrpcUpstream
from ..upstream.http import HttpUpstream
from ..upstream.models import ModelCatalog
from ..upstream.restrictions import RestrictionProbe
from ..warmup.planner import secret_headers
from ..warmup.recording import TrafficRecorder
from ..warmup.store import StoreLimits, open_store
from .admin import AdminActions, AdminFront
from .demand import DemandForecast
from .fill import Filler
from .monitor import UpstreamMonitor
from .ondemand import OnDemandLoader
from .warmer import Warmer, own_headers

log = logging.getLogger("sidecar")


def store_limits(cfg: Config) -> StoreLimits:
    r = cfg.record
    return StoreLimits(
        capacity=max(2 * r.top_n, 64), max_payload_bytes=r.max_payload_bytes, max_total_bytes=r.max_total_bytes,
        payload_ttl=r.payload_ttl, half_life=r.half_life,
    )


class ControlPlane:
    def __init__(self, cfg: Config, metrics: Metrics, link: Link, redis: RedisClients, supervisor: Supervisor,
                 data: DataSide) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.link = link
        self.supervisor = supervisor
        self.data = data
        self._background: set[asyncio.Task[object]] = set()
        self.machine = StateMachine()
        # Each model's own load and warm state, beside the pod's.
        self.book = ModelBook(lambda: self.machine.state in (State.WARMING, State.WARM))
        metrics.watch_state([s.value for s in State], lambda: self.machine.state.value, lambda: self.machine.progress)
        metrics.registry.register(BookCollector(self.book))
        # The control plane's own connections to the model server: probes, loads, questions.
        self.upstream = HttpUpstream(cfg.upstream, metrics, cfg.limits.max_answer_bytes)
        self.grpc_upstream = GrpcUpstream(cfg.upstream, metrics, cfg.limits.max_body_bytes,
                                          cfg.limits.max_answer_bytes, lambda: self.monitor.protocol)
        # The traffic memory: what data planes saw, aggregated and written to the store.
        limits = store_limits(cfg)
        self.store = open_store(cfg.store, limits, redis=redis)
        self.recording = TrafficRecorder(cfg.record, self.store, metrics, limits.capacity,
                                         secret_headers=secret_headers(cfg))
        self.seen = self.recording.offer  # type: ignore[method-assign]  # on every call: no hop of its own
        # Warm-up: it replays through the data plane's cache; its latencies reach the batcher by snapshot. What
        # it did not need to measure fills the cache once the pod is ready.
        self.filler = Filler(data.fill, self.machine, cfg.warmup.fill_concurrency, own_headers(cfg.restricted_api),
                             cfg.upstream.timeout)
        self.latency = LatencyModel()
        self.warmer = Warmer(cfg, self.store, self.upstream, self.machine, metrics, send=data.replay,
                             catalog=ModelCatalog(self.upstream, cfg.warmup.max_batch), latency=self.latency,
                             book=self.book, loaded=lambda: self.monitor.loaded,
                             grpc=self.grpc_upstream if cfg.grpc_listen else None, fill=self.filler.add)
        self.monitor = UpstreamMonitor(self.upstream, cfg.upstream, self.machine, metrics, self.warmer,
                                       cfg.warmup.retry_interval, own_loading=lambda: self.warmer.loading > 0,
                                       own_models=self._own_models)
        self.loader = OnDemandLoader(cfg.models, self.warmer, self.book, self.monitor)
        # What the model server restricts and turns into model parameters.
        self.rules = forwarded.Rules()
        self.restrictions = RestrictionProbe(self.rules, self.upstream,
                                             self.grpc_upstream if cfg.grpc_listen else None)
        self._probing: asyncio.Task[None] | None = None
        self._loaded: frozenset[tuple[str, str]] | None = None
        # Demand: its per-minute history, the forecast at now + launch-to-warm, what this pod can serve.
        self.demand = (DemandForecast(cfg, metrics, redis, data.demand, data.report)
                       if cfg.forecast.history > 0 else None)
        # Cache flushes, here and fleet-wide (the Redis tier's epochs).
        self.flushes: dict[str, int] = {}
        self.flush_all = 0
        self.restarts = 0
        self.epochs = fleet_tier(cfg, redis)  # its epochs: a flush here reaches every replica
        self.admin = AdminFront(self.machine, metrics, self.monitor, self.warmer, supervisor,
                                degraded_while_warming=cfg.mesh.degraded_while_warming,
                                actions=AdminActions(self.flush_cache, self.monitor.rewarm, lambda: admin_token(cfg),
                                                     lambda: data.report().get("cache", {}),
                                                     lambda: data.report().get("batch", {}), self.book.report,
                                                     lambda: self.demand.status() if self.demand else None,
                                                     self.filler.report, data.workers_report, data.refresh))
        # HAProxy's agent-check port: the pod's weight and state in HAProxy's words (off by default).
        self.agent = AgentServer(cfg.mesh.agent_listen, self.machine) if cfg.mesh.agent_listen else None
        self._admin_runner: web.AppRunner | None = None
        self.machine.subscribe(self._state_changed)
        self.machine.subscribe_progress(self._progressed)
        self.book.subscribe(self.publish)
        self.monitor.subscribe(self._loaded_changed, self._server_restarted)
        link.attach(self)
        self.publish()

    def __repr__(self) -> str:
        return f"<ControlPlane {self.machine.state} upstream={self.upstream.base}>"

    def _own_models(self) -> set[str]:
        return {n for n, e in self.book.models.items() if e.loaded_by_sidecar}

    # -- what data planes are told --------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        m = self.machine
        return Snapshot(
            state=m.state, progress=m.progress, reason=m.reason, protocol=self.monitor.protocol,
            models={name: ready for name in self.book.models if (ready := self.book.ready(name)) is not None},
            known_models=frozenset(self.metrics.known_models), loaded=self.monitor.loaded, restarts=self.restarts,
            flushes=dict(self.flushes), flush_all=self.flush_all,
            fleet_epochs=dict(self.epochs.epochs) if self.epochs is not None else {},
            fleet_epoch=self.epochs.fleet_epoch if self.epochs is not None else 0,
            learned=(self.rules.http_learned, self.rules.grpc_learned), restrictions_known=self.restrictions.known,
            latencies=self.latency.table(),
        )

    def publish(self) -> None:
        self.link.publish(self.snapshot())

    def _progressed(self, progress: float) -> None:
        # Each replayed call moves it a little: a percent is all a load report or agent answer shows.
        if round(progress * 100) != round(self.link.view.snapshot.progress * 100):
            self.publish()

    def _state_changed(self, state: State) -> None:
        self.publish()
        if state is State.WARM and self.demand is not None:
            self.demand.warm()
        # The model server answers: ask it what it restricts, once per time it comes up.
        if state not in (State.LOADING, State.WARMING, State.WARM) or self.restrictions.known:
            return
        if self.monitor.protocol not in ("", "triton") or (self._probing and not self._probing.done()):
            return
        self._probing = asyncio.get_running_loop().create_task(self._probe_restrictions())

    async def _probe_restrictions(self) -> None:
        try:
            if await self.restrictions.run():
                self.flush_all += 1  # answers cached without the key must never be served again
        except Exception as e:  # asked again when the server next comes up; until then nothing is shared
            log.warning("could not ask the model server what it restricts (%s)", type(e).__name__)
        self.publish()

    def _loaded_changed(self, loaded: frozenset[tuple[str, str]]) -> None:
        if loaded != self._loaded:
            self._loaded = loaded
            self.warmer.catalog.forget()  # configurations are asked again: a reload may change them
            self.publish()

    def _server_restarted(self) -> None:
        """Every model reloads with the server: the book, what it restricts and every cached answer go."""
        self.book.forget_all()
        self.restrictions.forget()
        self.warmer.catalog.forget()
        self.restarts += 1
        self._state_changed(self.machine.state)

    async def flush_cache(self, model: str | None) -> int:
        """Admin action (and a model loaded through the data port): forget cached answers (of one model),
        in every data plane and, through the epoch, fleet-wide. Answers how many the data planes held."""
        cache = self.data.report().get("cache", {})
        held = cache.get("entries", 0) if model is None else cache.get("models", {}).get(model, {}).get("entries", 0)
        if model is None:
            self.flush_all += 1
        else:
            self.flushes[model] = self.flushes.get(model, 0) + 1
        if self.epochs is not None:
            await self.epochs.bump_epoch(model or None)
        self.publish()
        return int(held)

    async def _refresh_epochs(self) -> None:
        """Background task: read the fleet's cache epochs, so a flush elsewhere reaches this replica."""
        assert self.epochs is not None
        while True:
            models = (self.monitor.loaded and {m for m, _ in self.monitor.loaded}) or set(self.book.models)
            before = (self.epochs.fleet_epoch, dict(self.epochs.epochs))
            await self.epochs.refresh_epochs(models | set(self.metrics.known_models))
            if (self.epochs.fleet_epoch, self.epochs.epochs) != before:
                self.publish()
            await asyncio.sleep(self.cfg.upstream.health_interval)

    # -- what data planes tell (Observations) -----------------------------------------------------------------

    def seen(self, call: Call, count: int = 1) -> None:
        self.recording.offer(call, count)

    def batched(self, model: str, shape: str, size: int) -> None:
        self.recording.observe_batch(model, shape, size)

    def touched(self, model: str) -> None:
        self.book.touch(model)

    def wanted(self, model: str) -> None:
        self.book.want(model)

    def upstream_failed(self) -> None:
        self.monitor.poke()

    def model_changed(self, model: str) -> None:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(self.flush_cache(model))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def answers_changed(self, model: str) -> None:
        self.flushes[model] = self.flushes.get(model, 0) + 1
        self.publish()

    def model_known(self, model: str) -> None:
        if model not in self.metrics.known_models:
            self.metrics.learn_model(model)
            self.publish()  # every worker labels the model's calls by its name from now on

    def restriction_named(self, http_header: bytes, grpc_key: bytes) -> None:
        changed = False
        if http_header and http_header != self.rules.http_learned:
            self.rules.http_learned, changed = http_header, True
        if grpc_key and grpc_key != self.rules.grpc_learned:
            self.rules.grpc_learned, changed = grpc_key, True
        if changed:
            self.flush_all += 1  # answers cached without the key must never be served again
            self.publish()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def listen(self) -> None:
        """The admin (and agent) port; ConfigError when a port cannot be had."""
        runner = web.AppRunner(self.admin.application(), handle_signals=False, access_log=None)
        await runner.setup()
        self._admin_runner = runner
        try:
            host, port = split_host_port(self.cfg.admin)
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as e:
            raise ConfigError(f"admin {self.cfg.admin}: cannot listen ({e.strerror or e})") from None
        if self.agent is not None:
            await self.agent.start()

    def run(self) -> None:
        """The background tasks: probes, recording, loading, epochs, the forecast."""
        self.supervisor.spawn("upstream-monitor", self.monitor.run)
        if self.cfg.record.enabled:
            self.supervisor.spawn("recorder", self.recording.run)
        self.supervisor.spawn("model-loader", self.loader.run)
        if self.cfg.cache.models:
            self.supervisor.spawn("cache-fill", self.filler.run)
        if self.epochs is not None:
            self.supervisor.spawn("cache-epochs", self._refresh_epochs)
        if self.demand is not None:
            self.demand.start(self.supervisor)

    def draining(self) -> None:
        self.machine.to(State.DRAINING, "shutting down")

    async def stop(self) -> None:
        """After the data planes drained: the monitor stops and what was recorded is written (``close`` then
        closes the store and the ports)."""
        await self.monitor.stop()
        if self.cfg.record.enabled:
            await self.recording.close()  # what was seen is written before the store closes

    async def close(self) -> None:
        """Release every resource; safe after a start that failed half-way."""
        if self.agent is not None:
            await self.agent.stop()  # only now: it says "drain" for as long as the data port is open
        await self.store.close()
        if self.demand is not None:
            await self.demand.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self.upstream.close()
        await self.grpc_upstream.close()


def admin_token(cfg: Config) -> str:
    """The admin bearer token, read at each use so a rotated Secret takes effect; "" when none."""
    if cfg.admin_token_file:
        try:
            return Path(cfg.admin_token_file).read_text().strip()
        except OSError:
            log.warning("admin token file %s unreadable: admin actions refused", cfg.admin_token_file)
            return ""
    return cfg.admin_token

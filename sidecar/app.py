"""The composition root: the one place where the sidecar's parts are built and wired.

Reading ``Sidecar.__init__`` shows the whole pipeline, in order.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal

from aiohttp import web

from .config import Config, split_host_port
from .errors import ConfigError
from .front.admin import AdminFront
from .front.budget import MemoryBudget
from .front.decoding import RequestDecoder
from .front.h1server import H1Server
from .front.http import HttpFront
from .health import UpstreamMonitor
from .metrics import Metrics
from .pipeline.gate import Gate
from .pipeline.recorder import Recorder
from .pipeline.stage import Stage, chain
from .state import State, StateMachine
from .supervise import Supervisor
from .upstream.http import HttpUpstream
from .warmup.store import StoreLimits, open_store
from .warmup.warmer import Warmer

log = logging.getLogger("sidecar")

# File descriptors kept back from the data port's connection limit: admin port, the model server pool, files.
_FD_RESERVE = 128


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
        self.metrics.watch_state([s.value for s in State], lambda: self.machine.state.value,
                                 lambda: self.machine.progress)
        self.supervisor = Supervisor(self.metrics)
        self.upstream = HttpUpstream(cfg.upstream, self.metrics, cfg.limits.max_answer_bytes)
        limits = store_limits(cfg)
        self.store = open_store(cfg.store, limits)
        self.recorder = Recorder(cfg.record, self.store, self.metrics, limits.capacity)
        self.warmer = Warmer(cfg, self.store, self.upstream, self.machine, self.metrics)
        self.monitor = UpstreamMonitor(self.upstream, cfg.upstream, self.machine, self.metrics, self.warmer,
                                       cfg.warmup.retry_interval)
        # The data path, in order. The upstream client is the terminal.
        self.stages: list[Stage] = [Gate(cfg.gate, self.machine, self.metrics)]
        if cfg.record.enabled:
            self.stages.append(self.recorder)
        self.pipeline = chain(self.stages, self.upstream.send)
        self.decoder = RequestDecoder(cfg.limits.inline_decode_bytes, cfg.limits.decode_workers,
                                      cfg.limits.max_body_bytes)
        self.http = HttpFront(cfg, self.upstream, self.pipeline, self.metrics, self.machine, self.decoder,
                              MemoryBudget(cfg.limits.max_inflight_bytes), on_upstream_down=self.monitor.poke)
        self.data_port: H1Server = self.http.server(connection_limit(cfg))
        self.metrics.in_flight.set_function(lambda: self.http.in_flight)
        self.admin = AdminFront(self.machine, self.metrics, self.monitor, self.warmer, self.supervisor)
        self._admin_runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"<Sidecar {self.machine.state} listen={self.cfg.listen} upstream={self.upstream.base}>"

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
        self.decoder.start()
        self.supervisor.spawn("upstream-monitor", self.monitor.run)
        if self.cfg.record.enabled:
            self.supervisor.spawn("recorder", self.recorder.run)
        log.info("listening: data %s, admin %s; upstream %s", self.cfg.listen, self.cfg.admin, self.upstream.base)

    async def stop(self, delay: float = 0.0) -> None:
        """Refuse readiness at once, keep serving for ``delay`` seconds (load balancers stop sending),
        then stop accepting, let in-flight calls finish for up to ``shutdown_grace``, and close."""
        self.machine.to(State.DRAINING, "shutting down")
        if delay > 0:
            await asyncio.sleep(delay)
        self.data_port.stop_listening()
        if not await self.data_port.drain(self.cfg.shutdown_grace):
            log.warning("shutdown grace of %.1f s over with calls still in flight; closing them",
                        self.cfg.shutdown_grace)
        await self.data_port.close()
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
        await self.store.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self.upstream.close()
        self.decoder.close()


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

"""The composition root: the one place where the sidecar's parts are built and wired.

Reading ``Sidecar.__init__`` shows the whole pipeline, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from .config import Config, split_host_port
from .front.admin import AdminFront
from .front.http import HttpFront, InFlight
from .health import UpstreamMonitor
from .metrics import Metrics
from .pipeline.gate import Gate
from .pipeline.recorder import Recorder
from .pipeline.stage import Stage, chain
from .pipeline.upstream import UpstreamClient
from .state import State, StateMachine
from .warmup.store import StoreLimits, open_store
from .warmup.warmer import Warmer

log = logging.getLogger("sidecar")


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
        self.client = UpstreamClient(cfg.upstream, self.metrics)
        limits = store_limits(cfg)
        self.store = open_store(cfg.store, limits)
        self.recorder = Recorder(cfg.record, self.store, self.metrics, limits.capacity)
        self.warmer = Warmer(cfg, self.store, self.client, self.machine, self.metrics)
        self.monitor = UpstreamMonitor(self.client, cfg.upstream, self.machine, self.metrics, self.warmer)
        # The data path, in order. The upstream client is the terminal.
        self.stages: list[Stage] = [Gate(cfg.gate, self.machine, self.metrics)]
        if cfg.record.enabled:
            self.stages.append(self.recorder)
        self.pipeline = chain(self.stages, self.client.send)
        self.in_flight = InFlight(self.metrics)
        self.http = HttpFront(
            cfg, self.client, self.pipeline, self.metrics, self.in_flight, self.machine,
            on_upstream_down=self.monitor.poke
        )
        self.admin = AdminFront(self.machine, self.metrics, self.monitor, self.warmer)
        self._runners: list[web.BaseRunner] = []
        self._tasks: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        return f"<Sidecar {self.machine.state} listen={self.cfg.listen} upstream={self.client.base}>"

    async def start(self) -> None:
        await self.client.start()
        runners: list[tuple[web.BaseRunner, str]] = [
            (web.AppRunner(self.admin.application(), handle_signals=False, access_log=None), self.cfg.admin),
            (web.ServerRunner(self.http.server(), handle_signals=False, shutdown_timeout=self.cfg.shutdown_grace),
             self.cfg.listen),
        ]
        for runner, address in runners:
            await runner.setup()
            host, port = split_host_port(address)
            await web.TCPSite(runner, host, port, reuse_address=True, backlog=1024).start()
            self._runners.append(runner)
        self._tasks.append(asyncio.create_task(self.monitor.run(), name="upstream-monitor"))
        if self.cfg.record.enabled:
            self._tasks.append(asyncio.create_task(self.recorder.run(), name="recorder"))
        log.info("listening: data %s, admin %s; upstream %s", self.cfg.listen, self.cfg.admin, self.client.base)

    async def stop(self) -> None:
        """Drain: refuse readiness, stop accepting, let in-flight calls finish, close."""
        self.machine.to(State.DRAINING, "shutting down")
        admin, *data = self._runners
        for runner in data:
            # aiohttp stops listening, then waits up to shutdown_grace for handlers.
            await runner.cleanup()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.monitor.stop()
        if self.cfg.record.enabled:
            await self.recorder.close()
        await self.store.close()
        await admin.cleanup()
        await self.client.close()
        log.info("stopped")


async def serve(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT, then drain. Returns the process exit status."""
    sidecar = Sidecar(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    await stop.wait()
    log.info("signal received: draining (grace %.1f s, %d in flight)", cfg.shutdown_grace, sidecar.in_flight.count)
    await sidecar.stop()
    return 0

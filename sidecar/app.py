"""The composition root: the one place where the sidecar's two planes are built and joined.

The control plane (``control/plane.py``) knows what the pod knows and serves the admin port; the data
plane (``dataplane.py``) serves both data ports. They meet only through ``planes.Link``: snapshots down,
observations up. Reading ``Sidecar.__init__`` shows how they are joined; each plane's own constructor
shows its parts.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from . import cpus
from .config import Config
from .control.plane import ControlPlane
from .dataplane import DataPlane
from .errors import ConfigError
from .metrics import Metrics
from .planes import Link
from .redis.client import RedisClients
from .supervise import Supervisor
from .workers.pool import WorkerPool

log = logging.getLogger("sidecar")


class Sidecar:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.supervisor = Supervisor(self.metrics)
        # One client per Redis server, shared by the cache tier, the traffic store and the history.
        self.redis = RedisClients(cfg.cache.redis_failures, cfg.cache.redis_cooldown)
        self.link = Link()
        # One process, or data-plane workers (one per CPU the container may use) behind this control process.
        self.workers = cpus.workers(cfg.workers)
        self.data: DataPlane | WorkerPool = (
            DataPlane(cfg, self.metrics, self.link.view, self.link, self.redis, self.supervisor)
            if self.workers == 1 else WorkerPool(cfg, self.metrics, self.link.view, self.link, self.supervisor,
                                                 self.workers))
        if self.workers == 1:
            self.metrics.workers.set(1)
        self.control = ControlPlane(cfg, self.metrics, self.link, self.redis, self.supervisor, self.data)

    def __repr__(self) -> str:
        return f"<Sidecar {self.control!r} {self.data!r}>"

    async def start(self) -> None:
        """Every port first (the admin port answers probes from the start), then the control plane's tasks;
        ConfigError when a port cannot be had, before anything ran."""
        await self.control.listen()
        await self.data.start()
        self.control.run()
        log.info("listening: data %s (%d %s), admin %s; upstream %s", self.cfg.listen, self.workers,
                 "worker processes" if self.workers > 1 else "process", self.cfg.admin, self.cfg.upstream.url)

    async def stop(self, delay: float = 0.0) -> None:
        """Refuse readiness at once, keep serving for ``delay`` seconds (load balancers stop sending),
        then stop accepting, let in-flight calls finish for up to ``shutdown_grace``, and close."""
        self.control.draining()
        self.data.draining()
        if delay > 0:
            await asyncio.sleep(delay)
        await self.data.stop(self.cfg.shutdown_grace)
        await self.supervisor.stop()
        try:
            await self.control.stop()
        finally:
            await self.close()
        log.info("stopped")

    async def close(self) -> None:
        """Release every resource; safe after a start that failed half-way."""
        await self.data.close()
        await self.control.close()
        await self.redis.close()


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
             cfg.shutdown_delay, cfg.shutdown_grace, sidecar.data.in_flight)
    await sidecar.stop(cfg.shutdown_delay)
    return 0

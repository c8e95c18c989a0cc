"""The admin port: Kubernetes probes, Prometheus metrics, a status page.

Every answer about readiness is read from the one StateMachine.
"""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from ..health import UpstreamMonitor
from ..metrics import Metrics
from ..state import StateMachine


class AdminFront:
    def __init__(self, machine: StateMachine, metrics: Metrics, monitor: UpstreamMonitor) -> None:
        self.machine = machine
        self.metrics = metrics
        self.monitor = monitor

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/startupz", self.startupz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/status", self.status)
        return app

    def _probe(self, ok: bool) -> web.Response:
        body = {"status": "ok" if ok else "unavailable", "state": self.machine.state.value,
                "reason": self.machine.reason}
        return web.Response(status=200 if ok else 503, body=orjson.dumps(body), content_type="application/json")

    async def livez(self, request: web.Request) -> web.Response:
        return self._probe(self.machine.live)

    async def startupz(self, request: web.Request) -> web.Response:
        return self._probe(self.machine.started)

    async def readyz(self, request: web.Request) -> web.Response:
        return self._probe(self.machine.ready)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    async def status(self, request: web.Request) -> web.Response:
        m = self.machine
        body = {
            "state": m.state.value,
            "since_seconds": round(time.time() - m.since, 3),
            "reason": m.reason,
            "progress": m.progress,
            "upstream": {
                "url": self.monitor.client.base,
                "protocol": self.monitor.protocol or "detecting",
                "health": self.monitor.last.value,
            },
        }
        return web.Response(body=orjson.dumps(body, option=orjson.OPT_INDENT_2), content_type="application/json")

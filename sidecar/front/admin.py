"""The admin port: Kubernetes probes, Prometheus metrics, a status page.

Every answer about readiness is read from the one StateMachine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from ..health import UpstreamMonitor
from ..metrics import Metrics
from ..state import StateMachine
from ..supervise import Supervisor
from ..warmup.planner import Plan
from ..warmup.warmer import Warmer

_PLAN_TIMEOUT = 2.0


class AdminFront:
    def __init__(self, machine: StateMachine, metrics: Metrics, monitor: UpstreamMonitor, warmer: Warmer,
                 supervisor: Supervisor) -> None:
        self.machine = machine
        self.metrics = metrics
        self.monitor = monitor
        self.warmer = warmer
        self.supervisor = supervisor

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
        """Plain text for people; ``?format=json`` (or Accept: application/json) for programs."""
        plan = await self._current_plan()
        data = self.status_data(plan)
        if request.query.get("format") == "json" or "application/json" in request.headers.get("Accept", ""):
            return web.Response(body=orjson.dumps(data, option=orjson.OPT_INDENT_2), content_type="application/json")
        return web.Response(text=self.status_text(data, plan), content_type="text/plain")

    async def _current_plan(self) -> Plan:
        """The plan a warm-up would run now (not the last one's), or the last one if it cannot be built fast."""
        try:
            async with asyncio.timeout(_PLAN_TIMEOUT):
                return await self.warmer.planner.build(self.monitor.protocol or "triton")
        except Exception:  # a status page must answer whatever the store or the model server do
            return self.warmer.plan

    def status_data(self, plan: Plan) -> dict[str, Any]:
        m = self.machine
        report = self.warmer.report
        return {
            "state": m.state.value,
            "since_seconds": round(time.time() - m.since, 3),
            "reason": m.reason,
            "progress": round(m.progress, 3),
            "upstream": {"url": self.monitor.client.base, "protocol": self.monitor.protocol or "detecting",
                         "health": self.monitor.last.value, "problem": self.monitor.problem,
                         "warmup_retry_in_seconds": self.monitor.retry_in},
            "store": self.warmer.planner.store.describe(),
            "warmups_run": self.warmer.runs,
            "task_restarts": dict(self.supervisor.restarts),
            "plan": [
                {"model": mp.model, "share": round(mp.share, 4), "max_batch": mp.max_batch,
                 "calls": [{"kind": c.kind, "batch": c.batch, "shape": c.shape} for c in mp.calls]}
                for mp in plan.models
            ],
            "last_warmup": None if report is None else {
                "passes": report.passes, "complete": report.complete, "reason": report.reason,
                "errors": report.errors[-20:],
                "groups": [{"model": g.model, "batch": g.batch, "shape": g.shape, "converged": g.converged,
                            "failed": g.failed, "pass_latencies_ms": [round(x * 1e3, 3) for x in g.passes]}
                           for g in report.groups.values()],
            },
        }

    def status_text(self, data: dict[str, Any], plan: Plan) -> str:
        up = data["upstream"]
        problem = f" - {up['problem']}" if up["problem"] else ""
        restarts = ", ".join(f"{k} x{v}" for k, v in data["task_restarts"].items()) or "none"
        lines = [
            "warm-sidecar status",
            f"state:    {data['state']} for {data['since_seconds']:.1f} s ({data['reason']})",
            f"progress: {data['progress']:.0%}",
            f"upstream: {up['url']} ({up['protocol']}), {up['health']}{problem}",
            f"memory:   {data['store']}",
            f"warm-ups: {data['warmups_run']} run since start; background task restarts: {restarts}",
            "",
            "now: " + plan.render().rstrip(),
        ]
        if self.warmer.report is not None:
            lines += ["", self.warmer.report.render().rstrip()]
        return "\n".join(lines) + "\n"

"""The admin port: Kubernetes probes, Prometheus metrics, a status page.

Every answer about readiness is read from the one StateMachine. ``/status`` is open (no token), so
what it costs is bounded whatever the rate of requests: the plan it shows is the last one built, by a
warm-up or by the status page itself, and the page builds one (payloads decoded in a thread, each
payload once) at most every ``_PLAN_EVERY`` seconds, all requests in between sharing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from ..mesh.envoy import DEGRADED, HEALTH_CHECK_FAIL
from ..metrics import Metrics
from ..state import State, StateMachine
from ..supervise import Supervisor
from ..warmup.planner import Plan
from .monitor import UpstreamMonitor
from .warmer import Warmer

_PLAN_TIMEOUT = 2.0  # seconds a status request waits for a plan being built before it shows the last one
_PLAN_EVERY = 3.0  # seconds a plan is shown before the status page builds the one a warm-up would run now


@dataclass(frozen=True)
class AdminActions:
    """What the admin port may change, wired in the composition root."""

    flush_cache: Callable[[str | None], Awaitable[int]]  # model or None -> entries forgotten here
    rewarm: Callable[[], str]  # what it did, in words
    token: Callable[[], str]  # the configured bearer token, read now ("" when none)
    cache_report: Callable[[], dict[str, Any]]  # per-model hit ratios and sizes, for /status
    batch_report: Callable[[], dict[str, Any]]  # per batched model: cap, learned latencies, queue
    models_report: Callable[[], dict[str, Any]]  # per model: share, load/warm state, time to warm
    forecast_report: Callable[[], dict[str, Any] | None] = lambda: None  # lead, forecasts, capacity; None: off
    fill_report: Callable[[], dict[str, Any]] = dict  # per model: the cache filled behind readiness
    workers_report: Callable[[], dict[str, Any]] = dict  # the data-plane worker processes
    refresh: Callable[[], Awaitable[None]] | None = None  # asks data planes in other processes what they hold now


class AdminFront:
    def __init__(self, machine: StateMachine, metrics: Metrics, monitor: UpstreamMonitor, warmer: Warmer,
                 supervisor: Supervisor, degraded_while_warming: bool = False,
                 actions: AdminActions | None = None) -> None:
        self.machine = machine
        self.metrics = metrics
        self.monitor = monitor
        self.warmer = warmer
        self.supervisor = supervisor
        self.degraded_while_warming = degraded_while_warming
        self.actions = actions
        self._plan: Plan | None = None
        self._plan_at = float("-inf")  # time.monotonic() when self._plan was built
        self._planning: asyncio.Task[None] | None = None

    # (method, path, handler name): what the admin port answers; docs/guide.md lists each.
    ROUTES = (("GET", "/livez", "livez"), ("GET", "/startupz", "startupz"), ("GET", "/readyz", "readyz"),
              ("GET", "/metrics", "metrics_page"), ("GET", "/status", "status"),
              ("POST", "/cache/flush", "flush"), ("POST", "/warmup", "rewarm"))

    @classmethod
    def app_routes(cls) -> list[tuple[str, str]]:
        return [(method, path) for method, path, _ in cls.ROUTES]

    def application(self) -> web.Application:
        app = web.Application()
        for method, path, handler in self.ROUTES:
            add = app.router.add_get if method == "GET" else app.router.add_post  # GET answers HEAD too
            add(path, getattr(self, handler))
        return app

    # -- actions, behind a bearer token ----------------------------------------------------------------

    def _refusal(self, request: web.Request) -> web.Response | None:
        """None when the caller may act; otherwise 403 (no token configured: actions disabled) or 401."""
        token = self.actions.token() if self.actions is not None else ""
        if not token:
            return _json(403, {"error": "admin actions are disabled: no admin token is configured "
                                        "(admin_token_file or SIDECAR_ADMIN_TOKEN)"})
        given = request.headers.get("Authorization", "")
        scheme, _, credential = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(), token.encode()):
            answer = _json(401, {"error": "admin action needs Authorization: Bearer <token>"})
            answer.headers["WWW-Authenticate"] = 'Bearer realm="warm-sidecar"'
            return answer
        return None

    async def flush(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None or self.actions is None:
            return refused or _json(403, {"error": "admin actions are disabled"})
        model = request.query.get("model") or None
        gone = await self.actions.flush_cache(model)
        return _json(200, {"flushed": gone, "model": model})

    async def rewarm(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None or self.actions is None:
            return refused or _json(403, {"error": "admin actions are disabled"})
        return _json(202, {"warmup": self.actions.rewarm()})

    def _probe(self, ok: bool) -> web.Response:
        body = {"status": "ok" if ok else "unavailable", "state": self.machine.state.value,
                "reason": self.machine.reason}
        return web.Response(status=200 if ok else 503, body=orjson.dumps(body), content_type="application/json")

    async def livez(self, request: web.Request) -> web.Response:
        return self._probe(self.machine.live)

    async def startupz(self, request: web.Request) -> web.Response:
        return self._probe(self.machine.started)

    async def readyz(self, request: web.Request) -> web.Response:
        """Also Envoy's health check: degraded while warming (``mesh.degraded_while_warming``), and a
        draining pod fails at once rather than after Envoy's unhealthy threshold."""
        state = self.machine.state
        if state is State.WARMING and self.degraded_while_warming:
            answer = self._probe(True)
            answer.headers[DEGRADED] = "true"
            return answer
        answer = self._probe(self.machine.ready)
        if state is State.DRAINING:
            name, value = HEALTH_CHECK_FAIL
            answer.headers[name.decode()] = value.decode()
        return answer

    async def metrics_page(self, request: web.Request) -> web.Response:
        await self._refresh()
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    async def status(self, request: web.Request) -> web.Response:
        """Plain text for people; ``?format=json`` (or Accept: application/json) for programs."""
        plan = await self._current_plan()
        await self._refresh()
        data = self.status_data(plan)
        if request.query.get("format") == "json" or "application/json" in request.headers.get("Accept", ""):
            return web.Response(body=orjson.dumps(data, option=orjson.OPT_INDENT_2), content_type="application/json")
        return web.Response(text=self.status_text(data, plan), content_type="text/plain")

    async def _refresh(self) -> None:
        if self.actions is not None and self.actions.refresh is not None:
            await self.actions.refresh()

    async def _current_plan(self) -> Plan:
        """The plan a warm-up would run now, as of at most ``_PLAN_EVERY`` seconds ago (the last warm-up's when it
        is newer); one build at a time, shared by every request waiting for it."""
        built_at = self.warmer.plan_at
        if built_at is not None and built_at >= self._plan_at:
            self._plan, self._plan_at = self.warmer.plan, built_at
        if self._plan is not None and time.monotonic() - self._plan_at < _PLAN_EVERY:
            return self._plan
        if self._planning is None or self._planning.done():
            self._planning = asyncio.get_running_loop().create_task(self._build_plan())
        # Shielded: a request that gives up (or times out) leaves the build running for the next one.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_PLAN_TIMEOUT):
                await asyncio.shield(self._planning)
        return self._plan if self._plan is not None else self.warmer.plan

    async def _build_plan(self) -> None:
        try:
            plan = await self.warmer.planner.build(self.monitor.protocol or "triton")
        except Exception:  # a status page must answer whatever the store or the model server do
            plan = self._plan if self._plan is not None else self.warmer.plan
        # Stamped even when it failed: a failing store is asked again in _PLAN_EVERY seconds, not per request.
        self._plan, self._plan_at = plan, time.monotonic()

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
            "cache": self.actions.cache_report() if self.actions is not None else {},
            "batching": self.actions.batch_report() if self.actions is not None else {},
            "models": self.actions.models_report() if self.actions is not None else {},
            "forecast": self.actions.forecast_report() if self.actions is not None else None,
            "cache_fill": self.actions.fill_report() if self.actions is not None else {},
            "workers": self.actions.workers_report() if self.actions is not None else {},
            "plan": [
                {"model": mp.model, "share": round(mp.share, 4), "max_batch": mp.max_batch,
                 "covered": round(mp.covered, 4),
                 "calls": [{"kind": c.kind, "batch": c.batch, "shape": c.shape} for c in mp.calls]}
                for mp in plan.models
            ],
            "plan_skipped": {reason: n for reason, n in sorted(plan.skipped.items()) if n},
            "last_warmup": None if report is None else {
                "passes": report.passes, "complete": report.complete, "reason": report.reason,
                "started": round(report.started, 3),
                "finished": None if report.finished is None else round(report.finished, 3),
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
            _workers_line(data.get("workers") or {}),
            "",
            "now: " + plan.render().rstrip(),
        ]
        cache = data["cache"]
        if cache.get("models"):
            lines += ["", f"cache: {cache['entries']} answers, {cache['bytes']} bytes in process"
                          f"{'; shared tier ' + cache['shared'] if cache.get('shared') else ''}"]
            for model, m in sorted(cache["models"].items()):
                lines.append(f"  {model:<20} hit ratio {m['hit_ratio']:.1%}  hits {m['hits']} "
                             f"(shared {m['redis_hits']})  misses {m['misses']}  coalesced {m['coalesced']}  "
                             f"bypassed {m['bypassed']}")
        if data["models"]:
            lines += ["", "models (by share of traffic):"]
            for model, m in data["models"].items():
                warm = f", warm in {m['warm_seconds']:.1f} s" if m["warm_seconds"] is not None else ""
                why = f" ({m['reason']})" if m["reason"] else ""
                lines.append(f"  {model:<20} {m['share']:6.1%}  {m['state']}{warm}{why}")
        for model, b in sorted(data["batching"].items()):
            latencies = ", ".join(f"{size}: {ms} ms" for size, ms in b["latency_ms"].items()) or "none yet"
            lines.append(f"batching {model}: cap {b['cap']} of {b['max_batch']}, {b['in_flight']}/{b['max_concurrent']}"
                         f" in flight, {b['waiting']} waiting, {b['batches']} batches, {b['retried_alone']} retried "
                         f"alone; latency by batch size: {latencies}")
        for model, f in data["cache_fill"].items():
            took = f"in {f['seconds']:.1f} s" if f["seconds"] is not None else f"{f['left']} left"
            lines.append(f"cache fill {model}: {f['planned']} recorded calls behind readiness, {f['from_cache']} "
                         f"from the caches, {f['from_model']} from the model server, {f['failed']} failed, {took}")
        lines += _forecast_lines(data["forecast"])
        if self.warmer.report is not None:
            lines += ["", self.warmer.report.render().rstrip()]
        return "\n".join(lines) + "\n"


def _workers_line(workers: dict[str, Any]) -> str:
    if not workers:
        return "workers:  1 process"
    return (f"workers:  {workers.get('running', 0)} of {workers.get('count', 1)} running (setting "
            f"{workers.get('setting', 'auto')}), {workers.get('restarts', 0)} restarted")


def _forecast_lines(forecast: dict[str, Any] | None) -> list[str]:
    if not forecast:
        return []
    lead = forecast["lead"]
    measured = forecast.get("launch_to_warm")
    warm = f"warm {measured:.1f} s after launch" if measured is not None else "not warm yet"
    lines = ["", f"forecast: lead {lead['seconds']:.0f} s ({lead['source']}, {lead['samples']} samples); "
                 f"this pod {warm}; history {forecast['history']}"]
    capacity = forecast.get("capacity", {})
    for model in sorted(set(forecast["models"]) | set(capacity)):
        entry = forecast["models"].get(model) or {}
        f, e, c = entry.get("forecast"), entry.get("error"), capacity.get(model)
        expected = f"{f['requests_per_second']:.2f}/s at now+lead" if f else "no forecast yet"
        error = f", error {e['mape']:.1%}" if e else ""
        serves = f", this pod serves {c['requests_per_second']:.1f}/s ({c['source']})" if c else ""
        lines.append(f"  {model:<20} {expected}{error}{serves}")
    return lines


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

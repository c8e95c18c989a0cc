"""Replays a warm-up plan until latency has converged: readiness is earned, not timed.

Every pass measures each (model, shape) group on a sample of its calls (the most frequent first;
``concurrency`` at a time, models in plan order), the groups not yet converged only after the first. A
group is converged when its last two passes' latencies (the slowest call of a small group, the 90th
percentile of a large one) are within ``convergence_ratio`` of each other, both ways. A call the server
refuses is reported and dropped from later passes, never retried forever.

Readiness waits for the measuring only: the planned calls no pass needed are handed back
(``WarmupReport.unsent``) and fill the response cache behind readiness (``control/fill.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..calls import Call, Header, HttpWire, Reply
from ..config import WarmupConfig
from ..errors import SidecarError
from ..identity import is_stateful
from ..metrics import Metrics
from .planner import Plan, PlannedCall, batch_text

log = logging.getLogger("sidecar.warmup")

Send = Callable[[Call], Awaitable[Reply]]
_NOISE_FLOOR = 0.001  # seconds


@dataclass
class GroupStats:
    model: str
    shape: str
    batch: int
    passes: list[float] = field(default_factory=list)  # seconds, slowest call per pass
    failed: int = 0
    converged: bool = False


@dataclass
class WarmupReport:
    groups: dict[tuple[str, str], GroupStats] = field(default_factory=dict)
    passes: int = 0
    complete: bool = False
    reason: str = ""
    errors: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # per model, when a warm-up is made of several
    started: float = field(default_factory=time.time)
    finished: float | None = None
    unsent: list[PlannedCall] = field(default_factory=list)  # planned calls no pass needed: the cache fill's

    def render(self) -> str:
        lines = [f"last warm-up: {self.passes} pass(es), {'complete' if self.complete else 'INCOMPLETE'}"
                 + (f" ({self.reason})" if self.reason else "")]
        for g in sorted(self.groups.values(), key=lambda g: (g.model, g.batch, g.shape)):
            passes = " -> ".join(f"{s * 1e3:.1f}" for s in g.passes) or "-"
            state = "warm" if g.converged else ("failed" if g.failed and not g.passes else "not converged")
            lines.append(f"  {g.model:<20} batch {batch_text(g.batch):<4} {state:<13} pass latencies ms: {passes}   "
                         f"{g.shape}")
        lines.extend(f"  error: {e}" for e in self.errors[-10:])
        return "\n".join(lines) + "\n"


class Replayer:
    def __init__(self, cfg: WarmupConfig, send: Send, metrics: Metrics, timeout: float,
                 on_progress: Callable[[float], None] | None = None, own_headers: tuple[Header, ...] = ()) -> None:
        """``own_headers``: sent with every replayed call (the sidecar's own calls): the header and value of
        ``restricted_api`` for inference, without which a model server restricted alike refuses them."""
        self.cfg = cfg
        self.own_headers = own_headers
        self.send = send
        self.metrics = metrics
        self.timeout = timeout
        self.report = WarmupReport()
        self.concurrency = cfg.concurrency
        self.on_progress = on_progress or (lambda _p: None)

    async def run(self, plan: Plan, concurrency: int | None = None) -> WarmupReport:
        """Replay until converged, out of passes or out of budget (budget ignored with require_complete).
        ``concurrency``: calls in flight at once (default ``warmup.concurrency``)."""
        self.concurrency = concurrency or self.cfg.concurrency
        self.report = report = WarmupReport()
        calls = [c for m in plan.models for c in m.calls]
        for c in calls:
            report.groups.setdefault((c.model, c.shape), GroupStats(c.model, c.shape, c.batch))
        if not calls:
            report.complete, report.reason = True, "nothing to replay"
            return self._finish(report)
        try:
            if self.cfg.require_complete:
                await self._passes(calls, report, limit=None)
            else:
                async with asyncio.timeout(self.cfg.budget):
                    await self._passes(calls, report, limit=self.cfg.max_passes)
        except TimeoutError:
            report.reason = f"time budget of {self.cfg.budget:g} s ran out"
        return self._finish(report)

    def _finish(self, report: WarmupReport) -> WarmupReport:
        report.finished = time.time()
        if not report.complete:
            self.metrics.warmup_incomplete.inc()
            log.warning("warm-up incomplete: %s", report.reason or "did not converge")
        return report

    async def _passes(self, calls: list[PlannedCall], report: WarmupReport, limit: int | None) -> None:
        live = list(calls)
        sent: set[int] = set()
        report.unsent = live
        while live and (limit is None or report.passes < limit):
            # A sample of each group: every shape runs at once, and 1,000 recorded calls of one shape need not run
            # before the pod is ready to show that its latency has settled (the rest fill the cache after).
            this_pass = _sample(live, report)
            latencies = await self._one_pass(this_pass, report)
            report.passes += 1
            sent.update(id(c) for c in this_pass)
            failed = {id(c) for c, lat in latencies if lat is None}
            live = [c for c in live if id(c) not in failed]
            report.unsent = [c for c in live if id(c) not in sent]
            self._record_pass(report, latencies)
            self.on_progress(_progress(report))
            if report.passes >= self.cfg.min_passes and all(
                g.converged or not g.passes for g in report.groups.values()
            ):
                report.complete = not report.errors
                report.reason = "" if report.complete else f"{len(report.errors)} call(s) failed"
                return
        report.reason = report.reason or (
            f"not converged after {report.passes} passes" if live else "every warm-up call failed")

    async def _one_pass(self, calls: list[PlannedCall], report: WarmupReport) -> list[tuple[PlannedCall,
                                                                                             float | None]]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(call: PlannedCall) -> tuple[PlannedCall, float | None]:
            async with gate:
                return call, await self._replay(call, report)

        return list(await asyncio.gather(*(one(c) for c in calls)))

    async def _replay(self, call: PlannedCall, report: WarmupReport) -> float | None:
        if is_stateful(call.request):  # the planner leaves these out; a sequence must never be touched here
            self._failed(call, report, "a call of a sequence is never replayed")
            return None
        replayed = replay_call(call, self.own_headers, self.timeout)
        started = time.perf_counter()
        try:
            reply = await self.send(replayed)
        except SidecarError as e:
            self._failed(call, report, e.message)
            return None
        if reply.status != 200:
            # The status only: the model server's error text can quote input values.
            self._failed(call, report, f"the model server answered HTTP {reply.status}")
            return None
        self.metrics.replayed.labels(self.metrics.model_label(call.model), "ok").inc()
        return time.perf_counter() - started

    def _failed(self, call: PlannedCall, report: WarmupReport, why: str) -> None:
        self.metrics.replayed.labels(self.metrics.model_label(call.model), "error").inc()
        report.groups[(call.model, call.shape)].failed += 1
        report.errors.append(f"{call.model} batch {batch_text(call.batch)} ({call.kind}): {why}")
        log.warning("warm-up call failed and is dropped: %s batch %s (%s): %s", call.model, batch_text(call.batch),
                    call.kind, why)

    def _record_pass(self, report: WarmupReport, latencies: list[tuple[PlannedCall, float | None]]) -> None:
        seen: dict[tuple[str, str], list[float]] = {}
        for call, latency in latencies:
            if latency is not None:
                seen.setdefault((call.model, call.shape), []).append(latency)
        ratio = self.cfg.convergence_ratio
        for key, values in seen.items():
            latency = _group_latency(values)
            group = report.groups[key]
            group.passes.append(latency)
            if len(group.passes) >= 2:
                prev, last = group.passes[-2], group.passes[-1]
                # Within the ratio both ways; below a millisecond of difference, scheduling noise
                # dominates and the two passes count as equal.
                low, high = min(prev, last), max(prev, last)
                group.converged = high <= ratio * low or high - low <= _NOISE_FLOOR


def replay_call(call: PlannedCall, own_headers: tuple[Header, ...], timeout: float, origin: str = "warmup") -> Call:
    """The call that replays ``call``: its canonical HTTP form, the headers that reach the model, and the
    sidecar's own (``own_headers``, which replace any of the same name). A ``warmup`` call measures the model,
    so it is never answered from the cache, but its answer is stored there under the identity its callers'
    calls have (the same context); a ``fill`` call may be answered by the cache (the fleet's tier fills this
    one's)."""
    own = {name.lower() for name, _ in own_headers}
    headers = (*((k.encode("latin-1"), v.encode("latin-1")) for k, v in call.headers),
               *(h for h in call.context if h[0].lower() not in own), *own_headers)
    wire = HttpWire(call.path.encode("latin-1"), headers, call.body)
    deadline = asyncio.get_running_loop().time() + timeout
    return Call(call.request, f"{origin}-{call.kind}", deadline, wire, route=origin, origin=origin,
                no_cache=origin == "warmup", context=call.context)


_SAMPLE = 16  # calls per group replayed by a measuring pass


def _sample(live: list[PlannedCall], report: WarmupReport) -> list[PlannedCall]:
    """The first calls (the most frequent) of every group not yet converged, at most _SAMPLE each (before the
    first pass no group is)."""
    taken: dict[tuple[str, str], int] = {}
    chosen = []
    for call in live:
        key = (call.model, call.shape)
        if report.groups[key].converged or taken.get(key, 0) >= _SAMPLE:
            continue
        taken[key] = taken.get(key, 0) + 1
        chosen.append(call)
    return chosen


def _group_latency(values: list[float]) -> float:
    """A pass's latency for a group: its slowest call when it has a few, else its 90th percentile (the
    slowest of hundreds is scheduling noise, and would keep a group from ever converging)."""
    if len(values) <= 4:
        return max(values)
    ordered = sorted(values)
    return ordered[int(0.9 * (len(ordered) - 1))]


def _progress(report: WarmupReport) -> float:
    """Share of (model, shape) groups settled, a started one counting half; below 1 until WARM."""
    groups = [g for g in report.groups.values() if g.passes or g.failed]
    if not groups:
        return 0.0
    done = sum(1.0 if g.converged or (g.failed and not g.passes) else 0.5 for g in groups)
    return min(0.99, done / len(report.groups))

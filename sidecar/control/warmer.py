"""Runs warm-up when the state machine enters WARMING, model by model in order of share of traffic.

Each model is loaded first when the sidecar manages loading (Triton in explicit model-control mode),
then warmed by replaying its own plan until its latency converges. The pod may turn ready as soon as
the models carrying ``warmup.ready_share`` of recorded traffic are warm (``on_ready``); the others
keep warming in the background at ``warmup.background_concurrency``, so they do not slow the models
already serving. A caller waiting for a model (``ModelBook.want``) moves it to the front.

A warm-up that starts while the pod is warm (``POST /warmup``) is a re-warm: it replays behind
readiness. It loads nothing, changes no model's state, and a model the book says is warm stays warm
(ready, un-gated) while its calls replay; it only finishes models a finished warm-up left not warm.
A warm-up after a model-server restart starts from WARMING: every model is gated until warm again.

Holds the last plan (and when it was built) and report for the /status page and `sidecar plan`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..calls import Call, Header, Reply
from ..config import Config
from ..errors import SidecarError
from ..latency import LatencyModel
from ..loading.book import ModelBook, ModelState
from ..loading.repository import Repository
from ..metrics import Metrics
from ..protocols import restrict
from ..protocols.request import Protocol
from ..state import State, StateMachine
from ..upstream.grpc import GrpcUpstream
from ..upstream.http import HttpUpstream
from ..upstream.models import ModelCatalog
from ..warmup.planner import ModelPlan, Plan, PlannedCall, Planner
from ..warmup.replayer import Replayer, WarmupReport
from ..warmup.store import TrafficStore

log = logging.getLogger("sidecar.warmup")

OnReady = Callable[[], None]
Send = Callable[[Call], Awaitable[Reply]]


class Warmer:
    def __init__(self, cfg: Config, store: TrafficStore, client: HttpUpstream, machine: StateMachine,
                 metrics: Metrics, send: Send | None = None, catalog: ModelCatalog | None = None,
                 latency: LatencyModel | None = None, book: ModelBook | None = None,
                 loaded: Callable[[], frozenset[tuple[str, str]] | None] = lambda: None,
                 grpc: GrpcUpstream | None = None,
                 fill: Callable[[str, list[PlannedCall]], None] = lambda _model, _calls: None) -> None:
        """``send``: where replayed calls enter the data plane (the response cache, so its answers fill it);
        by default straight to the model server. ``loaded``: what the model server has loaded, as the
        monitor last saw it; ``grpc``: the model server's gRPC port, for loads; ``fill``: takes each model's
        planned calls its warm-up did not send, to fill the cache behind readiness."""
        self.cfg = cfg
        self.client = client
        self.catalog = catalog or ModelCatalog(client, cfg.warmup.max_batch)
        self.latency = latency
        self.machine = machine
        self.metrics = metrics
        self.book = book or ModelBook()
        self.repository = Repository(client, cfg.warmup.budget, grpc)
        self.planner = Planner(cfg, store, self.max_batch_of)
        self.replayer = Replayer(cfg.warmup, send or client.send, metrics, cfg.upstream.timeout,
                                 on_progress=self._model_progress, own_headers=own_headers(cfg.restricted_api))
        self._done, self._total = 0, 1  # models warmed in this warm-up, and how many it has
        self.plan = Plan()
        self.plan_at: float | None = None  # time.monotonic() when self.plan was built; None: never
        self._running = 0  # warm-ups in progress (a re-warm may start while one still warms in the background)
        self.report: WarmupReport | None = None
        self.runs = 0
        self.managing = False  # whether the sidecar loads models itself (explicit mode)
        self.loading = 0  # repository loads the sidecar has in flight
        self._loads: dict[str, asyncio.Task[bool]] = {}  # loads in flight, one per model
        self.protocol = "triton"
        self.loaded = loaded
        self.fill = fill

    def __repr__(self) -> str:
        return f"<Warmer runs={self.runs} plan={self.plan.total_calls} calls {self.book!r}>"

    async def __call__(self, protocol: str, on_ready: OnReady | None = None) -> bool:
        """One warm-up of a ``triton`` or ``tfserving`` upstream; True when the pod may report ready.
        ``on_ready`` is called (at most once) as soon as the ready share is warm. Started while the pod is
        warm, it is a re-warm (see the module's notes)."""
        if not self.cfg.warmup.enabled:
            return True
        self.runs += 1
        rewarm = self.machine.state is State.WARM
        self.protocol = protocol
        self._progress(0.0)
        self._running += 1
        try:
            self.plan = await self.planner.build(protocol)
            self.plan_at = time.monotonic()
            log.info("%s %d: %s", "re-warm" if rewarm else "warm-up", self.runs, self.plan.render().strip())
            order = await self._order(protocol, rewarm)
            complete = await self._warm_in_order(order, on_ready, rewarm)
        except (SidecarError, OSError, ValueError) as e:
            # The store or the model server failed us: warm-up is best effort unless it is required.
            self.metrics.warmup_incomplete.inc()
            log.warning("warm-up %d could not run (%s)", self.runs, getattr(e, "message", type(e).__name__))
            return not self.cfg.warmup.require_complete
        finally:
            self._running -= 1
        if self.report is not None:
            log.info("warm-up %d done: %s", self.runs, self.report.render().strip())
        return complete or not self.cfg.warmup.require_complete

    # -- the order ------------------------------------------------------------------------------------

    async def _order(self, protocol: str, rewarm: bool = False) -> list[str]:
        """Models by share of recorded traffic, then those never seen (``models.unseen``); tracked in the book
        with their share and whether they are loaded. A re-warm changes no model's state and tracks no new
        one (an untracked model follows the pod, which is ready): it only refreshes the shares."""
        shares = {mp.model: mp.share for mp in self.plan.models}
        loaded = {m for m, _ in self.loaded() or ()}
        index = await self.repository.index() if protocol == "triton" else None
        managing = (self.cfg.models.load == "auto" and index is not None
                    and any(not e.state for e in index))  # a model never loaded: explicit mode
        known = [e.name for e in index] if index is not None else []
        ordered = sorted(shares, key=lambda m: -shares[m])
        unseen = [m for m in dict.fromkeys([*known, *sorted(loaded)]) if m not in shares]
        ordered += self._unseen(unseen, loaded)
        ready_now = loaded | {e.name for e in index or () if e.state == "READY"}
        if rewarm:
            for name in ordered:
                entry = self.book.models.get(name)
                if entry is not None:
                    entry.share = shares.get(name, 0.0)
            # Replay only what is loaded now (nothing is loaded for a re-warm); unknown when the server lists
            # nothing (TF Serving): then every planned model.
            listed = bool(ready_now) or index is not None
            return [m for m in ordered if not listed or m in ready_now or self._tracked_loaded(m)]
        self.managing = managing
        for name in ordered:
            self.book.track([name])
            entry = self.book.models[name]
            entry.share = shares.get(name, 0.0)
            if entry.state is not ModelState.WARM:
                self.book.set(name, ModelState.QUEUED if name in ready_now or not self.managing
                              else ModelState.UNLOADED)
        if self.managing:  # the rest of the repository: not loaded now, loaded when a caller waits for one
            rest = [m for m in known if m not in ordered and m not in ready_now]
            self.book.track(rest, ModelState.UNLOADED)
        return ordered

    def _tracked_loaded(self, name: str) -> bool:
        entry = self.book.models.get(name)
        return entry is not None and entry.state not in (ModelState.UNLOADED, ModelState.LOADING, ModelState.FAILED)

    def _unseen(self, unseen: list[str], loaded: set[str]) -> list[str]:
        policy = self.cfg.models.unseen
        if policy == ("all",):
            return unseen
        if policy == ("none",):
            return [m for m in unseen if m in loaded]  # loaded by the operator: warmed, never loaded by us
        listed = [m for m in policy if m in unseen]
        return listed + [m for m in unseen if m in loaded and m not in listed]

    # -- model by model ---------------------------------------------------------------------------------

    async def _warm_in_order(self, order: list[str], on_ready: OnReady | None, rewarm: bool = False) -> bool:
        merged = WarmupReport()  # becomes self.report (the last finished warm-up) when done
        ready = rewarm  # a re-warm runs behind readiness from its start
        complete = True
        pending = list(order)
        self._total = max(len(order), 1)
        for done in range(len(order)):
            if rewarm and self.machine.state is not State.WARM:
                # The pod left WARM (the model server restarted, or it drains): the warm-up that follows a
                # restart takes over; this one must not mark anything warm in the meantime.
                complete = False
                merged.reasons.append(f"the pod left warm ({self.machine.state.value})")
                break
            self._done = done
            # A re-warm takes no wanted model first: a want is for the warm-up (or the loader) that owns it.
            name = pending[0] if rewarm else self.book.next_wanted(pending) or pending[0]
            pending.remove(name)
            if not ready and pending:
                # Until the pod is ready, the next model loads while this one warms: a load is mostly a new
                # process importing its framework, a warm-up mostly compiling, so the two share the cores well.
                self._prefetch(pending[0])
            report = await (self._rewarm_model(name) if rewarm else self.warm_model(name, background=ready))
            if report is not None:
                merged.groups.update(report.groups)
                merged.passes = max(merged.passes, report.passes)
                merged.errors.extend(report.errors)
                merged.reasons.append(report.reason if not report.complete else "")
                complete = complete and report.complete
            self._progress(min(0.99, (done + 1) / max(len(order), 1)))
            if not ready and pending and self._ready_share_warm():
                ready = True  # the rest warms behind the pod's readiness (with nothing left, the caller says so)
                if on_ready is not None:
                    on_ready()
        merged.complete = complete
        merged.reasons = [r for r in merged.reasons if r]
        merged.reason = "" if complete else (f"{len(merged.errors)} call(s) failed" if merged.errors else
                                             "; ".join(merged.reasons) or "did not converge")
        merged.finished = time.time()
        self.report = merged
        return complete

    async def _rewarm_model(self, name: str) -> WarmupReport | None:
        """A re-warm's turn for ``name``: a warm (or untracked) model replays and stays as it is, ready; a model
        a finished warm-up left queued or warming is warmed as usual; one loading or warming in a warm-up still
        running (in the background) is left to it."""
        entry = self.book.models.get(name)
        if entry is None or entry.state is ModelState.WARM:
            return await self._replay(name, background=True)
        if entry.state not in (ModelState.QUEUED, ModelState.WARMING) or self._running > 1:
            return None
        self.book.set(name, ModelState.WARMING)  # not ready before either: no caller is gated anew
        report = await self._replay(name, background=True)
        # Marked warm only if nothing moved under it: a restart of the model server meanwhile forgot the book's
        # entries, and the warm-up after it decides.
        if (self.book.models.get(name) is entry and self.machine.state is State.WARM
                and (report.complete or not self.cfg.warmup.require_complete)):
            self.book.set(name, ModelState.WARM)
        return report

    async def _replay(self, name: str, background: bool) -> WarmupReport:
        model_plan = next((mp for mp in self.plan.models if mp.model == name), None)
        concurrency = self.cfg.warmup.background_concurrency if background else None
        report = await self.replayer.run(Plan([model_plan] if model_plan else []), concurrency=concurrency)
        self._learn(report)
        self.fill(name, report.unsent)
        return report

    def _ready_share_warm(self) -> bool:
        """ready_share 1.0 means every model (those never seen in traffic too, as before layering)."""
        share = self.cfg.warmup.ready_share
        if share >= 1.0:
            return all(self.book.ready(name) for name in self.book.models)
        return self.book.shares_warm() >= share

    async def warm_model(self, name: str, background: bool = False) -> WarmupReport | None:
        """Load ``name`` if the sidecar manages loading and it is not loaded, then replay its plan."""
        if not await self._loaded(name):
            return None
        self.book.set(name, ModelState.WARMING)
        report = await self._replay(name, background)
        if report.complete or not self.cfg.warmup.require_complete:
            self.book.set(name, ModelState.WARM)
        else:  # required and not reached: the model stays not ready, as the pod does
            self.book.set(name, ModelState.WARMING, report.reason)
        return report

    def _prefetch(self, name: str) -> None:
        entry = self.book.models.get(name)
        if self.managing and entry is not None and entry.state is ModelState.UNLOADED and name not in self._loads:
            self._loads[name] = asyncio.get_running_loop().create_task(self._load(name))

    async def _loaded(self, name: str) -> bool:
        """Whether ``name`` is loaded now, loading it first (or waiting for its prefetched load) if need be."""
        task = self._loads.get(name)
        if task is None:
            entry = self.book.models.get(name)
            if entry is None or entry.state is not ModelState.UNLOADED:
                return True
            if not self.managing:
                return False
            task = self._loads[name] = asyncio.get_running_loop().create_task(self._load(name))
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._loads.pop(name, None)

    async def _load(self, name: str) -> bool:
        self.book.set(name, ModelState.LOADING)
        self.loading += 1
        try:
            why = await self.repository.load(name)
        finally:
            self.loading -= 1
        if why:
            log.warning("loading model %s failed: %s", name, why)
            self.book.set(name, ModelState.FAILED, why)
            return False
        self.book.models[name].loaded_by_sidecar = True
        self.book.set(name, ModelState.QUEUED)
        self.catalog.forget(name)
        # Its configuration (max batch size, so the shape sweep) can only be read now it is loaded.
        await self.rebuild_model_plan(self.protocol, name)
        return True

    async def rebuild_model_plan(self, protocol: str, name: str) -> None:
        """A model loaded again on demand: its plan from what the store holds now."""
        plan = await self.planner.build(protocol)
        self.plan_at = time.monotonic()
        fresh: ModelPlan | None = next((mp for mp in plan.models if mp.model == name), None)
        self.plan.models = [mp for mp in self.plan.models if mp.model != name] + ([fresh] if fresh else [])

    def _learn(self, report: WarmupReport) -> None:
        if self.latency is None:
            return
        for group in report.groups.values():
            if group.passes and group.batch:
                self.latency.observe(group.model, group.batch, group.passes[-1])

    def _progress(self, value: float) -> None:
        # The gauge reads it from there. A warm pod's progress is 1 (the machine set it on entering WARM): a
        # re-warm, or models still warming behind readiness, must not show the pod as partly warm.
        if self.machine.state is not State.WARM:
            self.machine.progress = value

    def _model_progress(self, value: float) -> None:
        """The current model's own progress, as a part of the whole warm-up's."""
        self._progress(min(0.99, (self._done + value) / self._total))

    async def max_batch_of(self, model: str, protocol: Protocol) -> int | None:
        """The model's largest batch, from the model server's own configuration; None when unknown."""
        return (await self.catalog.info(model, protocol)).max_batch


def own_headers(spec: str) -> tuple[Header, ...]:
    """The header ``restricted_api`` asks of inference calls, with its value: warm-up's calls are the sidecar's
    own, and a model server restricted alike refuses them without it."""
    try:
        restrictions = restrict.parse(spec)
    except ValueError:  # refused when the configuration was loaded
        return ()
    return tuple((r.header, r.value) for r in restrictions if "inference" in r.apis)

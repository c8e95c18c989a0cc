"""The batcher stage: concurrent calls of one model coalesced into one upstream call, adaptively.

After the cache (hits and coalesced calls never wait here), before the upstream. Per model:

- while the model server has capacity (fewer batches in flight than ``max_concurrent``, by default
  the model's instance count) a call goes at once, alone and untouched: no added latency at low load;
- while it is busy, arrivals gather; when a batch completes, the next one leaves with every waiting
  call that fits: same ``batch_signature`` (so nobody's answer can change), sizes adding up to at
  most the cap (the model's max_batch_size, lowered by the latency model to keep within
  ``target_latency``); ``max_delay`` bounds any wait, even when the server stays busy;
- nothing polls: arrivals, completions and one timer per model wake the dispatcher.

Each caller gets exactly its own rows back (``rows.split``), re-encoded by its own front. A batch the
server refuses is retried member by member, so only a faulty caller gets an error; an unavailable
or late server gives every member the error it would have got alone. A caller that leaves before
dispatch leaves the batch; after dispatch its rows are dropped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..cache.keys import is_stateful, shape_signature
from ..config import BatchConfig
from ..errors import DecodeError, Overloaded, SidecarError
from ..metrics import Metrics
from ..protocols.request import InferenceRequest
from ..protocols.rows import Signature, batch_signature, merge, rows_of, split
from ..upstream.models import ModelCatalog, ModelInfo
from .latency import LatencyModel
from .stage import Call, Next, Reply

log = logging.getLogger("sidecar.batch")

OnBatch = Callable[[str, str, int], None]  # (model, shape signature, batch size) of what reached the server


@dataclass(eq=False)
class _Member:
    call: Call
    rows: int
    signature: Signature
    future: asyncio.Future[Reply]
    enqueued: float


@dataclass(eq=False)
class _Model:
    name: str
    max_batch: int
    max_concurrent: int
    in_flight: int = 0
    pending: collections.deque[_Member] = field(default_factory=collections.deque)
    timer: asyncio.TimerHandle | None = None
    batches: int = 0
    retried_alone: int = 0


class Batcher:
    name = "batcher"

    def __init__(self, cfg: BatchConfig, catalog: ModelCatalog, latency: LatencyModel, metrics: Metrics,
                 on_batch: OnBatch | None = None) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.latency = latency
        self.metrics = metrics
        self.on_batch = on_batch
        self.auto = "auto" in cfg.models
        self.every_model = "*" in cfg.models
        self.maximums = {name: int(m) if m else None for name, _, m in
                         (item.partition("=") for item in cfg.models if item not in ("auto", "*"))}
        self.models: dict[str, _Model] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sequence = 0
        self._next: Next | None = None

    def __repr__(self) -> str:
        waiting = sum(len(m.pending) for m in self.models.values())
        return f"<Batcher models={len(self.models)} waiting={waiting}>"

    # -- the stage -----------------------------------------------------------------------------------

    async def __call__(self, call: Call, next: Next) -> Reply:
        self._next = next  # the same callable for every call: the timer's dispatches use it too
        req = call.request
        if not call.modelled or call.private or is_stateful(req):
            return await next(call)
        model = await self._model(req)
        if model is None:
            return await next(call)
        n = rows_of(req)
        signature = batch_signature(req)
        if n is None or signature is None or n >= self._cap(model):
            return await self._alone(model, call, next)
        if model.in_flight < model.max_concurrent and not model.pending:
            return await self._alone(model, call, next)  # capacity now: no wait, no added latency
        if len(model.pending) >= self.cfg.max_queue:
            raise Overloaded(f"model {req.model}: {len(model.pending)} calls already wait for a batch", 1.0)
        loop = asyncio.get_running_loop()
        member = _Member(call, n, signature, loop.create_future(), loop.time())
        model.pending.append(member)
        self._arm(model)
        self._dispatch(model, next)
        try:
            return await member.future
        except asyncio.CancelledError:
            if not member.future.done():
                member.future.cancel()  # still waiting: it leaves the batch (skipped when one forms)
            raise

    async def _model(self, req: InferenceRequest) -> _Model | None:
        found = self.models.get(req.model)
        if found is not None:
            return found
        wanted = self.every_model or self.auto or req.model in self.maximums
        if not wanted:
            return None
        info = await self.catalog.info(req.model, req.protocol)
        limits = self._limits(req.model, info)
        if limits is None:
            return None
        max_batch, max_concurrent = limits
        return self.models.setdefault(req.model, _Model(req.model, max_batch, max_concurrent))

    def _limits(self, name: str, info: ModelInfo) -> tuple[int, int] | None:
        """(max batch, batches in flight) for a model this batcher may batch, else None."""
        if info.decoupled:
            return None
        configured = self.maximums.get(name)
        explicit = name in self.maximums or self.every_model
        if self.auto and not explicit and (info.server_batching or not info.max_batch):
            return None  # auto: only models the server does not batch itself
        max_batch = configured or info.max_batch
        if not max_batch or max_batch < 2:
            return None
        return max_batch, self.cfg.max_concurrent or info.instances

    def _cap(self, model: _Model) -> int:
        return self.latency.cap(model.name, self.cfg.target_latency, model.max_batch)

    # -- dispatching ------------------------------------------------------------------------------------

    async def _alone(self, model: _Model, call: Call, next: Next) -> Reply:
        model.in_flight += 1
        started = time.perf_counter()
        try:
            reply = await next(call)
        finally:
            model.in_flight -= 1
            self._wake(model, next)
        n = rows_of(call.request)
        if n is not None and reply.ok:
            self.latency.observe(model.name, n, time.perf_counter() - started)
            self._report(model, call.request, n, 0.0)
        return reply

    def _dispatch(self, model: _Model, next: Next, force: bool = False) -> None:
        """Send batches while the server has capacity (or a wait has reached max_delay)."""
        loop = asyncio.get_running_loop()
        while model.pending:
            while model.pending and model.pending[0].future.done():
                model.pending.popleft()  # left before dispatch
            if not model.pending:
                break
            oldest = model.pending[0]
            overdue = loop.time() - oldest.enqueued >= self.cfg.max_delay
            if model.in_flight >= model.max_concurrent and not (force or overdue):
                break
            members = self._take(model, oldest.signature)
            within = model.in_flight < model.max_concurrent  # an overdue batch's latency includes queueing
            model.in_flight += 1
            task = loop.create_task(self._run(model, members, next, within))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            force = False
        self._arm(model)

    def _take(self, model: _Model, signature: Signature) -> list[_Member]:
        cap = self._cap(model)
        taken: list[_Member] = []
        total = 0
        kept: collections.deque[_Member] = collections.deque()
        for member in model.pending:
            if member.future.done():
                continue
            if member.signature == signature and total + member.rows <= cap:
                taken.append(member)
                total += member.rows
            else:
                kept.append(member)
        model.pending = kept
        return taken

    def _arm(self, model: _Model) -> None:
        if model.timer is not None:
            model.timer.cancel()
            model.timer = None
        if model.pending:
            loop = asyncio.get_running_loop()
            model.timer = loop.call_at(model.pending[0].enqueued + self.cfg.max_delay, self._overdue, model)

    def _overdue(self, model: _Model) -> None:
        model.timer = None
        if self._next is not None:
            self._dispatch(model, self._next, force=True)

    def _wake(self, model: _Model, next: Next) -> None:
        if model.pending:
            self._dispatch(model, next)

    async def _run(self, model: _Model, members: list[_Member], next: Next, learn: bool) -> None:
        """One batch (or one member alone) upstream; every member's future settled exactly once."""
        loop = asyncio.get_running_loop()
        waited = [loop.time() - m.enqueued for m in members]
        try:
            if len(members) == 1:
                await self._run_alone(model, members[0], next, waited[0], learn)
            else:
                await self._run_merged(model, members, next, waited, learn)
        finally:
            model.in_flight -= 1
            self._dispatch(model, next)

    async def _run_alone(self, model: _Model, member: _Member, next: Next, waited: float, learn: bool) -> None:
        started = time.perf_counter()
        try:
            reply = await next(member.call)
        except SidecarError as e:
            _settle(member, error=e)
            return
        if reply.ok:
            if learn:
                self.latency.observe(model.name, member.rows, time.perf_counter() - started)
            self._report(model, member.call.request, member.rows, waited)
        _settle(member, reply=reply)

    async def _run_merged(self, model: _Model, members: list[_Member], next: Next, waited: list[float],
                          learn: bool) -> None:
        merged_request = merge([m.call.request for m in members])
        deadline = min(m.call.deadline for m in members)
        self._sequence += 1
        merged = Call(merged_request, f"batch-{self._sequence}", deadline, None, route=members[0].call.route,
                      origin="batch")
        total = sum(m.rows for m in members)
        started = time.perf_counter()
        try:
            reply = await next(merged)
        except SidecarError as e:
            for m in members:  # the server is gone or late: each member gets what it would have got alone
                _settle(m, error=e)
            return
        model.batches += 1
        if reply.ok:
            try:
                parts = split(reply.response(), [m.rows for m in members])
            except (DecodeError, ValueError):
                parts = None
            if parts is not None:
                if learn:
                    self.latency.observe(model.name, total, time.perf_counter() - started)
                self._report(model, merged_request, total, max(waited))
                for m, part in zip(members, parts, strict=True):
                    _settle(m, reply=Reply(200, response=part, source="batch"))
                return
        # Refused (or an answer that cannot be divided): one by one, so only a faulty caller hears of it.
        model.retried_alone += len(members)
        self.metrics.batch_retried.labels(self.metrics.model_label(model.name)).inc(len(members))
        await asyncio.gather(*(self._retry(m, next) for m in members))

    async def _retry(self, member: _Member, next: Next) -> None:
        if member.future.done():
            return
        try:
            _settle(member, reply=await next(member.call))
        except SidecarError as e:
            _settle(member, error=e)

    def _report(self, model: _Model, request: InferenceRequest, batch: int, waited: float) -> None:
        label = self.metrics.model_label(model.name)
        self.metrics.batch_size.labels(label).observe(batch)
        self.metrics.batch_delay.labels(label).observe(waited)
        if self.on_batch is not None:
            self.on_batch(model.name, shape_signature(request), batch)

    def forget(self, model: str | None = None) -> None:
        """A model reloaded: its limits are read again from its configuration (waiting calls stay queued)."""
        for name in [n for n in self.models if model is None or n == model]:
            if not self.models[name].pending and not self.models[name].in_flight:
                del self.models[name]

    # -- for /status -------------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        return {name: {"max_batch": m.max_batch, "cap": self._cap(m), "max_concurrent": m.max_concurrent,
                       "in_flight": m.in_flight, "waiting": len(m.pending), "batches": m.batches,
                       "retried_alone": m.retried_alone,
                       "latency_ms": {str(b): round(s * 1e3, 3) for b, s in self.latency.known(name).items()}}
                for name, m in sorted(self.models.items())}


def _settle(member: _Member, *, reply: Reply | None = None, error: BaseException | None = None) -> None:
    """Set a member's outcome once; a member that already left is simply skipped."""
    if member.future.done():
        return
    if error is not None:
        member.future.set_exception(error)
    else:
        member.future.set_result(reply)  # type: ignore[arg-type]

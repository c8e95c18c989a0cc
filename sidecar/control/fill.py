"""Filling the response cache behind readiness.

Warm-up measures each (model, shape) on a sample of the recorded calls and the pod turns ready as soon as
latency has converged: filling the cache is not part of being warm. The recorded calls warm-up did not
need go here, and once the pod is ready they are sent through the data plane's cache and batcher
(``planes.DataSide.fill``): an answer the fleet's Redis tier holds is taken from there without asking the
model server, the rest are asked in batches (the batcher gathers what arrives together) and stored each
under its own request's identity. Live calls go first: the batcher serves them before fill calls, and
``warmup.fill_concurrency`` bounds what the fill has in flight.

A model whose warm-up starts again (a restart of the model server, a re-warm) replaces what was queued for
it; the queue is bounded by the plan (``record.top_n`` calls per model).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..calls import Call, Header, Reply
from ..errors import SidecarError
from ..state import State, StateMachine
from ..warmup.planner import PlannedCall
from ..warmup.replayer import replay_call

log = logging.getLogger("sidecar.warmup")

Fill = Callable[[Call], Awaitable[Reply | None]]


@dataclass
class _ModelFill:
    planned: int = 0
    from_cache: int = 0  # answered by a cache (the fleet's tier, or held already): no model call
    from_model: int = 0
    failed: int = 0
    started: float | None = None
    finished: float | None = None
    inflight: int = 0  # taken from pending and not yet answered: the fill is done only when both are empty
    pending: collections.deque[PlannedCall] = field(default_factory=collections.deque)

    def as_dict(self) -> dict[str, Any]:
        took = None if self.started is None or self.finished is None else round(self.finished - self.started, 3)
        return {"planned": self.planned, "from_cache": self.from_cache, "from_model": self.from_model,
                "failed": self.failed, "left": len(self.pending) + self.inflight, "seconds": took}


class Filler:
    def __init__(self, fill: Fill, machine: StateMachine, concurrency: int, own_headers: tuple[Header, ...],
                 timeout: float) -> None:
        """``own_headers``: sent with every call (``restricted_api``'s key for inference); ``timeout``: seconds
        each call may take."""
        self.fill = fill
        self.own_headers = own_headers
        self.timeout = timeout
        self.machine = machine
        self.concurrency = concurrency
        self.models: dict[str, _ModelFill] = {}
        self._wake = asyncio.Event()

    def __repr__(self) -> str:
        left = sum(len(m.pending) for m in self.models.values())
        return f"<Filler {left} calls left over {len(self.models)} models>"

    def add(self, model: str, calls: list[PlannedCall]) -> None:
        """What ``model``'s warm-up did not send: replaces whatever was still queued for it."""
        self.models[model] = _ModelFill(planned=len(calls), pending=collections.deque(calls))
        if calls:
            self._wake.set()

    def report(self) -> dict[str, Any]:
        return {model: m.as_dict() for model, m in sorted(self.models.items())}

    async def run(self) -> None:
        """Background task: whenever the pod is warm and calls are queued, send them, ``concurrency`` at once."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while not await self.machine.wait_until(lambda m: m.state is State.WARM, 3600.0):
                pass
            workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()

    def _next(self) -> tuple[_ModelFill, PlannedCall] | None:
        for entry in self.models.values():
            if entry.pending:
                return entry, entry.pending.popleft()
        return None

    async def _work(self) -> None:
        while self.machine.state is State.WARM and (taken := self._next()) is not None:
            entry, planned = taken
            if entry.started is None:
                entry.started = time.time()
            entry.inflight += 1
            try:
                reply = await self.fill(replay_call(planned, self.own_headers, self.timeout, origin="fill"))
            except SidecarError:
                entry.failed += 1
            except asyncio.CancelledError:
                entry.pending.appendleft(planned)  # not answered: sent again when the pod is warm again
                raise
            else:
                if reply is None:
                    entry.pending.clear()  # the data plane does not cache this model: nothing to fill
                elif reply.status != 200:
                    entry.failed += 1
                elif reply.source in ("cache", "coalesced"):
                    entry.from_cache += 1
                else:
                    entry.from_model += 1
            finally:
                entry.inflight -= 1
            if not entry.pending and not entry.inflight and entry.finished is None:
                entry.finished = time.time()
                log.info("cache filled for %s: %d answers from the caches, %d from the model server, %d failed",
                         planned.model, entry.from_cache, entry.from_model, entry.failed)

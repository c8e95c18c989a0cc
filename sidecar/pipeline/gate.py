"""The state gate: what happens to an inference call while the pod, or the call's model, is not warm.

``forward`` (default) sends it on (a model not loaded yet is then loaded in the background);
``hold`` waits until the pod and the model are warm, at most ``hold_timeout`` (and at most
``max_held`` calls at once), moving the model to the front of the loading queue, then sends it on
anyway (like Knative's activator); ``reject`` answers 503 with Retry-After. Warm-up's own replayed
calls never pass through here.

A model the model book does not track (the server never listed it) follows the pod alone.
"""

from __future__ import annotations

import asyncio

from ..config import GateConfig
from ..errors import Overloaded
from ..loading.book import ModelBook
from ..metrics import Metrics
from ..state import State, StateMachine
from .stage import Call, Next, Reply


class Gate:
    name = "gate"

    def __init__(self, cfg: GateConfig, machine: StateMachine, metrics: Metrics, book: ModelBook | None = None
                 ) -> None:
        self.cfg = cfg
        self.machine = machine
        self.metrics = metrics
        self.book = book or ModelBook()
        self.held = 0

    def __repr__(self) -> str:
        return f"<Gate policy={self.cfg.policy} state={self.machine.state} held={self.held}/{self.cfg.max_held}>"

    def _open_for(self, model: str) -> bool:
        state = self.machine.state
        # DRAINING still serves what arrives: the listener is closed, so these are in flight already.
        if state is State.DRAINING:
            return True
        return state is State.WARM and self.book.ready(model) is not False

    async def __call__(self, call: Call, next: Next) -> Reply:
        model = call.request.model
        self.book.touch(model)
        if self._open_for(model):
            return await next(call)
        if self.cfg.policy == "forward":
            self.book.want(model)  # a model not loaded yet is loaded (and warmed) behind this call
            return await next(call)
        if self.cfg.policy == "reject" or self.held >= self.cfg.max_held:
            self.metrics.gated.labels("rejected").inc()
            state = self.machine.state
            why = f"model {model} is not warm yet" if state is State.WARM else f"model server is {state.value}"
            raise Overloaded(f"{why}, not warm yet; retry later", self.cfg.retry_after)
        self.metrics.gated.labels("held").inc()
        self.held += 1
        try:
            self.book.want(model)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.cfg.hold_timeout
            await self.machine.wait_until(lambda m: m.state in (State.WARM, State.DRAINING), self.cfg.hold_timeout)
            await self.book.wait(lambda: self._open_for(model), max(0.0, deadline - loop.time()))
        finally:
            self.held -= 1  # a caller that gave up while held frees its place
        return await next(call)

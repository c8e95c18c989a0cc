"""The state gate: what happens to an inference call while the pod is not warm.

``forward`` (default) sends it on; ``hold`` waits for WARM up to ``hold_timeout`` and
then sends it on anyway (like Knative's activator); ``reject`` answers 503 with
Retry-After. Warm-up's own replayed calls never pass through here.
"""

from __future__ import annotations

from ..config import GateConfig
from ..errors import Overloaded
from ..metrics import Metrics
from ..state import State, StateMachine
from .stage import Call, Next, Reply


class Gate:
    name = "gate"

    def __init__(self, cfg: GateConfig, machine: StateMachine, metrics: Metrics) -> None:
        self.cfg = cfg
        self.machine = machine
        self.metrics = metrics
        self.held = 0

    def __repr__(self) -> str:
        return f"<Gate policy={self.cfg.policy} state={self.machine.state} held={self.held}/{self.cfg.max_held}>"

    async def __call__(self, call: Call, next: Next) -> Reply:
        state = self.machine.state
        # DRAINING still serves what arrives: the listener is closed, so these are in flight already.
        if state is State.WARM or state is State.DRAINING or self.cfg.policy == "forward":
            return await next(call)
        if self.cfg.policy == "reject" or self.held >= self.cfg.max_held:
            self.metrics.gated.labels("rejected").inc()
            raise Overloaded(f"model server is {state.value}, not warm yet; retry later", self.cfg.retry_after)
        self.metrics.gated.labels("held").inc()
        self.held += 1
        try:
            await self.machine.wait_until(lambda m: m.state in (State.WARM, State.DRAINING), self.cfg.hold_timeout)
        finally:
            self.held -= 1  # a caller that gave up while held frees its place
        return await next(call)

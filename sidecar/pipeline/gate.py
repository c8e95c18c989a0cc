"""The state gate: what happens to an inference call while the pod, or the call's model, is not warm.

``forward`` (default) sends it on (a model not loaded yet is then loaded in the background);
``hold`` waits until the pod and the model are warm, at most ``hold_timeout`` (and at most
``max_held`` calls at once), moving the model to the front of the loading queue, then sends it on
anyway (like Knative's activator); ``reject`` answers 503 with Retry-After. Warm-up's own replayed
calls never pass through here.

A model the model book does not track (the server never listed it) follows the pod alone. The gate
reads the control plane's latest snapshot (``planes.View``) and tells it which models callers want.
"""

from __future__ import annotations

from ..calls import Call, Reply
from ..config import GateConfig
from ..errors import Overloaded
from ..metrics import Metrics
from ..planes import Observations, Snapshot, View
from ..state import State
from .stage import Next


class Gate:
    name = "gate"

    def __init__(self, cfg: GateConfig, view: View, observations: Observations, metrics: Metrics) -> None:
        self.cfg = cfg
        self.view = view
        self.observations = observations
        self.metrics = metrics
        self.held = 0

    def __repr__(self) -> str:
        return f"<Gate policy={self.cfg.policy} state={self.view.snapshot.state} held={self.held}/{self.cfg.max_held}>"

    @staticmethod
    def _open_for(snapshot: Snapshot, model: str) -> bool:
        state = snapshot.state
        # DRAINING still serves what arrives: the listener is closed, so these are in flight already.
        if state is State.DRAINING:
            return True
        return state is State.WARM and snapshot.model_ready(model) is not False

    async def __call__(self, call: Call, next: Next) -> Reply:
        model = call.request.model
        self.observations.touched(model)
        if self._open_for(self.view.snapshot, model):
            return await next(call)
        if self.cfg.policy == "forward":
            self.observations.wanted(model)  # a model not loaded yet is loaded (and warmed) behind this call
            return await next(call)
        if self.cfg.policy == "reject" or self.held >= self.cfg.max_held:
            self.metrics.gated.labels("rejected").inc()
            state = self.view.snapshot.state
            why = f"model {model} is not warm yet" if state is State.WARM else f"model server is {state.value}"
            raise Overloaded(f"{why}, not warm yet; retry later", self.cfg.retry_after)
        self.metrics.gated.labels("held").inc()
        self.held += 1
        try:
            self.observations.wanted(model)
            await self.view.until(lambda s: self._open_for(s, model), self.cfg.hold_timeout)
        finally:
            self.held -= 1  # a caller that gave up while held frees its place
        return await next(call)

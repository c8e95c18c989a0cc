"""Runs warm-up when the state machine enters WARMING: plan from the store, replay, report.

Holds the last plan and report for the /status page and `sidecar plan`.
"""

from __future__ import annotations

import logging

from ..config import Config
from ..errors import SidecarError
from ..metrics import Metrics
from ..pipeline.stage import Next
from ..protocols.request import Protocol
from ..state import StateMachine
from ..upstream.http import HttpUpstream
from .planner import Plan, Planner
from .replayer import Replayer, WarmupReport
from .store import TrafficStore

log = logging.getLogger("sidecar.warmup")


class Warmer:
    def __init__(self, cfg: Config, store: TrafficStore, client: HttpUpstream, machine: StateMachine,
                 metrics: Metrics, send: Next | None = None) -> None:
        """``send``: where replayed calls enter the pipeline (the response cache, so its answers fill it);
        by default straight to the model server."""
        self.cfg = cfg
        self.client = client
        self.machine = machine
        self.metrics = metrics
        self.planner = Planner(cfg, store, self.max_batch_of)
        self.replayer = Replayer(cfg.warmup, send or client.send, metrics, cfg.upstream.timeout,
                                 on_progress=self._progress)
        self.plan = Plan()
        self.report: WarmupReport | None = None
        self.runs = 0

    def __repr__(self) -> str:
        return f"<Warmer runs={self.runs} plan={self.plan.total_calls} calls>"

    async def __call__(self, protocol: str) -> bool:
        """One warm-up of a ``triton`` or ``tfserving`` upstream; True when the pod may report ready."""
        if not self.cfg.warmup.enabled:
            return True
        self.runs += 1
        self._progress(0.0)
        try:
            self.plan = await self.planner.build(protocol)
            log.info("warm-up %d: %s", self.runs, self.plan.render().strip())
            self.report = await self.replayer.run(self.plan)
        except (SidecarError, OSError, ValueError) as e:
            # The store or the model server failed us: warm-up is best effort unless it is required.
            self.metrics.warmup_incomplete.inc()
            log.warning("warm-up %d could not run (%s)", self.runs, getattr(e, "message", type(e).__name__))
            return not self.cfg.warmup.require_complete
        log.info("warm-up %d done: %s", self.runs, self.report.render().strip())
        return self.report.complete or not self.cfg.warmup.require_complete

    def _progress(self, value: float) -> None:
        self.machine.progress = value  # the gauge reads it from there

    async def max_batch_of(self, model: str, protocol: Protocol) -> int | None:
        """The model's largest batch, from the model server's own metadata; None when unknown."""
        try:
            if protocol is Protocol.TFSERVING_REST:
                status, body = await self.client.probe(f"/v1/models/{model}/metadata", 5.0)
                return self.cfg.warmup.max_batch if status == 200 and _tf_has_batch_dim(body) else None
            status, body = await self.client.probe(f"/v2/models/{model}/config", 5.0)
        except Exception as e:  # metadata is a hint for the sweep; warm-up goes on without it
            log.info("no metadata for %s (%s); shape sweep skipped", model, e)
            return None
        if status == 200 and isinstance(body, dict) and isinstance(body.get("max_batch_size"), int):
            return int(body["max_batch_size"])
        return None


def _tf_has_batch_dim(body: object) -> bool:
    """TF Serving metadata: does some input of some signature have a leading -1 dimension?"""
    try:
        signatures = body["metadata"]["signature_def"]["signature_def"]  # type: ignore[index]
        for sig in signatures.values():
            for tensor in sig.get("inputs", {}).values():
                dims = tensor.get("tensor_shape", {}).get("dim", [])
                if dims and str(dims[0].get("size")) == "-1":
                    return True
    except (KeyError, TypeError, AttributeError):
        return False
    return False

"""Runs warm-up when the state machine enters WARMING: plan from the store, replay, report.

Holds the last plan and report for the /status page and `sidecar plan`.
"""

from __future__ import annotations

import logging

from ..config import Config
from ..errors import SidecarError
from ..metrics import Metrics
from ..pipeline.latency import LatencyModel
from ..pipeline.stage import Next
from ..protocols.request import Protocol
from ..state import StateMachine
from ..upstream.http import HttpUpstream
from ..upstream.models import ModelCatalog
from .planner import Plan, Planner
from .replayer import Replayer, WarmupReport
from .store import TrafficStore

log = logging.getLogger("sidecar.warmup")


class Warmer:
    def __init__(self, cfg: Config, store: TrafficStore, client: HttpUpstream, machine: StateMachine,
                 metrics: Metrics, send: Next | None = None, catalog: ModelCatalog | None = None,
                 latency: LatencyModel | None = None) -> None:
        """``send``: where replayed calls enter the pipeline (the response cache, so its answers fill it);
        by default straight to the model server."""
        self.cfg = cfg
        self.client = client
        self.catalog = catalog or ModelCatalog(client, cfg.warmup.max_batch)
        self.latency = latency
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
        if self.latency is not None:
            for group in self.report.groups.values():
                if group.passes and group.batch:
                    self.latency.observe(group.model, group.batch, group.passes[-1])
        return self.report.complete or not self.cfg.warmup.require_complete

    def _progress(self, value: float) -> None:
        self.machine.progress = value  # the gauge reads it from there

    async def max_batch_of(self, model: str, protocol: Protocol) -> int | None:
        """The model's largest batch, from the model server's own configuration; None when unknown."""
        return (await self.catalog.info(model, protocol)).max_batch

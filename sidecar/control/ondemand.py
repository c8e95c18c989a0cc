"""After the first warm-up: load (and warm) the models callers wait for; unload idle ones (optional).

A call for a model that is not loaded, under ``gate.policy=hold``, marks the model wanted (the gate
does it); while a warm-up runs, that warm-up takes wanted models first; after it, this loop does.
With ``models.idle_unload``, a model the sidecar loaded itself that had no call for that long is
unloaded, and loaded again (with its warm-up) when wanted: ModelMesh-style. Models the operator
loaded are never unloaded behind their back.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from ..config import ModelsConfig
from ..loading.book import ModelBook, ModelState
from .warmer import Warmer

log = logging.getLogger("sidecar.loading")

_TICK = 5.0  # seconds between idle checks at most


class WarmingSource(Protocol):
    protocol: str

    @property
    def warming(self) -> bool: ...


class OnDemandLoader:
    def __init__(self, cfg: ModelsConfig, warmer: Warmer, book: ModelBook, monitor: WarmingSource) -> None:
        self.cfg = cfg
        self.warmer = warmer
        self.book = book
        self.monitor = monitor
        self.unloaded = 0

    def __repr__(self) -> str:
        return f"<OnDemandLoader idle_unload={self.cfg.idle_unload} unloaded={self.unloaded}>"

    async def run(self) -> None:
        tick = min(_TICK, self.cfg.idle_unload / 4) if self.cfg.idle_unload else _TICK
        while True:
            await self.book.wait(self._work_waiting, tick)
            if self.monitor.warming:
                continue  # the running warm-up takes wanted models first itself
            pending = [n for n, e in self.book.models.items() if e.state is ModelState.UNLOADED]
            wanted = self.book.next_wanted(pending)
            if wanted is not None:
                log.info("loading model %s on demand", wanted)
                await self.warmer.rebuild_model_plan(self.monitor.protocol or "triton", wanted)
                await self.warmer.warm_model(wanted)
            if self.cfg.idle_unload:
                await self._unload_idle()

    def _work_waiting(self) -> bool:
        return not self.monitor.warming and self.book.wants(ModelState.UNLOADED)

    async def _unload_idle(self) -> None:
        cutoff = time.monotonic() - self.cfg.idle_unload
        for entry in list(self.book.models.values()):
            if entry.loaded_by_sidecar and entry.state is ModelState.WARM and entry.last_call < cutoff:
                why = await self.warmer.repository.unload(entry.name)
                if why:
                    log.warning("unloading idle model %s failed: %s", entry.name, why)
                    continue
                log.info("model %s unloaded after %.0f s without a call", entry.name, self.cfg.idle_unload)
                self.book.set(entry.name, ModelState.UNLOADED)
                self.unloaded += 1

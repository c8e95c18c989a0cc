"""Supervised background tasks: a crash is logged, counted and the task restarted, never left dead.

Readiness must never freeze in a stale state because the task that moves it died; so every
long-running task (upstream monitor, recorder, warmer) runs under the supervisor, which restarts it
with a capped exponential backoff and counts ``sidecar_task_restarts_total{task}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from .logs import where
from .metrics import Metrics

log = logging.getLogger("sidecar.supervise")

_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 5.0


class Supervisor:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.restarts: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<Supervisor tasks={sorted(self._tasks)} restarts={self.restarts}>"

    def spawn(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run ``run()`` until it returns; restart it whenever it raises."""
        self._tasks[name] = asyncio.create_task(self._keep(name, run), name=name)

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        backoff = _FIRST_BACKOFF
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self.metrics.task_restarts.labels(name).inc()
                # The exception type and where it happened; never its message, which may quote the data.
                log.error("background task %s failed (%s), restarting in %.2f s\n%s", name, type(e).__name__,
                          backoff, where(e))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def alive(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

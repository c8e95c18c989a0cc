"""The one state machine every readiness signal is derived from.

    STARTING -> LOADING -> WARMING -> WARM
       ^                                |
       +-------- COLD <-----------------+      any state -> DRAINING (final)

Probes, the data-port health paths, gRPC health and the state gauge all read
``StateMachine``; nothing else decides readiness.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable

log = logging.getLogger("sidecar.state")


class State(enum.StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    WARMING = "warming"
    WARM = "warm"
    COLD = "cold"
    DRAINING = "draining"


_ALLOWED: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.LOADING, State.WARMING, State.COLD}),
    State.LOADING: frozenset({State.WARMING, State.COLD, State.STARTING}),
    State.WARMING: frozenset({State.WARM, State.COLD, State.LOADING}),
    State.WARM: frozenset({State.COLD, State.LOADING}),
    State.COLD: frozenset({State.LOADING, State.WARMING}),
    State.DRAINING: frozenset(),
}
for _s in State:
    if _s is not State.DRAINING:
        _ALLOWED[_s] = _ALLOWED[_s] | {State.DRAINING}


class StateMachine:
    def __init__(self, on_change: Callable[[State], None] | None = None) -> None:
        self.state = State.STARTING
        self.since = time.time()
        self.reason = "sidecar started"
        self._progress = 0.0
        self._changed = asyncio.Event()
        self._on_change = on_change
        self._listeners: list[Callable[[State], None]] = []
        self._progress_listeners: list[Callable[[float], None]] = []

    def __repr__(self) -> str:
        return f"<StateMachine {self.state} since={self.since:.0f} reason={self.reason!r}>"

    def to(self, new: State, reason: str) -> bool:
        """Move to ``new`` if the diagram allows it; returns whether it moved."""
        if new is self.state:
            return False
        if new not in _ALLOWED[self.state]:
            log.debug("ignored transition %s -> %s (%s)", self.state, new, reason)
            return False
        log.info("state %s -> %s: %s", self.state, new, reason)
        self.state, self.since, self.reason = new, time.time(), reason
        if new is State.WARM:
            self.progress = 1.0
        elif new in (State.COLD, State.STARTING, State.LOADING):
            self.progress = 0.0
        # Wake every waiter, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change:
            self._on_change(new)
        for listener in self._listeners:
            listener(new)
        return True

    def subscribe(self, listener: Callable[[State], None]) -> None:
        """``listener(new_state)`` after every change (gRPC health watchers wake on it)."""
        self._listeners.append(listener)

    @property
    def progress(self) -> float:
        """Warm-up progress, 0..1: 1 when WARM, 0 before warming."""
        return self._progress

    @progress.setter
    def progress(self, value: float) -> None:
        if value == self._progress:
            return
        self._progress = value
        for listener in self._progress_listeners:  # the data planes' load reports carry it
            listener(value)

    def subscribe_progress(self, listener: Callable[[float], None]) -> None:
        self._progress_listeners.append(listener)

    @property
    def live(self) -> bool:
        return True

    @property
    def started(self) -> bool:
        """k8s startupProbe: the model server is up and the sidecar has begun warming."""
        return self.state in (State.WARMING, State.WARM, State.DRAINING)

    @property
    def ready(self) -> bool:
        return self.state is State.WARM

    async def wait_until(self, predicate: Callable[[StateMachine], bool], timeout: float) -> bool:
        """Wait for a state change that satisfies ``predicate``; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return predicate(self)
        return True

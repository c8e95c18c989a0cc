"""The narrow interface between the control plane and the data plane(s).

The control plane (``control/``) owns what the pod knows: the state machine, the model book, what the
model server has loaded and restricts, flushes, warm-up's latencies. It publishes that as one immutable
:class:`Snapshot` at every change. A data plane (fronts, edge, stages, upstream clients) reads only the
latest snapshot, and hands back what it observes through :class:`Observations`: calls seen (for the
traffic memory), batch shapes, models wanted or touched, failures of the model server, restriction
keys the server named, model loads through the data port.

The control plane asks a data plane for four things more (:class:`DataSide`): to replay a warm-up call
through its cache, to fill its cache with a recorded call, a report of what its cache and batcher hold, and
the demand it served (:class:`Demand`).
Nothing else crosses: the two never import each other, only this module. In one process a
:class:`Link` carries both directions by plain calls. Both are plain data and one-way calls, so data-plane
workers in other processes (``workers`` > 1) take the same messages over a socket (``sidecar/workers``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .calls import Call, Reply
from .state import State


@dataclass(frozen=True, slots=True)
class Snapshot:
    seq: int = 0
    state: State = State.STARTING
    progress: float = 0.0
    reason: str = ""
    protocol: str = ""  # the model server's ("triton" | "tfserving"), "" until known
    # Per-model readiness of the models the book tracks (a model absent here follows the pod).
    models: Mapping[str, bool] = field(default_factory=dict)
    known_models: frozenset[str] = frozenset()  # every model name the server lists
    loaded: frozenset[tuple[str, str]] | None = None  # (model, version) the server has loaded
    restarts: int = 0  # the server came back after being lost: every model reloaded
    flushes: Mapping[str, int] = field(default_factory=dict)  # cache flushes per model (admin, reloads)
    flush_all: int = 0  # flushes of every model
    fleet_epochs: Mapping[str, int] = field(default_factory=dict)  # the Redis tier's epochs, as last read
    fleet_epoch: int = 0
    learned: tuple[bytes, bytes] = (b"", b"")  # restriction keys the server named (HTTP header, gRPC key)
    restrictions_known: bool = False  # the server was asked what it restricts since it came up
    latencies: Mapping[str, Mapping[int, float]] = field(default_factory=dict)  # warm-up's, per batch size

    @property
    def ready(self) -> bool:
        return self.state is State.WARM

    def model_ready(self, name: str) -> bool | None:
        """True when warm, False when tracked and not warm, None when not tracked (follow the pod)."""
        return self.models.get(name)


class Observations(Protocol):
    """What a data plane tells the control plane; each call returns at once and never fails."""

    def seen(self, call: Call, count: int = 1) -> None:
        """A call the model server answered, ``count`` times (the recorder's input)."""

    def batched(self, model: str, shape: str, size: int) -> None:
        """A batch size that reached the model server."""

    def touched(self, model: str) -> None:
        """A call for ``model`` arrived (idle unloading)."""

    def wanted(self, model: str) -> None:
        """A caller waits for ``model``: load it first."""

    def upstream_failed(self) -> None:
        """The model server failed a call: check its health now."""

    def model_changed(self, model: str) -> None:
        """``model`` was loaded or unloaded through the data port: its answers are stale."""

    def restriction_named(self, http_header: bytes, grpc_key: bytes) -> None:
        """The model server refused a call naming a restriction key (either may be b"")."""

    def model_known(self, model: str) -> None:
        """The model server answered a call for ``model``: it exists (a metrics label; a worker's own learning)."""

    def answers_changed(self, model: str) -> None:
        """``model`` answers otherwise than when its answers were cached (a worker saw its fingerprint move): every
        worker of this pod forgets them (the fleet's are under another fingerprint already)."""


INFERENCE_ROUTES = frozenset({"infer", "predict", "classify", "regress"})  # metrics route labels of inference


@dataclass(frozen=True, slots=True)
class Demand:
    """The inference calls a data plane answered: running totals per model (since it started) and calls per
    second over the last seconds. The control plane's history and capacity read these."""

    totals: Mapping[str, float] = field(default_factory=dict)
    rates: Mapping[str, float] = field(default_factory=dict)


class DataSide(Protocol):
    """What the control plane may ask of the data plane(s), besides what they observe."""

    async def replay(self, call: Call) -> Reply:
        """Send a warm-up call through the data plane's cache (its answer fills the cache)."""

    async def fill(self, call: Call) -> Reply | None:
        """Fill the cache with ``call``'s answer: from a cache if one holds it, else from the model server (through
        the batcher, after live calls); None when the data plane does not cache the call's model."""

    def report(self) -> dict[str, Any]:
        """For /status: ``cache`` and ``batch`` (what they hold and learned)."""

    def demand(self) -> Demand:
        """Per-model inference totals and rates."""

    async def refresh(self) -> None:
        """Bring ``report`` and ``demand`` up to date (data planes in other processes are asked)."""

    def workers_report(self) -> dict[str, Any]:
        """For /status: the worker processes (``workers``): how many run, restarts."""


Listener = Callable[[Snapshot, Snapshot], None]  # (previous, current)


class View:
    """A data plane's view of the control plane: the latest snapshot, and a wake-up at each change."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.snapshot = snapshot or Snapshot()
        self._listeners: list[Listener] = []
        self._changed: asyncio.Event | None = None

    def __repr__(self) -> str:
        s = self.snapshot
        return f"<View seq={s.seq} {s.state} models={len(s.models)}>"

    def apply(self, snapshot: Snapshot) -> None:
        previous, self.snapshot = self.snapshot, snapshot
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
        for listener in self._listeners:
            listener(previous, snapshot)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def changed(self, timeout: float) -> bool:
        """Wait for the next snapshot; False when none came within ``timeout`` seconds."""
        if self._changed is None:
            self._changed = asyncio.Event()
        event = self._changed
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        return True

    async def until(self, predicate: Callable[[Snapshot], bool], timeout: float) -> bool:
        """Wait until ``predicate(snapshot)`` holds; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.snapshot):
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self.changed(remaining):
                return predicate(self.snapshot)
        return True


class Link:
    """Both directions in one process: the control plane publishes into ``view`` and attaches itself as
    the receiver of what data planes observe; a data plane reads the view and observes through the link
    (an :class:`Observations`), which passes each observation on."""

    def __init__(self) -> None:
        self.view = View()
        self._receiver: Observations | None = None
        self._seq = 0

    def __repr__(self) -> str:
        return f"<Link {self.view!r} attached={self._receiver is not None}>"

    def publish(self, snapshot: Snapshot) -> None:
        self._seq += 1
        self.view.apply(dataclasses.replace(snapshot, seq=self._seq))

    def attach(self, receiver: Observations) -> None:
        self._receiver = receiver
        # In one process the receiver's own methods answer from now on: one call less on every inference call.
        self.seen = receiver.seen  # type: ignore[method-assign]
        self.batched = receiver.batched  # type: ignore[method-assign]
        self.touched = receiver.touched  # type: ignore[method-assign]

    # Observations, passed on (before the control plane attached there is nobody to tell: it starts first).

    def seen(self, call: Call, count: int = 1) -> None:
        if self._receiver is not None:
            self._receiver.seen(call, count)

    def batched(self, model: str, shape: str, size: int) -> None:
        if self._receiver is not None:
            self._receiver.batched(model, shape, size)

    def touched(self, model: str) -> None:
        if self._receiver is not None:
            self._receiver.touched(model)

    def wanted(self, model: str) -> None:
        if self._receiver is not None:
            self._receiver.wanted(model)

    def upstream_failed(self) -> None:
        if self._receiver is not None:
            self._receiver.upstream_failed()

    def model_changed(self, model: str) -> None:
        if self._receiver is not None:
            self._receiver.model_changed(model)

    def restriction_named(self, http_header: bytes, grpc_key: bytes) -> None:
        if self._receiver is not None:
            self._receiver.restriction_named(http_header, grpc_key)

    def model_known(self, model: str) -> None:
        if self._receiver is not None:
            self._receiver.model_known(model)

    def answers_changed(self, model: str) -> None:
        if self._receiver is not None:
            self._receiver.answers_changed(model)

"""Each model's own load and warm state: the one source for per-model readiness.

The pod's state machine says whether the pod takes traffic; this book says, per model, whether that
model is loaded and warm. A model's readiness paths (HTTP ``/v2/models/{m}/ready``, gRPC
``ModelReady``, the health service per model) and the gate's per-model decisions read it. A model the
book does not track (the server has never listed it) follows the pod.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.metrics_core import GaugeMetricFamily, Metric


class ModelState(enum.StrEnum):
    UNLOADED = "unloaded"  # known to the server's repository, not loaded
    QUEUED = "queued"  # loaded (or to be loaded), waiting for its turn to warm
    LOADING = "loading"
    WARMING = "warming"
    WARM = "warm"
    FAILED = "failed"  # its load failed; the server answers for it as it would


@dataclass
class ModelEntry:
    name: str
    share: float = 0.0
    state: ModelState = ModelState.QUEUED
    since: float = field(default_factory=time.time)
    began: float | None = None  # when its load (or warm-up) began
    warm_seconds: float | None = None  # from the start of its load (or warm-up) to warm
    loaded_by_sidecar: bool = False
    last_call: float = field(default_factory=time.monotonic)
    reason: str = ""


class ModelBook:
    def __init__(self, serving: Callable[[], bool] = lambda: True) -> None:
        # Whether the model server can be serving at all now (the pod warming or warm): a model the book
        # says is warm is not ready while the server is down or restarting, or the pod drains.
        self.serving = serving
        self.models: dict[str, ModelEntry] = {}
        self._changed = asyncio.Event()
        self._wanted: list[str] = []  # models callers wait for, most recent first
        self._listeners: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        warm = sum(e.state is ModelState.WARM for e in self.models.values())
        return f"<ModelBook {warm}/{len(self.models)} warm>"

    def track(self, names: Iterable[str], state: ModelState = ModelState.QUEUED) -> None:
        for name in names:
            if name not in self.models:
                self.models[name] = ModelEntry(name, state=state)

    def forget_all(self) -> None:
        """The server restarted: every model is cold again (and tracked anew as the server lists them)."""
        self.models.clear()
        self._wake()

    def set(self, name: str, state: ModelState, reason: str = "") -> None:
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = ModelEntry(name)
        if state in (ModelState.LOADING, ModelState.WARMING) and entry.began is None:
            entry.began = time.monotonic()
        if state is ModelState.WARM and entry.state is not ModelState.WARM:
            if entry.began is not None:
                entry.warm_seconds = time.monotonic() - entry.began
            entry.last_call = time.monotonic()  # idle time counts from warm, not from before its (re)load
        if state is ModelState.UNLOADED:
            entry.began = None
        entry.state, entry.since, entry.reason = state, time.time(), reason
        if state is not ModelState.UNLOADED and state is not ModelState.QUEUED and name in self._wanted:
            self._wanted.remove(name)  # being loaded, warm, or failed: the want is answered
        self._wake()

    def ready(self, name: str) -> bool | None:
        """True when warm, False when tracked and not warm, None when not tracked (follow the pod)."""
        entry = self.models.get(name)
        if entry is None:
            return None
        return (entry.state is ModelState.WARM or entry.state is ModelState.FAILED) and self.serving()

    def touch(self, name: str) -> None:
        entry = self.models.get(name)
        if entry is not None:
            entry.last_call = time.monotonic()

    def want(self, name: str) -> None:
        """A caller waits for this model: it goes to the front of the loading queue."""
        if name in self.models and self.models[name].state is not ModelState.WARM:
            if name in self._wanted:
                self._wanted.remove(name)
            self._wanted.insert(0, name)
            self._wake()

    @property
    def wanted(self) -> list[str]:
        return list(self._wanted)

    def wants(self, state: ModelState) -> bool:
        """Some model callers wait for is in ``state`` (one a loader can act on)."""
        return any((e := self.models.get(n)) is not None and e.state is state for n in self._wanted)

    def next_wanted(self, pending: list[str]) -> str | None:
        for name in self._wanted:
            if name in pending:
                self._wanted.remove(name)
                return name
        return None

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (woken by every change) until ``predicate()`` holds; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            changed = self._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                return predicate()
        return True

    def subscribe(self, listener: Callable[[], None]) -> None:
        """``listener()`` after every change (gRPC health watchers wake on it)."""
        self._listeners.append(listener)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self._listeners:
            listener()

    def report(self) -> dict[str, dict[str, object]]:
        """For /status: each model's share, state, since when, and time to warm."""
        return {name: {"share": round(e.share, 4), "state": e.state.value, "since": round(e.since, 3),
                       "warm_seconds": None if e.warm_seconds is None else round(e.warm_seconds, 3),
                       "loaded_by_sidecar": e.loaded_by_sidecar, "reason": e.reason}
                for name, e in sorted(self.models.items(), key=lambda kv: -kv[1].share)}

    def shares_warm(self) -> float:
        """The part of recorded traffic whose models are warm (or whose load failed: nothing to wait for)."""
        total = sum(e.share for e in self.models.values())
        if total <= 0:
            done = sum(self.ready(n) is True for n in self.models)
            return done / len(self.models) if self.models else 1.0
        return sum(e.share for e in self.models.values() if self.ready(e.name)) / total


class BookCollector:
    """``sidecar_model_state{model,state}``, ``sidecar_model_warm_seconds{model}`` and ``sidecar_model_share``,
    read from the book at scrape time (model names are the server's own: the book only tracks those)."""

    def __init__(self, book: ModelBook) -> None:
        self.book = book

    def describe(self) -> Iterator[Metric]:
        return iter(self._families({}))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.book.models))

    @staticmethod
    def _families(models: dict[str, ModelEntry]) -> list[Metric]:
        state = GaugeMetricFamily("sidecar_model_state", "1 for each model's current load/warm state",
                                  labels=["model", "state"])
        warm = GaugeMetricFamily("sidecar_model_warm_seconds", "Seconds from a model's load (or warm-up) start "
                                 "to warm", labels=["model"])
        share = GaugeMetricFamily("sidecar_model_share", "A model's share of recorded traffic", labels=["model"])
        for name, entry in sorted(models.items()):
            for s in ModelState:
                state.add_metric([name, s.value], 1.0 if entry.state is s else 0.0)
            if entry.warm_seconds is not None:
                warm.add_metric([name], entry.warm_seconds)
            share.add_metric([name], entry.share)
        return [state, warm, share]

"""Watches the model server and drives the state machine.

The model server is another process, so its health can only be learnt by asking;
the monitor asks every ``health_interval`` seconds while it is ready, every
``unready_interval`` while it is not (starting, loading, restarting), and at once
when the data path has just seen a ready upstream fail (``poke``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable

from ..config import UpstreamConfig
from ..errors import SidecarError
from ..logs import where
from ..metrics import Metrics
from ..state import State, StateMachine
from ..upstream.http import HttpUpstream

log = logging.getLogger("sidecar.health")
_LOG_EVERY = 60.0  # seconds between repeated warnings about the same problem
_RETRY_MAX = 300.0  # seconds between attempts of a warm-up, at most
_POKE_GAP = 0.1  # seconds from one check to an early one a poke asks for, at least

# (upstream protocol, called once the ready share is warm) -> True: the pod may report ready
Warmer = Callable[[str, Callable[[], None]], Awaitable[bool]]


class Health(enum.Enum):
    DOWN = "down"  # no answer at all
    LIVE = "live"  # answers, models not ready
    READY = "ready"


class UpstreamMonitor:
    def __init__(
        self,
        client: HttpUpstream,
        cfg: UpstreamConfig,
        machine: StateMachine,
        metrics: Metrics,
        warmer: Warmer | None = None,
        retry_interval: float = 5.0,
        own_loading: Callable[[], bool] = lambda: False,
        own_models: Callable[[], set[str]] = set,
    ) -> None:
        self.client = client
        self.cfg = cfg
        self.machine = machine
        self.metrics = metrics
        self.warmer = warmer
        self.retry_interval = retry_interval
        # Layered loading: whether the sidecar is loading a model now, and the models it loaded itself.
        self.own_loading = own_loading
        self.own_models = own_models
        self.protocol = cfg.protocol if cfg.protocol != "auto" else ""
        self.last = Health.DOWN
        # What the server has loaded, (model, version) pairs; None until first seen ready.
        self.loaded: frozenset[tuple[str, str]] | None = None
        self._new_load = ""
        self._on_loaded: list[Callable[[frozenset[tuple[str, str]]], None]] = []
        self._on_restart: list[Callable[[], None]] = []
        self._seen_ready = False
        self._lost = False
        self.problem = "not checked yet"
        self.retry_in = 0.0
        self._logged_at = -_LOG_EVERY
        self._poke = asyncio.Event()
        self._warming: asyncio.Task[None] | None = None
        self._rewarming: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<UpstreamMonitor {self.client.base} protocol={self.protocol or '?'} last={self.last.value}>"

    def poke(self) -> None:
        """Ask for a check now (the data path just saw the upstream fail)."""
        self._poke.set()

    async def run(self) -> None:
        while self.machine.state is not State.DRAINING:
            health = await self.check()
            self.apply(health)
            await self._pause(health)

    async def _pause(self, health: Health) -> None:
        """Wait ``health_interval`` before the next check; while the server is not ready, ``unready_interval``
        (launch-to-ready is what a new pod is judged by, and a check of a server not listening yet is one refused
        connect). A poke cuts it short only while the server looks ready: that is when a failure
        the data path saw is news. While the server is down every failing call pokes, and a check per call would
        probe a dead server back to back. A burst of pokes costs one early check, no sooner than ``_POKE_GAP``
        after the last."""
        loop = asyncio.get_running_loop()
        interval = self.cfg.health_interval
        checked = loop.time()
        if health is Health.READY:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._poke.wait()
                    await asyncio.sleep(checked + min(interval, _POKE_GAP) - loop.time())
        else:
            await asyncio.sleep(min(interval, self.cfg.unready_interval))
        self._poke.clear()

    async def stop(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warming

    async def check(self) -> Health:
        timeout = min(self.cfg.health_interval, self.cfg.connect_timeout, 2.0)
        try:
            if not self.protocol:
                self.protocol = await self._detect(timeout)
            if self.protocol == "triton":
                health = await self._check_triton(timeout)
            else:
                health = await self._check_tfserving(timeout)
        except SidecarError as e:
            self._problem(e.message)
            return Health.DOWN
        except Exception as e:  # an answer that is not Triton's or TF Serving's: not a usable model server
            self._problem(f"unexpected answer from the model server ({type(e).__name__})")
            return Health.DOWN
        if health is Health.READY:
            self.problem = ""
        elif health is Health.LIVE:
            self._problem("model server up, models not ready")
        return health

    def _problem(self, why: str) -> None:
        """Remember why the model server is not ready; log it once, then at most every minute."""
        now = time.monotonic()
        if why != self.problem or now - self._logged_at >= _LOG_EVERY:
            log.warning("model server %s: %s", self.client.base, why)
            self._logged_at = now
        self.problem = why

    async def _detect(self, timeout: float) -> str:
        protocol = await detect_protocol(self.client, timeout)
        log.info("upstream protocol detected: %s", protocol)
        return protocol

    async def _check_triton(self, timeout: float) -> Health:
        status, _ = await self.client.probe("/v2/health/ready", timeout)
        if status == 200:
            status, index = await self.client.probe("/v2/repository/index", timeout, "POST")
            if status == 200:  # the repository API may be disabled (or restricted): then loads are not tracked
                self._observe_loaded(ready_versions(index))
                self.metrics.known_models.update(model_names(index))
            return Health.READY
        live, _ = await self.client.probe("/v2/health/live", timeout)
        if live == 200 and self.own_loading():
            # Triton reports itself not ready while any model loads - here one the sidecar is loading: the
            # server has not lost readiness, it is doing what the sidecar asked.
            return Health.READY
        return Health.LIVE if live == 200 else Health.DOWN

    async def _check_tfserving(self, timeout: float) -> Health:
        if not self.cfg.models:
            # TF Serving has no server-wide health path: any answer means it is up.
            await self.client.probe("/v1/models/_sidecar_probe", timeout)
            return Health.READY
        loaded: set[tuple[str, str]] = set()
        for model in self.cfg.models:
            status, body = await self.client.probe(f"/v1/models/{model}", timeout)
            if status != 200 or not model_available(body):
                return Health.LIVE
            loaded.update((model, version) for version in available_versions(body))
        self._observe_loaded(frozenset(loaded))
        return Health.READY

    def _observe_loaded(self, loaded: frozenset[tuple[str, str]]) -> None:
        """A model version the server did not have before is cold, even if the server never went down
        (Triton's repository polling or load API, a TF Serving version roll-over)."""
        new = loaded - self.loaded if self.loaded is not None else frozenset()
        own = self.own_models()
        new = frozenset((m, v) for m, v in new if m not in own)  # the sidecar's own loads warm as they load
        if new:
            self._new_load = ", ".join(f"{m} version {v}" for m, v in sorted(new))
        self.loaded = loaded
        for listener in self._on_loaded:
            listener(loaded)

    def subscribe(self, on_loaded: Callable[[frozenset[tuple[str, str]]], None],
                  on_restart: Callable[[], None]) -> None:
        """``on_loaded``: what the server has loaded, at every check that can tell; ``on_restart``: the
        server is ready again after it stopped answering or lost readiness (its models reloaded)."""
        self._on_loaded.append(on_loaded)
        self._on_restart.append(on_restart)

    def apply(self, health: Health) -> None:
        self.last = health
        self.metrics.upstream_ready.set(1 if health is Health.READY else 0)
        m = self.machine
        if health is not Health.READY:
            self.loaded = None  # a restarted server is cold anyway: what it loads next is not "new"
            self._lost = self._lost or self._seen_ready
        else:
            self._seen_ready = True
            if self._lost:
                self._lost = False
                for listener in self._on_restart:
                    listener()
            if self._new_load and m.state in (State.WARMING, State.WARM):
                m.to(State.COLD, f"model server loaded {self._new_load}")
                self._cancel_warming()
        self._new_load = ""
        if health is Health.DOWN:
            m.to(State.COLD if m.state in (State.WARMING, State.WARM, State.LOADING) else State.STARTING,
                 "model server not answering")
            self._cancel_warming()
        elif health is Health.LIVE:
            if m.state in (State.WARMING, State.WARM):
                m.to(State.COLD, "model server lost readiness")
                self._cancel_warming()
            m.to(State.LOADING, "model server up, models loading")
        elif m.state in (State.STARTING, State.LOADING, State.COLD) and m.to(State.WARMING, "model server ready"):
            self._warming = asyncio.create_task(self._warm())

    def rewarm(self) -> str:
        """Admin action: warm up again now. A warm pod stays ready while it replays (answers go to the cache);
        a pod still warming skips its backoff and tries at once."""
        m = self.machine
        if m.state is State.WARM and self.warmer is not None:
            if self._rewarming is None or self._rewarming.done():
                self._rewarming = asyncio.create_task(self._warm_again())
            return "replaying now; the pod stays ready"
        if m.state is State.WARMING:
            self._cancel_warming()
            self._warming = asyncio.create_task(self._warm())
            return "warming again now"
        return f"not warming: the pod is {m.state.value}"

    async def _warm_again(self) -> None:
        assert self.warmer is not None
        try:
            await self.warmer(self.protocol or "triton", lambda: None)
        except Exception as e:  # best effort: the pod is ready already
            log.warning("re-warm failed (%s)", type(e).__name__)

    @property
    def warming(self) -> bool:
        """A warm-up is running (it may continue in the background after the pod turned ready)."""
        return self._warming is not None and not self._warming.done()

    def _warm_enough(self) -> None:
        """The models carrying warmup.ready_share of traffic are warm: ready now, the rest warm behind."""
        if self.machine.state is State.WARMING:
            self.machine.to(State.WARM, "the ready share of traffic is warm; other models keep warming")

    def _cancel_warming(self) -> None:
        """The pod lost its warmth: a warm-up (or a re-warm replaying behind readiness) in flight stops."""
        for task in (self._warming, self._rewarming):
            if task is not None and not task.done():
                task.cancel()

    async def _warm(self) -> None:
        """Warm up until the warmer says the pod may be ready. A warm-up that fails (or, with
        ``warmup.require_complete``, does not converge) is tried again with backoff, never abandoned."""
        backoff = self.retry_interval
        attempt = 0
        while True:
            attempt += 1
            try:
                ready = True if self.warmer is None else await self.warmer(self.protocol or "triton",
                                                                          self._warm_enough)
            except SidecarError as e:
                log.warning("warm-up attempt %d failed: %s", attempt, e.message)
                ready = False
            except Exception as e:  # a bug must not leave the pod warming forever
                self.metrics.task_restarts.labels("warmer").inc()
                log.error("warm-up attempt %d failed (%s)\n%s", attempt, type(e).__name__, where(e))
                ready = False
            if ready or self.machine.state is State.WARM:  # ready by share already: the rest warmed behind it
                self.machine.to(State.WARM, "warm-up complete" if attempt == 1 else f"warm-up complete (attempt "
                                f"{attempt})")
                return
            self.retry_in = backoff
            self.machine.reason = f"warm-up attempt {attempt} incomplete; trying again in {backoff:g} s"
            await asyncio.sleep(backoff)
            self.retry_in = 0.0
            backoff = min(backoff * 2, _RETRY_MAX)


async def detect_protocol(client: HttpUpstream, timeout: float) -> str:
    """``triton`` when ``/v2/health/live`` answers 200, else ``tfserving``; raises when nothing answers."""
    status, _ = await client.probe("/v2/health/live", timeout)
    return "triton" if status == 200 else "tfserving"


def ready_versions(index: object) -> frozenset[tuple[str, str]]:
    """Triton's ``POST /v2/repository/index``: the (model, version) pairs that are READY."""
    if not isinstance(index, list):
        return frozenset()
    return frozenset(
        (str(entry.get("name")), str(entry.get("version", "")))
        for entry in index
        if isinstance(entry, dict) and entry.get("state") == "READY"
    )


def model_names(index: object) -> set[str]:
    """Every model Triton's repository index lists, loaded or not (the metric labels allowed)."""
    if not isinstance(index, list):
        return set()
    return {str(e["name"]) for e in index if isinstance(e, dict) and isinstance(e.get("name"), str)}


def available_versions(body: object) -> list[str]:
    """TF Serving's status: the versions AVAILABLE (none listed for KServe v1's ``{"ready": ...}``)."""
    states = body.get("model_version_status") if isinstance(body, dict) else None
    if not isinstance(states, list):
        return []
    return [str(s.get("version")) for s in states if isinstance(s, dict) and s.get("state") == "AVAILABLE"]


def model_available(body: object) -> bool:
    """TF Serving's ``model_version_status`` (some version AVAILABLE), or KServe v1's ``ready``.

    Any AVAILABLE version serves: during a version roll-over the old one reports END.
    """
    if not isinstance(body, dict):
        return False
    if "model_version_status" in body:
        states = body["model_version_status"]
        return isinstance(states, list) and any(
            isinstance(s, dict) and s.get("state") == "AVAILABLE" for s in states
        )
    return body.get("ready") is True

"""The control process's side of the workers: start them, tell them the state, hear what they saw, restart them.

Each worker is a ``python -m sidecar.workers.worker`` process with a socketpair to this one (a fresh
interpreter: nothing of the control process's threads, loop or connections is inherited). The pool is the
control plane's :class:`~sidecar.planes.DataSide`: warm-up replays and cache fills go to the workers in turn
(every worker shares the pod's one answer tier, so one worker's replay fills it for all); ``report`` and
``demand`` are the workers' last answers, asked every second and before each scrape.

A snapshot is sent to every worker as it is published: each applies it on receipt (a local socket, well
under the 100 ms a change may take to reach every worker). A worker that dies is started again at once
(after a crash loop, with a growing pause), counted in ``sidecar_worker_restarts_total``; its calls in
flight fail with it, the others' do not, and the pod stays ready while the rest serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import Metric

from ..cache import podtier
from ..calls import Call, Memo, Reply
from ..config import Config
from ..errors import ConfigError, UpstreamUnavailable
from ..metrics import Metrics, lasting, merge_families
from ..planes import Demand, Observations, Snapshot, View
from ..podload import PodLoad
from ..supervise import Supervisor
from .channel import Channel, ChannelClosed, call_out, encode, reply_in
from .merge import merge_demand, merge_reports
from .worker import Start

log = logging.getLogger("sidecar.workers")

START_TIMEOUT = 30.0  # seconds a worker may take to listen
STATE_TIMEOUT = 1.0  # seconds a worker may take to say what it holds
POLL_EVERY = 1.0
_QUICK_DEATH = 2.0  # a worker that dies sooner after its start is in a crash loop: wait before the next
_MAX_PAUSE = 5.0
_MISSED_MAX = 10  # state questions (one a second) a worker may leave unanswered in a row before it is killed
_OBSERVATIONS = frozenset({"seen", "batched", "touched", "wanted", "upstream_failed", "model_changed",
                           "restriction_named", "model_known", "answers_changed"})
# Said once however often it was repeated in a batch (the others are counted: calls seen, batches sent).
_ONCE = frozenset({"touched", "wanted", "upstream_failed", "restriction_named", "model_known", "answers_changed"})


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    channel: Channel
    started: float
    pid: int = 0
    ready: bool = False
    state: dict[str, Any] = field(default_factory=dict)  # its last answer to "state"
    asks: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    dropped: int = 0
    missed: int = 0  # state questions unanswered in a row
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class WorkerPool:
    def __init__(self, cfg: Config, metrics: Metrics, view: View, observations: Observations,
                 supervisor: Supervisor, count: int) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.view = view
        self.observations = observations
        self.supervisor = supervisor
        self.count = count
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self.shared_dir = ""
        self._load: PodLoad | None = None
        self._asks = itertools.count()
        self._turn = itertools.count()
        self._stopping = False
        self._draining = False
        self._retired: list[Metric] = []  # what dead workers counted
        self._retired_totals: dict[str, float] = {}
        self._pauses: dict[int, float] = {}
        view.subscribe(self._broadcast)
        metrics.sources.append(self._families)
        metrics.workers.set_function(lambda: sum(1 for w in self.workers.values() if w.ready))

    def __repr__(self) -> str:
        return f"<WorkerPool {len(self.workers)}/{self.count} restarts={self.restarts} dir={self.shared_dir}>"

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each listens; ConfigError (every worker stopped) when one cannot."""
        self.shared_dir = podtier.make_dir(self.cfg.cache.max_bytes)
        podtier.PodTier(self.shared_dir, self.cfg.cache.max_bytes).close()  # made once, before the workers open it
        self._load = PodLoad(os.path.join(self.shared_dir, "load"), self.count, 0)
        try:
            await asyncio.gather(*(self._start(i) for i in range(self.count)))
        except BaseException:
            await self.close()
            raise
        self.supervisor.spawn("workers-poll", self._poll)

    async def _start(self, index: int) -> None:
        parent, child = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "sidecar.workers.worker", str(child.fileno()), pass_fds=(child.fileno(),))
        finally:
            child.close()
        channel = await Channel.open(parent)
        loop = asyncio.get_running_loop()
        worker = self.workers[index] = _Worker(index, process, channel, loop.time())
        # From here on every snapshot published reaches it too, in order after this one.
        channel.send("start", Start(self.cfg, index, self.count, self.shared_dir, self.view.snapshot))
        try:
            message = await asyncio.wait_for(channel.receive(), START_TIMEOUT)
        except (ChannelClosed, TimeoutError):
            message = ("failed", f"worker {index} did not start (exit status {process.returncode})")
        if message[0] != "ready":
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            channel.close()
            if self.workers.get(index) is worker:
                del self.workers[index]
            raise ConfigError(str(message[1]))
        worker.pid, worker.ready = int(message[1]), True
        worker.tasks = [loop.create_task(self._read(worker)), loop.create_task(self._watch(worker))]
        if self._draining:
            channel.send("draining")  # started again while the pod drains

    async def _watch(self, worker: _Worker) -> None:
        status = await worker.process.wait()
        self._gone(worker)
        if self._stopping:
            return
        self.restarts += 1
        self.metrics.worker_restarts.inc()
        log.error("worker %d (pid %d) ended with status %s; starting it again", worker.index, worker.pid, status)
        loop = asyncio.get_running_loop()
        quick = loop.time() - worker.started < _QUICK_DEATH
        pause = min(_MAX_PAUSE, self._pauses.get(worker.index, 0.05) * 2) if quick else 0.0
        self._pauses[worker.index] = pause
        while not self._stopping:
            await asyncio.sleep(pause)
            try:
                await self._start(worker.index)
                return
            except Exception as e:  # tried again until it starts: the pod must not lose a worker for good
                log.error("worker %d could not start again (%s: %s)", worker.index, type(e).__name__, e)
                pause = min(_MAX_PAUSE, max(pause * 2, 0.1))

    def _gone(self, worker: _Worker) -> None:
        """A worker ended: its counters are kept, its calls in flight no longer count, its questions fail."""
        worker.ready = False
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self._retired = merge_families([self._retired, lasting(worker.state.get("metrics", []))])
        demand: Demand | None = worker.state.get("demand")
        for model, n in (demand.totals.items() if demand else ()):
            self._retired_totals[model] = self._retired_totals.get(model, 0.0) + n
        if self._load is not None:
            self._load.clear(worker.index)
        for future in worker.asks.values():
            if not future.done():
                future.set_exception(UpstreamUnavailable(f"worker {worker.index} ended"))
        worker.channel.close()
        for task in worker.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def draining(self) -> None:
        self._draining = True
        for worker in list(self.workers.values()):
            with contextlib.suppress(ChannelClosed):
                worker.channel.send("draining")

    async def stop(self, grace: float) -> None:
        """Every worker stops accepting and lets its calls finish for up to ``grace`` seconds."""
        self._stopping = True
        workers = list(self.workers.values())
        for worker in workers:
            with contextlib.suppress(ChannelClosed):
                worker.channel.send("stop", grace)
        waits = [asyncio.ensure_future(w.process.wait()) for w in workers]
        if waits:
            _, late = await asyncio.wait(waits, timeout=grace + 5.0)
            if late:
                log.warning("%d workers still running after the grace period; killing them", len(late))
                for worker in workers:
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
                await asyncio.wait(waits)

    async def close(self) -> None:
        """Release every resource; safe after a start that failed half-way."""
        self._stopping = True
        for worker in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGKILL)
            await worker.process.wait()
            self._gone(worker)
        if self._load is not None:
            self._load.close()
            self._load = None
        if self.shared_dir:
            podtier.remove_dir(self.shared_dir)

    @property
    def in_flight(self) -> int:
        return sum(int(w.state.get("in_flight", 0)) for w in self.workers.values())

    # -- down: snapshots, questions ----------------------------------------------------------------------------

    def _broadcast(self, _previous: Snapshot, current: Snapshot) -> None:
        frame = encode("snapshot", current)
        for worker in list(self.workers.values()):
            with contextlib.suppress(ChannelClosed):
                worker.channel.send_encoded(frame)

    async def _ask(self, worker: _Worker, kind: str, payload: Any, timeout: float | None = None) -> Any:
        ask = next(self._asks)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        worker.asks[ask] = future
        try:
            worker.channel.send("ask", ask, kind, payload)
            async with asyncio.timeout(timeout):
                return await future
        except ChannelClosed:
            raise UpstreamUnavailable(f"worker {worker.index} ended") from None
        finally:
            worker.asks.pop(ask, None)

    def _next(self) -> _Worker:
        ready = [w for w in self.workers.values() if w.ready]
        if not ready:
            raise UpstreamUnavailable("no data-plane worker is running")
        return ready[next(self._turn) % len(ready)]

    async def replay(self, call: Call) -> Reply:
        packed = await self._ask(self._next(), "replay", call_out(call, asyncio.get_running_loop().time()))
        reply = reply_in(packed, call)
        assert reply is not None
        return reply

    async def fill(self, call: Call) -> Reply | None:
        return reply_in(await self._ask(self._next(), "fill", call_out(call, asyncio.get_running_loop().time())),
                        call)

    async def refresh(self) -> None:
        """Ask every worker what it holds now (its report, demand and metrics)."""
        async def one(worker: _Worker) -> None:
            try:
                worker.state = await self._ask(worker, "state", None, STATE_TIMEOUT)
            except TimeoutError:
                self._unanswered(worker)
                return
            except UpstreamUnavailable:
                return
            worker.missed = 0
            dropped = int(worker.state.get("dropped", 0))
            if dropped > worker.dropped:
                self.metrics.worker_dropped.inc(dropped - worker.dropped)
                worker.dropped = dropped

        await asyncio.gather(*(one(w) for w in list(self.workers.values()) if w.ready))

    def _unanswered(self, worker: _Worker) -> None:
        """A worker whose loop does not answer for ``_MISSED_MAX`` seconds in a row is stuck: its listening
        sockets still take connections nobody serves. It is killed, and so started again."""
        worker.missed += 1
        if worker.missed >= _MISSED_MAX and worker.process.returncode is None:
            log.error("worker %d (pid %d) has not answered for %d s; killing it", worker.index, worker.pid,
                      worker.missed)
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()

    async def _poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(POLL_EVERY)

    def report(self) -> dict[str, Any]:
        return merge_reports([w.state["report"] for w in self.workers.values() if "report" in w.state])

    def demand(self) -> Demand:
        demands = [w.state["demand"] for w in self.workers.values() if "demand" in w.state]
        return merge_demand([*demands, Demand(dict(self._retired_totals), {})])

    def workers_report(self) -> dict[str, Any]:
        ready = sorted((w for w in self.workers.values() if w.ready), key=lambda w: w.index)
        return {"setting": self.cfg.workers, "count": self.count, "running": len(ready), "restarts": self.restarts,
                "pids": [w.pid for w in ready],
                # Inference calls each answered (since it started), as of its last report.
                "calls": {str(w.pid): int(sum(w.state["demand"].totals.values())) if "demand" in w.state else 0
                          for w in ready}}

    def _families(self) -> list[list[Metric]]:
        return [*(w.state.get("metrics", []) for w in self.workers.values()), self._retired]

    # -- up: what the workers saw ------------------------------------------------------------------------------

    async def _read(self, worker: _Worker) -> None:
        while True:
            try:
                message = await worker.channel.receive()
            except ChannelClosed:
                return
            kind = message[0]
            if kind == "obs":
                self._observed(message[1])
                worker.state["dropped"] = message[2]
            elif kind == "answer":
                future = worker.asks.get(message[1])
                if future is not None and not future.done():
                    if message[2]:
                        future.set_result(message[3])
                    else:
                        future.set_exception(message[3])

    def _observed(self, items: list[tuple[str, tuple[Any, ...], int]]) -> None:
        for kind, args, count in items:
            if kind not in _OBSERVATIONS:
                continue
            if kind == "seen" and args[0].memo is None:
                args[0].memo = Memo(args[0].request)  # the recorder keys a call once for all its repeats
            try:
                if kind == "seen":
                    self.observations.seen(args[0], count)
                    continue
                for _ in range(1 if kind in _ONCE else count):
                    getattr(self.observations, kind)(*args)
            except Exception as e:  # one bad observation never stops the rest
                log.warning("an observation from a worker failed (%s)", type(e).__name__)

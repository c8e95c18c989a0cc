"""The batcher stage: concurrent calls of one model coalesced into one upstream call, adaptively.

After the cache (hits and coalesced calls never wait here), before the upstream. Per model:

- while the model server has capacity (fewer batches in flight than ``max_concurrent``, by default
  the model's instance count) a call goes at once, alone and untouched: no added latency at low load;
- while it is busy, arrivals gather; when a batch completes, the next one leaves with every waiting
  call that fits: same ``batch_signature`` and the same forwarded headers (``Call.context``: they reach
  the model as parameters), so nobody's answer can change, sizes adding up to at most the cap (the
  model's max_batch_size, lowered by the latency model: by default to the smallest batch that gives 95%
  of the best throughput measured, so a call never waits behind a batch that only adds latency; or to
  keep within ``target_latency`` seconds); the oldest caller's call leads, the cache fill's calls
  (``origin`` fill) ride only where rows are left; ``max_delay`` bounds any wait, even when the server
  stays busy;
- nothing polls: arrivals, completions and one timer per model wake the dispatcher.

The promise: every caller gets exactly the answer the server would give its call alone, whatever the
other members did. So each caller gets exactly its own rows back (``rows.split``), re-encoded by its
own front; a batch the server refuses, or whose joined answer is over ``limits.max_answer_bytes``, is
retried member by member, so only a caller whose own call fails gets an error; an unavailable or late
server gives every member the error it would have got alone. A batch lives until its latest member's
deadline, and each member waits only until its own (then it alone gets a timeout). A caller that
leaves before dispatch leaves the batch; after dispatch its rows are dropped, and a call nobody waits
for any more is cancelled.

A model whose output has a variable non-batch dimension may shape one row's answer by another's
(padding to the longest row). ``auto`` never picks one; a model named explicitly is the operator's
statement, checked at run time: a signature is batched only once calls of it run alone have agreed
on their output shapes, and a batch answered in any other shape is retried member by member and ends
batching of that model. Sequence (stateful) models and calls are never batched.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..calls import Call, GrpcAnswer, HttpAnswer, Reply
from ..config import BatchConfig
from ..errors import AnswerTooLarge, DecodeError, Overloaded, SidecarError, UpstreamTimeout
from ..identity import shape_signature
from ..latency import LatencyModel
from ..metrics import Metrics
from ..podload import PodLoad
from ..protocols.request import InferenceRequest, InferenceResponse
from ..protocols.rows import Signature, batch_signature, merge, rows_of, split
from ..upstream.models import ModelCatalog, ModelInfo
from .stage import Next

_POD_POLL = 0.001  # seconds between looks at the other workers' load while only they keep a model busy

log = logging.getLogger("sidecar.batch")

OnBatch = Callable[[str, str, int], None]  # (model, shape signature, batch size) of what reached the server
OutputShapes = tuple[tuple[str, tuple[int, ...]], ...]  # each output's name and non-batch dimensions, by name

# Distinct calls of one signature, run alone, whose output shapes must agree before it is batched: one
# call cannot tell a shape fixed by the signature from one that follows the call's contents. Each further
# disagreement found later (calls run alone, batches) still ends batching; more would only delay it.
CONFIRM = 2
SHAPES_KEPT = 1024  # signatures remembered per checked model: callers choose them, so bounded (LRU)
# Only answers this small are decoded to learn their shape (on the event loop); a signature whose answers
# are larger is never confirmed, so never batched while its model is checked.
LEARN_MAX_BYTES = 1 << 20
# Once a signature is confirmed, one call run alone in this many is still checked: the decode costs some
# CPU per call, and a shape that follows the contents shows soon enough among calls of any signature.
RECHECK_EVERY = 16


@dataclass(eq=False)
class _Member:
    call: Call
    rows: int
    signature: Signature  # the request's batch_signature and the call's context
    future: asyncio.Future[Reply]
    enqueued: float
    stamp: float = field(default_factory=time.monotonic)  # arrival on the clock every worker shares

    @property
    def low(self) -> bool:
        """Filling the cache behind readiness: served after every caller's call."""
        return self.call.origin == "fill"


@dataclass(eq=False)
class _Seen:
    """Output shapes of one signature's calls run alone."""

    shape: OutputShapes
    inputs: set[int] = field(default_factory=set)  # digests of the distinct calls that agreed (up to CONFIRM)
    mixed: bool = False  # two calls disagreed: the shape follows the contents; never batched
    alone: int = 0  # calls run alone since it was confirmed


@dataclass(eq=False)
class _Model:
    name: str
    max_batch: int
    max_concurrent: int
    variable_outputs: bool = False  # the server says an output has a variable non-batch dimension
    checked: bool = False  # output shapes are checked (variable, or nothing known of them)
    in_flight: int = 0
    pending: collections.deque[_Member] = field(default_factory=collections.deque)
    timer: asyncio.TimerHandle | None = None
    batches: int = 0
    retried_alone: int = 0
    shapes: collections.OrderedDict[Signature, _Seen] = field(default_factory=collections.OrderedDict)
    shape_mismatches: int = 0
    stopped: bool = False  # a batch changed its callers' output shape: the model is no longer batched


class _Abandoned(Exception):
    """Every member of a call in flight has left: the call was cancelled, nobody is left to answer."""


class Batcher:
    name = "batcher"

    def __init__(self, cfg: BatchConfig, catalog: ModelCatalog, latency: LatencyModel, metrics: Metrics,
                 on_batch: OnBatch | None = None, pod_load: PodLoad | None = None) -> None:
        self.cfg = cfg
        # With several workers: the other workers' calls in flight count against a model's capacity too.
        self.pod_load = pod_load
        self.catalog = catalog
        self.latency = latency
        self.metrics = metrics
        self.on_batch = on_batch
        self.auto = "auto" in cfg.models
        self.every_model = "*" in cfg.models
        self.maximums = {name: int(m) if m else None for name, _, m in
                         (item.partition("=") for item in cfg.models if item not in ("auto", "*"))}
        self.models: dict[str, _Model] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sequence = 0
        self._next: Next | None = None

    def __repr__(self) -> str:
        waiting = sum(len(m.pending) for m in self.models.values())
        return f"<Batcher models={len(self.models)} waiting={waiting}>"

    # -- the stage -----------------------------------------------------------------------------------

    async def __call__(self, call: Call, next: Next) -> Reply:
        self._next = next  # the same callable for every call: the timer's dispatches use it too
        req = call.request
        if not call.batchable:
            return await next(call)
        model = await self._model(req)
        if model is None or model.stopped:
            return await next(call)
        n = rows_of(req)
        base = batch_signature(req)
        if n is None or base is None:
            return await self._alone(model, call, next, None)
        # Forwarded headers reach the model as parameters: callers share a batch only when theirs are equal.
        signature: Signature = (base, call.context)
        if n >= self._cap(model) or self._mixed(model, signature):
            return await self._alone(model, call, next, signature)
        if not model.pending and self._claim(model):
            return await self._alone(model, call, next, signature, claimed=True)  # capacity now: no wait
        if len(model.pending) >= self.cfg.max_queue:
            raise Overloaded(f"model {req.model}: {len(model.pending)} calls already wait for a batch", 1.0)
        loop = asyncio.get_running_loop()
        member = _Member(call, n, signature, loop.create_future(), loop.time())
        model.pending.append(member)
        self._arm(model)
        self._dispatch(model, next)
        try:
            # Its own deadline only: the batch may rightly outlive it, for members with later ones.
            async with asyncio.timeout_at(call.deadline):
                return await member.future
        except TimeoutError:
            _leave(member)
            self.metrics.upstream_errors.labels("timeout").inc()
            raise UpstreamTimeout("model server did not answer before the call's deadline") from None
        except asyncio.CancelledError:
            _leave(member)  # still waiting: it leaves the batch (skipped when one forms); sent: its rows are dropped
            raise

    async def _model(self, req: InferenceRequest) -> _Model | None:
        found = self.models.get(req.model)
        if found is not None:
            return found
        wanted = self.every_model or self.auto or req.model in self.maximums
        if not wanted:
            return None
        info = await self.catalog.info(req.model, req.protocol)
        model = self._new_model(req.model, info)
        if model is None:
            return None
        return self.models.setdefault(req.model, model)

    def _new_model(self, name: str, info: ModelInfo) -> _Model | None:
        """The batching state of a model this batcher may batch, else None."""
        if info.decoupled or info.sequence_batching:
            return None  # no one answer per call to divide / calls that share state in the server, in order
        configured = self.maximums.get(name)
        explicit = name in self.maximums or self.every_model
        if self.auto and not explicit and (info.server_batching or not info.max_batch or info.variable_outputs):
            return None  # auto: only models the server does not batch itself, whose answers a batch cannot shape
        max_batch: int | None
        if info.authoritative:
            if not info.max_batch:
                return None  # Triton's max_batch_size 0: no batch dimension, whatever the setting says
            max_batch = min(configured, info.max_batch) if configured else info.max_batch
        else:
            max_batch = configured or info.max_batch  # TF Serving's metadata says no maximum: NAME=MAX does
        if not max_batch or max_batch < 2:
            return None
        # Nothing known of the outputs (no configuration) is checked as a variable output is.
        checked = info.variable_outputs or info.max_batch is None
        return _Model(name, max_batch, self.cfg.max_concurrent or info.instances,
                      variable_outputs=info.variable_outputs, checked=checked)

    def _cap(self, model: _Model) -> int:
        if self.cfg.target_latency == "auto":
            return self.latency.knee(model.name, model.max_batch)
        return self.latency.cap(model.name, float(self.cfg.target_latency), model.max_batch)

    # -- dispatching ------------------------------------------------------------------------------------

    def _idle(self, model: _Model) -> bool:
        """Whether the model server can take one more call of ``model`` now (in the whole pod)."""
        busy = model.in_flight if self.pod_load is None else model.in_flight + self.pod_load.others(model.name)
        return busy < model.max_concurrent

    def _claim(self, model: _Model) -> bool:
        """Take a free place of the model's ``max_concurrent`` (pod-wide, first come first served among the
        workers); False when there is none."""
        if self.pod_load is None:
            free = model.in_flight < model.max_concurrent
        else:
            free = self.pod_load.claim(model.name, model.in_flight, model.max_concurrent)
        if free:
            model.in_flight += 1
        return free

    def _add(self, model: _Model, calls: int) -> None:
        """Count calls in flight that took no free place (sent past capacity), or that came back."""
        model.in_flight += calls
        if self.pod_load is not None:
            self.pod_load.set(model.name, model.in_flight)

    async def _alone(self, model: _Model, call: Call, next: Next, signature: Signature | None,
                     claimed: bool = False) -> Reply:
        within = claimed or self._idle(model)  # past capacity its latency includes the server's queue
        if not claimed:
            self._add(model, 1)
        started = time.perf_counter()
        try:
            reply = await next(call)
        finally:
            self._add(model, -1)
            self._wake(model, next)
        n = rows_of(call.request)
        if n is not None and reply.ok:
            if within:
                self.latency.observe(model.name, n, time.perf_counter() - started)
            self._report(model, call.request, n, 0.0)
            if signature is not None:
                self._learn(model, signature, call.request, n, reply)
        return reply

    def _dispatch(self, model: _Model, next: Next, force: bool = False) -> None:
        """Send batches while the server has capacity (or a wait has reached max_delay)."""
        loop = asyncio.get_running_loop()
        while model.pending:
            while model.pending and model.pending[0].future.done():
                model.pending.popleft()  # left before dispatch
            if not model.pending:
                break
            oldest = _first(model.pending)
            overdue = loop.time() - oldest.enqueued >= self.cfg.max_delay
            within = self._claim(model)  # an overdue batch's latency includes queueing
            if not within and not (force or overdue):
                break
            members = self._take(model, oldest)
            if not within:
                self._add(model, 1)
            self._spawn(self._run(model, members, next, within))
            force = False
        self._arm(model)

    def _take(self, model: _Model, oldest: _Member) -> list[_Member]:
        if not self._trusted(model, oldest.signature):
            model.pending.remove(oldest)  # goes alone: its answer teaches the signature's output shape
            return [oldest]
        if model.checked:
            model.shapes.move_to_end(oldest.signature)  # in use: the last to be forgotten
        cap = self._cap(model)
        taken: list[_Member] = []
        total = 0
        # Callers' calls in arrival order, then the cache fill's: a fill call rides only where rows are left.
        chosen: set[int] = set()
        for member in itertools.chain((m for m in model.pending if not m.low), (m for m in model.pending if m.low)):
            if not member.future.done() and member.signature == oldest.signature and total + member.rows <= cap:
                taken.append(member)
                chosen.add(id(member))
                total += member.rows
        model.pending = collections.deque(m for m in model.pending if id(m) not in chosen and not m.future.done())
        return taken

    def _arm(self, model: _Model) -> None:
        if model.timer is not None:
            model.timer.cancel()
            model.timer = None
        if self.pod_load is not None:  # the other workers see how long this one's oldest call has waited
            self.pod_load.waiting(model.name, _first(model.pending).stamp if model.pending else None)
        if model.pending:
            loop = asyncio.get_running_loop()
            due = model.pending[0].enqueued + self.cfg.max_delay
            if self.pod_load is not None and not model.in_flight and due > loop.time() + _POD_POLL:
                # Busy in other workers only: no completion here will wake these calls, so look again soon.
                model.timer = loop.call_later(_POD_POLL, self._poll, model)
            else:
                model.timer = loop.call_at(due, self._overdue, model)

    def _overdue(self, model: _Model) -> None:
        model.timer = None
        if self._next is not None:
            self._dispatch(model, self._next, force=True)

    def _poll(self, model: _Model) -> None:
        model.timer = None
        if self._next is not None:
            self._dispatch(model, self._next)

    def _wake(self, model: _Model, next: Next) -> None:
        if model.pending:
            self._dispatch(model, next)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, model: _Model, members: list[_Member], next: Next, learn: bool) -> None:
        """One batch (or one member alone) upstream; every member's future settled exactly once."""
        loop = asyncio.get_running_loop()
        waited = [loop.time() - m.enqueued for m in members]
        try:
            if len(members) == 1:
                await self._run_alone(model, members[0], next, waited[0], learn)
            else:
                await self._run_merged(model, members, next, waited, learn)
        except Exception as e:  # a fault of ours, not the server's answer: still each member's, as it would be alone
            for m in members:
                _settle(m, error=e)
        finally:
            self._add(model, -1)
            self._dispatch(model, next)

    async def _run_alone(self, model: _Model, member: _Member, next: Next, waited: float | None = None,
                         learn: bool = False) -> None:
        """One member's own call (``waited`` None: sent again after its batch failed it)."""
        if member.future.done():
            return  # left already
        started = time.perf_counter()
        try:
            reply = await _upstream([member], next, member.call)
        except _Abandoned:
            return
        except Exception as e:  # the server's failure (or a fault of ours), as this call alone would have got it
            _settle(member, error=e)
            return
        if reply.ok:
            if learn:
                self.latency.observe(model.name, member.rows, time.perf_counter() - started)
            if waited is not None:
                self._report(model, member.call.request, member.rows, waited)
            self._learn(model, member.signature, member.call.request, member.rows, reply)
        _settle(member, reply=reply)

    async def _run_merged(self, model: _Model, members: list[_Member], next: Next, waited: list[float],
                          learn: bool) -> None:
        merged_request = merge([m.call.request for m in members])
        first = members[0].call
        # As long as the most patient member waits: each member stops waiting at its own deadline.
        deadline = max(m.call.deadline for m in members)
        self._sequence += 1
        merged = Call(merged_request, f"batch-{self._sequence}", deadline, None, route=first.route,
                      origin="batch", context=first.context)
        total = sum(m.rows for m in members)
        started = time.perf_counter()
        try:
            reply: Reply | None = await _upstream(members, next, merged)
        except _Abandoned:
            return
        except AnswerTooLarge:
            reply = None  # the joined answer: each member's own may fit
        except SidecarError as e:
            for m in members:  # the server is gone or late: each member gets what it would have got alone
                _settle(m, error=e)
            return
        model.batches += 1
        parts = _parts(reply, members) if reply is not None and reply.ok else None
        if parts is not None and self._shape_holds(model, members[0], parts[0], next):
            if learn:
                self.latency.observe(model.name, total, time.perf_counter() - started)
            self._report(model, merged_request, total, max(waited))
            for m, part in zip(members, parts, strict=True):
                _settle(m, reply=Reply(200, response=part, source="batch"))
            return
        # Refused, too large, not divisible, or shaped by the batch: one by one, so each caller gets its own answer.
        model.retried_alone += len(members)
        self.metrics.batch_retried.labels(self.metrics.model_label(model.name)).inc(len(members))
        await asyncio.gather(*(self._run_alone(model, m, next) for m in members))

    # -- output shapes of checked models -----------------------------------------------------------------

    def _trusted(self, model: _Model, signature: Signature) -> bool:
        """Whether calls of this signature may share a batch."""
        if not model.checked:
            return True
        seen = model.shapes.get(signature)
        return seen is not None and not seen.mixed and len(seen.inputs) >= CONFIRM

    def _mixed(self, model: _Model, signature: Signature) -> bool:
        seen = model.shapes.get(signature) if model.checked else None
        return seen is not None and seen.mixed

    def _learn(self, model: _Model, signature: Signature, request: InferenceRequest, rows: int, reply: Reply) -> None:
        """What a call run alone (answered 200) says of its signature's output shape."""
        if not model.checked or model.stopped:
            return
        seen = model.shapes.get(signature)
        if seen is not None:
            if seen.mixed:
                return  # never batched again: nothing left to learn
            if len(seen.inputs) >= CONFIRM:
                seen.alone += 1
                if seen.alone % RECHECK_EVERY:
                    return
        if _answer_size(reply) > LEARN_MAX_BYTES:
            return
        try:
            shape = _output_shapes(reply.response(), rows)
        except (SidecarError, ValueError):
            return
        if shape is None:
            return
        if seen is None:
            seen = model.shapes[signature] = _Seen(shape)
            if len(model.shapes) > SHAPES_KEPT:
                model.shapes.popitem(last=False)
        else:
            model.shapes.move_to_end(signature)
        if shape != seen.shape:
            seen.mixed = True
        elif len(seen.inputs) < CONFIRM:
            seen.inputs.add(hash(request.inputs))

    def _shape_holds(self, model: _Model, member: _Member, part: InferenceResponse, next: Next) -> bool:
        """Whether a batch's answer has the shape its members' calls get alone (every member shares it)."""
        if not model.checked:
            return True
        if not self._trusted(model, member.signature):
            return False  # learnt otherwise while the batch was out (or forgotten): nothing to compare with
        if _output_shapes(part, member.rows) == model.shapes[member.signature].shape:
            return True
        model.shape_mismatches += 1
        if not model.stopped:
            model.stopped = True
            log.warning("model %s: a batched answer's output shape differs from the shape its callers get alone; "
                        "its calls are no longer batched", model.name)
            waiting = [m for m in model.pending if not m.future.done()]
            model.pending.clear()
            self._arm(model)
            for m in waiting:
                self._spawn(self._run_alone(model, m, next))
        return False

    def _report(self, model: _Model, request: InferenceRequest, batch: int, waited: float) -> None:
        label = self.metrics.model_label(model.name)
        self.metrics.batch_size.labels(label).observe(batch)
        self.metrics.batch_delay.labels(label).observe(waited)
        if self.on_batch is not None:
            self.on_batch(model.name, shape_signature(request), batch)

    def forget(self, model: str | None = None) -> None:
        """A model reloaded: its limits and output shapes are learnt again (waiting calls stay queued)."""
        for name in [n for n in self.models if model is None or n == model]:
            if not self.models[name].pending and not self.models[name].in_flight:
                del self.models[name]

    # -- for /status -------------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        return {name: {"max_batch": m.max_batch, "cap": self._cap(m), "max_concurrent": m.max_concurrent,
                       "in_flight": m.in_flight, "waiting": len(m.pending), "batches": m.batches,
                       "retried_alone": m.retried_alone, "variable_outputs": m.variable_outputs,
                       "shapes_checked": m.checked,
                       "shapes_confirmed": sum(1 for s in m.shapes if self._trusted(m, s)) if m.checked else None,
                       "shape_mismatches": m.shape_mismatches, "stopped": m.stopped,
                       "latency_ms": {str(b): round(s * 1e3, 3) for b, s in self.latency.known(name).items()}}
                for name, m in sorted(self.models.items())}


def _first(pending: collections.deque[_Member]) -> _Member:
    """The oldest caller's call waiting; the cache fill's oldest only when no caller's waits."""
    for member in pending:
        if not member.low and not member.future.done():
            return member
    return pending[0]


async def _upstream(members: list[_Member], next: Next, call: Call) -> Reply:
    """``next(call)`` on behalf of ``members``, cancelled once every one of them has left; _Abandoned then."""
    task: asyncio.Future[Reply] = asyncio.ensure_future(next(call))

    def left(_: object) -> None:
        if not task.done() and all(m.future.done() for m in members):
            task.cancel()

    for m in members:
        m.future.add_done_callback(left)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if task.cancelled() and not (current is not None and current.cancelling()):
            raise _Abandoned() from None
        raise
    finally:
        for m in members:
            m.future.remove_done_callback(left)


def _parts(reply: Reply, members: list[_Member]) -> list[InferenceResponse] | None:
    """Each member's rows of a batch's answer, or None when the answer cannot be divided."""
    try:
        return split(reply.response(), [m.rows for m in members])
    except (DecodeError, ValueError, SidecarError):
        return None


def _output_shapes(response: InferenceResponse, rows: int) -> OutputShapes | None:
    """Each output's non-batch dimensions, or None when some output is not ``rows`` rows."""
    if any(not t.shape or t.shape[0] != rows for t in response.outputs):
        return None
    return tuple(sorted((t.name, t.shape[1:]) for t in response.outputs))


def _answer_size(reply: Reply) -> int:
    wire = reply.wire
    if isinstance(wire, HttpAnswer):
        return len(wire.body)
    if isinstance(wire, GrpcAnswer):
        return len(wire.message)
    return 0  # a canonical answer only: decoded already


def _leave(member: _Member) -> None:
    """A member stops waiting: before dispatch it leaves the batch; a settlement that came too late is dropped."""
    if not member.future.done():
        member.future.cancel()
    elif not member.future.cancelled():
        member.future.exception()  # retrieved: an answer nobody awaits any more is no error


def _settle(member: _Member, *, reply: Reply | None = None, error: BaseException | None = None) -> None:
    """Set a member's outcome once; a member that already left is simply skipped."""
    if member.future.done():
        return
    if error is not None:
        member.future.set_exception(error)
    else:
        member.future.set_result(reply)  # type: ignore[arg-type]

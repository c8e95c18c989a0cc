"""The traffic recorder: remembers what real traffic looks like, without slowing it down.

The data plane's recorder stage (``pipeline/recorder.py``) hands every answered call to ``offer``,
which only appends it to a queue bounded in count and bytes (what overflows is counted, never waited
for). A background task of the control plane drains it in batches (waking at most
every ``_DRAIN_EVERY`` seconds, not once per call: a task switch per call cost as much as the rest
of the recording), keys, counts and aggregates calls in a Space-Saving sketch per model, and writes
the aggregate to the traffic store every ``flush_interval`` seconds.

What is kept is what warm-up may send again, and nothing else:

- a call of a sequence (``is_stateful``) is never recorded: replayed, it would start, end or corrupt
  a sequence;
- a payload is the canonical request in its family's HTTP form plus the headers that reach the model
  (``payload.RecordedCall.canonical``), never the caller's bytes or other headers, and is stored only
  when it decodes back to exactly the call its key names;
- a call with credentials (``Call.private``) keeps its count, but its payload only when the operator
  scoped such calls (``cache.scope_header``); a call forwarding a credential to the model keeps none.

Payloads are made at flush time, off the event loop, for the keys that made the top since the last
flush (not per call).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable

from ..calls import Call, HttpWire
from ..config import RecordConfig
from ..identity import batch_size, is_stateful, request_key, shape_signature
from ..metrics import Metrics
from ..protocols.forwarded import Context
from ..protocols.request import InferenceRequest, Protocol
from . import payload
from .sketch import SpaceSaving
from .store import Sample, TrafficStore

log = logging.getLogger("sidecar.recorder")


def wire_size(call: Call) -> int:
    wire = call.wire
    if isinstance(wire, HttpWire):
        return len(wire.body)
    return len(wire.message) if wire is not None else 0


_HASH_INLINE = 1024 * 1024
_DRAIN_EVERY = 0.02
# Payloads encoded and checked per model per flush at most: with every call distinct (nothing to replay) a
# flush would otherwise check thousands; the heaviest keys go first, the others at later flushes.
_PAYLOADS_PER_FLUSH = 200


class _Source:
    """What a call's payload is made from at flush time (only for keys still in the top then)."""

    __slots__ = ("context", "key", "request")

    def __init__(self, request: InferenceRequest, context: Context, key: str) -> None:
        self.request = request
        self.context = context
        self.key = key


class _ModelMemory:
    """One model's aggregate since the last flush."""

    def __init__(self, capacity: int) -> None:
        self.sketch: SpaceSaving[str] = SpaceSaving(capacity)
        self.meta: dict[str, tuple[str, int, _Source | None]] = {}  # key -> (shape, batch, payload source)


class TrafficRecorder:
    def __init__(self, cfg: RecordConfig, store: TrafficStore, metrics: Metrics, capacity: int,
                 secret_headers: Iterable[bytes] = ()) -> None:
        """``secret_headers``: names (lower case) of headers that hold credentials beyond Authorization and
        Cookie, such as those of ``restricted_api``: a call forwarding one to the model keeps no payload."""
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.capacity = capacity
        self.allow = frozenset(cfg.models)
        self.secrets = payload.CREDENTIALS | {name.lower() for name in secret_headers}
        self._queue: collections.deque[Call | tuple[Call, int]] = collections.deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._batches: dict[tuple[str, str, int], int] = {}
        self._models: dict[str, _ModelMemory] = {}
        # When each key's payload last went to the store: resent only to refresh its TTL.
        self._payload_sent: dict[str, float] = {}
        self.unreplayable = 0  # calls counted whose canonical form would not replay as the same call

    def __repr__(self) -> str:
        return f"<TrafficRecorder queue={len(self._queue)}/{self.cfg.queue_size} models={len(self._models)}>"

    def offer(self, call: Call, count: int = 1) -> None:
        """A call the model server answered (``count`` times: a worker folds repeats): queued for the background
        task, or dropped and counted."""
        if self.allow and call.request.model not in self.allow:
            return
        size = wire_size(call)
        if self._queued_bytes + size > self.cfg.queue_bytes or len(self._queue) >= self.cfg.queue_size:
            self.metrics.record_dropped.inc(count)
            return
        self._queue.append(call if count == 1 else (call, count))
        self._queued_bytes += size
        if not self._wake.is_set():
            self._wake.set()

    async def run(self) -> None:
        """Background task: aggregate in batches, and flush every ``flush_interval`` seconds."""
        loop = asyncio.get_running_loop()
        next_flush = loop.time() + self.cfg.flush_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_flush):
                    while True:
                        await self._wake.wait()
                        await asyncio.sleep(_DRAIN_EVERY)  # let a batch gather
                        self._wake.clear()
                        await self._drain()
            next_flush = loop.time() + self.cfg.flush_interval
            await self._drain()
            await self.flush()

    async def _drain(self) -> None:
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, tuple):
                await self._observe_safely(*item)
            else:
                await self._observe_safely(item)

    async def _observe_safely(self, call: Call, count: int = 1) -> None:
        """One bad call is dropped and counted; it never stops the recorder."""
        size = wire_size(call)
        self._queued_bytes -= size
        try:
            if is_stateful(call.request):
                return  # a call of a sequence means something only after the calls before it: never replayed
            memo = call.memo if call.memo is not None and call.memo.request is call.request else None
            key = memo.record_key if memo is not None else None
            if key is None:
                # Hashing a large call takes milliseconds; hashlib releases the GIL, so a thread keeps the loop free.
                key = await asyncio.to_thread(request_key, call.request) if size > _HASH_INLINE else request_key(
                    call.request)
                if memo is not None:
                    memo.record_key = key  # identical bytes, the same key: computed once
            self._observe(call, key, count)
        except Exception as e:
            self.metrics.record_errors.inc()
            log.warning("a call could not be recorded (%s); dropped", type(e).__name__)

    def _observe(self, call: Call, identity: str, count: int = 1) -> None:
        req = call.request
        context, secret = self._model_context(call)
        key = payload.call_key(identity, context)
        memory = self._models.get(req.model)
        if memory is None:
            memory = self._models[req.model] = _ModelMemory(self.capacity)
        evicted = memory.sketch.offer(key, count)
        if evicted is not None:
            # Between flushes only the sketch's keys keep their sources: memory stays bounded by capacity.
            memory.meta.pop(evicted, None)
        known = memory.meta.get(key)
        if known is None or known[2] is None:
            # A call that may keep its payload gives one to a key first seen in calls that could not (the same
            # request and headers: nothing of theirs is in it).
            source = None if secret or not self._may_keep(call) else _Source(req, context, key)
            if known is None or source is not None:
                memory.meta[key] = (shape_signature(req), batch_size(req), source)
        self.metrics.recorded.inc(count)

    def _model_context(self, call: Call) -> tuple[Context, bool]:
        """The headers of the call that reach the model (Triton's header forwarding), and whether a credential
        is among them. Learned restriction keys are checked by the server, never seen by the model: they are
        neither kept nor part of the key; a credential the model does see is left out of the key too (no
        digest of a secret is stored), and the call then keeps no payload."""
        if not call.context:
            return (), False
        secrets = self.secrets | {name[1:].lower() for name, _ in call.context if name.startswith(b"\0")}
        kept: list[tuple[bytes, bytes]] = []
        secret = False
        for name, value in call.context:
            if name.startswith(b"\0"):
                continue
            if name.lower() in secrets:
                secret = True
            else:
                kept.append((name, value))
        return tuple(kept), secret

    def _may_keep(self, call: Call) -> bool:
        """Whether this call's payload may be stored (its count always is)."""
        if not call.shareable:
            return False  # e.g. a caller's credentialed request is its own unless the operator scoped such calls
        if wire_size(call) > self.cfg.max_payload_bytes:
            return False
        if call.context and not isinstance(call.wire, HttpWire):
            # A gRPC caller's forwarded metadata follows the gRPC forward pattern; replayed over HTTP the
            # HTTP pattern decides what reaches the model: not the same call.
            return False
        # TF Serving gRPC tensors carry datatypes its REST form does not: the HTTP form is another call.
        return call.request.protocol is not Protocol.TFSERVING_GRPC

    def observe_batch(self, model: str, shape: str, batch: int) -> None:
        """A batch size that reached the model server (the batcher's): warm-up covers the sizes it makes."""
        if self.allow and model not in self.allow:
            return
        key = (model, shape, batch)
        if key in self._batches or len(self._batches) < self.capacity:
            self._batches[key] = self._batches.get(key, 0) + 1

    async def close(self) -> None:
        """Record what is still queued, then write it: a shutdown loses nothing that was seen."""
        await self._drain()
        await self.flush()

    async def flush(self) -> None:
        samples: list[Sample] = []
        sources: list[tuple[int, _Source]] = []  # index in samples, what its payload is made from
        now = time.time()
        for model, memory in self._models.items():
            budget = _PAYLOADS_PER_FLUSH  # the heaviest first; the rest get theirs at a later flush
            for key, count, _error in memory.sketch.top(self.capacity):
                shape, batch, source = memory.meta.get(key, ("", 1, None))
                sent = self._payload_sent.get(key)
                if source is not None and budget > 0 and (sent is None or now - sent >= self.cfg.payload_ttl / 2):
                    sources.append((len(samples), source))
                    budget -= 1
                samples.append(Sample(model, key, shape, batch, count, b""))  # b"" keeps what the store has
        self._models.clear()
        if sources:
            # Encoding and checking the payloads is CPU work off the event loop, and only for the keys that made
            # the top since the last flush: never per call.
            bodies = await asyncio.to_thread(_payloads, [s for _, s in sources], self.cfg.max_payload_bytes)
            for (index, _), body in zip(sources, bodies, strict=True):
                if body:
                    samples[index] = dataclasses.replace(samples[index], payload=body)
                    self._payload_sent[samples[index].key] = now
                else:
                    self.unreplayable += 1
        samples.extend(Sample(model, "", shape, batch, count, b"") for (model, shape, batch), count in
                       self._batches.items())
        self._batches.clear()
        if len(self._payload_sent) > 20 * self.capacity:  # bounded: forget the oldest half
            for key, _ in sorted(self._payload_sent.items(), key=lambda kv: kv[1])[: len(self._payload_sent) // 2]:
                del self._payload_sent[key]
        if samples:
            dropped = self.store.dropped
            await self.store.add(samples)
            if self.store.dropped != dropped:
                self.metrics.record_store_dropped.inc(sum(s.count for s in samples if s.key))
                # The store was unreachable: payloads must go again next time.
                for sample in samples:
                    self._payload_sent.pop(sample.key, None)


def _payloads(sources: list[_Source], limit: int) -> list[bytes]:
    """Each source's payload: its canonical request with its model-reaching headers, b"" unless it decodes
    back to exactly the call its key names (a form the codec reads otherwise is never stored)."""
    out = []
    for source in sources:
        try:
            recorded = payload.RecordedCall.canonical(source.request, source.context)
            data = payload.encode(recorded)
            if len(data) > limit:
                data = b""
            else:
                payload.check(recorded, source.key)
        except Exception:  # no form, or not the same call: counted, not kept (nor logged: it is the caller's data)
            data = b""
        out.append(data)
    return out

"""The recorder stage: remembers what real traffic looks like, without slowing it down.

The stage itself only appends the finished call to a queue bounded in count and bytes (what
overflows is counted, never waited for). A background task drains it in batches (waking at most
every ``_DRAIN_EVERY`` seconds, not once per call: a task switch per call cost as much as the rest
of the recording), keys, counts and aggregates calls in a Space-Saving sketch per model, and writes
the aggregate to the traffic store every ``flush_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

from ..cache.keys import batch_size, request_key, shape_signature
from ..config import RecordConfig
from ..metrics import Metrics
from ..protocols import dispatch
from ..warmup import payload
from ..warmup.sketch import SpaceSaving
from ..warmup.store import Sample, TrafficStore
from .stage import Call, HttpWire, Next, Reply

log = logging.getLogger("sidecar.recorder")


def wire_size(call: Call) -> int:
    wire = call.wire
    if isinstance(wire, HttpWire):
        return len(wire.body)
    return len(wire.message) if wire is not None else 0
_HASH_INLINE = 1024 * 1024
_DRAIN_EVERY = 0.02


class _ModelMemory:
    """One model's aggregate since the last flush."""

    def __init__(self, capacity: int) -> None:
        self.sketch: SpaceSaving[str] = SpaceSaving(capacity)
        self.meta: dict[str, tuple[str, int, bytes]] = {}  # key -> (shape, batch, payload or b"")


class Recorder:
    name = "recorder"

    def __init__(self, cfg: RecordConfig, store: TrafficStore, metrics: Metrics, capacity: int) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.capacity = capacity
        self.allow = frozenset(cfg.models)
        self._queue: collections.deque[Call] = collections.deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._batches: dict[tuple[str, str, int], int] = {}
        self._models: dict[str, _ModelMemory] = {}
        # When each key's payload last went to the store: resent only to refresh its TTL.
        self._payload_sent: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<Recorder queue={len(self._queue)}/{self.cfg.queue_size} models={len(self._models)}>"

    async def __call__(self, call: Call, next: Next) -> Reply:
        reply = await next(call)
        # Only calls the server answered are worth replaying; unmodelled ones cannot be keyed.
        if reply.status == 200 and call.modelled and (not self.allow or call.request.model in self.allow):
            size = wire_size(call)
            if self._queued_bytes + size > self.cfg.queue_bytes or len(self._queue) >= self.cfg.queue_size:
                self.metrics.record_dropped.inc()
                return reply
            self._queue.append(call)
            self._queued_bytes += size
            if not self._wake.is_set():
                self._wake.set()
        return reply

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
            await self._observe_safely(self._queue.popleft())

    async def _observe_safely(self, call: Call) -> None:
        """One bad call is dropped and counted; it never stops the recorder."""
        size = wire_size(call)
        self._queued_bytes -= size
        try:
            memo = call.memo if call.memo is not None and call.memo.request is call.request else None
            key = memo.record_key if memo is not None else None
            if key is None:
                # Hashing a large call takes milliseconds; hashlib releases the GIL, so a thread keeps the loop free.
                key = await asyncio.to_thread(request_key, call.request) if size > _HASH_INLINE else request_key(
                    call.request)
                if memo is not None:
                    memo.record_key = key  # identical bytes, the same key: computed once
            self._observe(call, key)
        except Exception as e:
            self.metrics.record_errors.inc()
            log.warning("a call could not be recorded (%s); dropped", type(e).__name__)

    def _observe(self, call: Call, key: str) -> None:
        req = call.request
        memory = self._models.get(req.model)
        if memory is None:
            memory = self._models[req.model] = _ModelMemory(self.capacity)
        evicted = memory.sketch.offer(key)
        if evicted is not None:
            # Between flushes only the sketch's keys keep their payloads: memory stays bounded by capacity.
            memory.meta.pop(evicted, None)
        if key not in memory.meta:
            memory.meta[key] = (shape_signature(req), batch_size(req), self._payload_for(key, call))
        self.metrics.recorded.inc()

    def _payload_for(self, key: str, call: Call) -> bytes:
        if wire_size(call) > self.cfg.max_payload_bytes:
            return b""
        sent = self._payload_sent.get(key)
        if sent is not None and time.time() - sent < self.cfg.payload_ttl / 2:
            return b""  # the store has it; b"" keeps what it has
        wire = call.wire
        if isinstance(wire, HttpWire):
            recorded = payload.RecordedCall.from_wire(wire.target, wire.headers, wire.body)
        else:  # a gRPC caller: kept in its family's HTTP form, which warm-up replays
            recorded = payload.RecordedCall.from_wire(*dispatch.encode_http(call.request))
        return payload.encode(recorded)

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
        now = time.time()
        for model, memory in self._models.items():
            for key, count, _error in memory.sketch.top(self.capacity):
                shape, batch, body = memory.meta.get(key, ("", 1, b""))
                samples.append(Sample(model, key, shape, batch, count, body))
                if body:
                    self._payload_sent[key] = now
        self._models.clear()
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
                # The store was unreachable: payloads must go again next time.
                for sample in samples:
                    self._payload_sent.pop(sample.key, None)

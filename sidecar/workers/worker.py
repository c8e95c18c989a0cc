"""A data-plane worker's main: one DataPlane on the data ports it shares with the other workers.

Started by ``pool.py`` as ``python -m sidecar.workers.worker FD`` with one end of a socketpair. It reads
the configuration and the pod's current snapshot from the first message, listens (SO_REUSEPORT), says
``ready``, then follows the control process: snapshots (applied at once), questions (replay, fill,
state), ``draining`` and ``stop``. What it observes goes up through a bounded :class:`Outbox`. When the
control process is gone (the socket closes) it stops listening and exits at once: nothing answers on a
stale state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from typing import Any

from .. import logs
from ..cache.podtier import PodTier
from ..calls import Call, Memo
from ..config import Config
from ..dataplane import DataPlane, PodParts
from ..errors import ConfigError
from ..identity import request_key
from ..metrics import Metrics
from ..planes import Snapshot, View
from ..podload import PodLoad
from ..redis.client import RedisClients
from ..supervise import Supervisor
from ..warmup.recording import wire_size
from .channel import Channel, ChannelClosed, call_in, error_out, reply_out

log = logging.getLogger("sidecar.worker")

OUTBOX_ITEMS = 10_000  # observations waiting to go up; beyond, dropped and counted
OUTBOX_BYTES = 16 * 1024 * 1024  # bytes the control process has not read yet; beyond, observations drop
_SEND_EVERY = 0.02  # seconds: what goes up is counts and rare events; fewer, larger messages cost less
_KEYING_MAX = 4  # large calls being keyed in threads at once (their payload is never sent up)


@dataclasses.dataclass(frozen=True)
class Start:
    """The first message: what the worker is and what the pod knows now."""

    cfg: Config
    index: int
    workers: int
    shared_dir: str
    snapshot: Snapshot


class Outbox:
    """The worker's :class:`~sidecar.planes.Observations`: each returns at once; they go up in batches every
    few ms. Within a batch, repeats fold into one item with a count (byte-identical calls, the same model
    touched), so a hot call costs the channel one item per batch, not one per call. Bounded in items and in
    unread bytes: on overflow an observation is dropped and counted, a call never waits for the control
    process."""

    def __init__(self, channel: Channel, max_payload_bytes: int) -> None:
        self.channel = channel
        self.max_payload_bytes = max_payload_bytes
        self.items: dict[Any, list[Any]] = {}  # fold key -> [kind, args, count]
        self.dropped = 0
        self._scheduled = False
        self._keying = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Outbox {len(self.items)} waiting, {self.dropped} dropped>"

    def _put(self, fold: Any, kind: str, *args: Any, count: int = 1) -> None:
        if len(self.items) >= OUTBOX_ITEMS or self.channel.pending > OUTBOX_BYTES:
            self.dropped += 1
            return
        self.items[fold] = [kind, args, count]
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(_SEND_EVERY, self._send)

    def _send(self) -> None:
        self._scheduled = False
        items, self.items = [tuple(item) for item in self.items.values()], {}
        with contextlib.suppress(ChannelClosed):
            self.channel.send("obs", items, self.dropped)

    def seen(self, call: Call, count: int = 1) -> None:
        if wire_size(call) > self.max_payload_bytes:
            self._seen_large(call)
            return
        # Calls of identical bytes share the front's memo; with the same headers they are one recorded call. The
        # key holds the memo itself (compared by identity), so it lives until the batch is sent.
        memo = call.memo
        fold = ("seen", memo, call.context, call.private, call.scope) if memo is not None else object()
        item = self.items.get(fold)
        if item is not None:
            item[2] += count
            return
        self._put(fold, "seen", dataclasses.replace(call, wire=None, memo=None, deadline=0.0), count=count)

    def _seen_large(self, call: Call) -> None:
        if self._keying >= _KEYING_MAX:
            self.dropped += 1
            return
        self._keying += 1
        task = asyncio.get_running_loop().create_task(self._key_large(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _key_large(self, call: Call) -> None:
        """A call too large to keep for replay is counted by its key alone: its tensors never go up."""
        try:
            key = await asyncio.to_thread(request_key, call.request)
            inputs = tuple(dataclasses.replace(t, data=b"") for t in call.request.inputs)
            request = dataclasses.replace(call.request, inputs=inputs)
            memo = Memo(request)
            memo.record_key = key
            # Marked private with no scope: not shareable, so the recorder keeps its count and no payload.
            self._put(object(), "seen", dataclasses.replace(call, request=request, wire=None, memo=memo,
                                                            deadline=0.0, private=True, scope=b""))
        finally:
            self._keying -= 1

    def _repeat(self, kind: str, *args: Any) -> None:
        """An observation that folds with its repeats in one batch (the same kind and arguments)."""
        fold = (kind, *args)
        item = self.items.get(fold)
        if item is not None:
            item[2] += 1
        else:
            self._put(fold, kind, *args)

    def batched(self, model: str, shape: str, size: int) -> None:
        self._repeat("batched", model, shape, size)

    def touched(self, model: str) -> None:
        self._repeat("touched", model)

    def wanted(self, model: str) -> None:
        self._repeat("wanted", model)

    def upstream_failed(self) -> None:
        self._repeat("upstream_failed")

    def model_changed(self, model: str) -> None:
        self._put(object(), "model_changed", model)  # each one flushes the fleet: never folded

    def restriction_named(self, http_header: bytes, grpc_key: bytes) -> None:
        self._repeat("restriction_named", http_header, grpc_key)

    def model_known(self, model: str) -> None:
        self._repeat("model_known", model)

    def answers_changed(self, model: str) -> None:
        self._repeat("answers_changed", model)


def worker_config(cfg: Config, workers: int) -> Config:
    """A worker's share of the pod's connection and memory limits (each worker enforces its own)."""
    limits = cfg.limits
    share = dataclasses.replace(
        limits,
        max_inflight_bytes=max(1, limits.max_inflight_bytes // workers),
        max_connections=max(1, limits.max_connections // workers) if limits.max_connections else 0,
    )
    return dataclasses.replace(cfg, limits=share)


class Worker:
    def __init__(self, channel: Channel, start: Start) -> None:
        self.channel = channel
        self.start_message = start
        cfg = worker_config(start.cfg, start.workers)
        self.metrics = Metrics()
        self.supervisor = Supervisor(self.metrics)
        self.redis = RedisClients(cfg.cache.redis_failures, cfg.cache.redis_cooldown)
        self.view = View()
        self.outbox = Outbox(channel, cfg.record.max_payload_bytes)
        self.tier = PodTier(start.shared_dir, cfg.cache.max_bytes, readers=8 * start.workers)
        self.load = PodLoad(os.path.join(start.shared_dir, "load"), start.workers, start.index)
        self.load.clear(start.index)
        self.data = DataPlane(cfg, self.metrics, self.view, self.outbox, self.redis, self.supervisor,
                              PodParts(self.tier, self.load))
        self.metrics.on_learn = self.outbox.model_known
        self.view.apply(start.snapshot)
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Worker {self.start_message.index} {self.data!r}>"

    async def run(self) -> int:
        try:
            await self.data.start()
        except ConfigError as e:
            self.channel.send("failed", str(e))
            await self.channel.drain()
            return 78
        self.channel.send("ready", os.getpid())
        try:
            while True:
                message = await self.channel.receive()
                if not await self._handle(message):
                    break
        except ChannelClosed:
            # The control process is gone: no more state will come. Stop answering now, not on stale state.
            self.data.data_port.stop_listening()
            os._exit(0)
        await self.close()
        return 0

    async def _handle(self, message: tuple[Any, ...]) -> bool:
        kind = message[0]
        if kind == "snapshot":
            self.view.apply(message[1])
        elif kind == "ask":
            task = asyncio.get_running_loop().create_task(self._answer(message[1], message[2], message[3]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "draining":
            self.data.draining()
        elif kind == "stop":
            self.data.draining()
            await self.data.stop(message[1])
            await self.supervisor.stop()
            return False
        return True

    async def _answer(self, ask: int, kind: str, payload: Any) -> None:
        try:
            result = await self._ask(kind, payload)
        except Exception as e:
            with contextlib.suppress(ChannelClosed):
                self.channel.send("answer", ask, False, error_out(e))
            return
        with contextlib.suppress(ChannelClosed):
            self.channel.send("answer", ask, True, result)

    async def _ask(self, kind: str, payload: Any) -> Any:
        now = asyncio.get_running_loop().time()
        if kind == "replay":
            return reply_out(await self.data.replay(call_in(payload, now)))
        if kind == "fill":
            return reply_out(await self.data.fill(call_in(payload, now)))
        if kind == "state":
            return {"report": self.data.report(), "demand": self.data.demand(), "in_flight": self.data.in_flight,
                    "metrics": list(self.metrics.registry.collect()), "dropped": self.outbox.dropped}
        raise ValueError(f"unknown question {kind!r}")

    async def close(self) -> None:
        await self.data.close()
        await self.redis.close()
        self.tier.close()
        self.load.close()


async def serve(sock: socket.socket) -> int:
    channel = await Channel.open(sock)
    message = await channel.receive()
    start: Start = message[1]
    logs.configure(start.cfg.log_level, start.cfg.log_format)
    return await Worker(channel, start).run()


def main() -> int:
    # The control process decides when a worker stops (it drains them on SIGTERM); a Ctrl-C that reaches the
    # whole process group must not end a worker before that. A worker whose control process dies exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        import uvloop

        return uvloop.run(serve(sock))
    except ImportError:  # uvloop is a dependency; this only guards odd platforms
        return asyncio.run(serve(sock))


if __name__ == "__main__":
    sys.exit(main())

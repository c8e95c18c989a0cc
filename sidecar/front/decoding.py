"""Decoding inference bodies without stalling the event loop.

A body up to ``inline_bytes`` decodes on the loop (tens of microseconds). A larger one decodes in a
worker process: parsing 64 MiB of JSON, or five million nested rows, holds the interpreter for
seconds, and a thread would not help (the parser holds the GIL), while the probes on the admin
port share this loop and Kubernetes' default probe timeout is one second.

A worker that dies (an allocation the kernel refused, a crash) is replaced; the call it was decoding
is treated as one the codecs cannot model, so it still goes to the model server untouched.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool

from ..calls import Memo
from ..errors import DecodeError
from ..protocols import dispatch

log = logging.getLogger("sidecar.decode")

# Small requests repeat (the same embedding text, the same feature vector): the same bytes decode once.
# Bounded: at most _MEMO_ENTRIES bodies of at most _MEMO_BODY bytes (8 MiB of bodies, about as much decoded,
# and the front's encoded answers of at most 4 KiB each), least recently used out first.
_MEMO_ENTRIES = 2048
_MEMO_BODY = 4096
MemoKey = tuple[dispatch.InferenceRoute, tuple[bytes, ...], tuple[bytes, ...], bytes]


class RequestDecoder:
    def __init__(self, inline_bytes: int, workers: int, max_decoded_bytes: int) -> None:
        self.inline_bytes = inline_bytes
        self.workers = workers
        self.max_decoded_bytes = max_decoded_bytes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.offloaded = 0
        self._memo: collections.OrderedDict[MemoKey, Memo] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"<RequestDecoder inline<={self.inline_bytes} workers={self.workers} offloaded={self.offloaded}>"

    def remembered(self, route: dispatch.InferenceRoute, body: bytes, header_lengths: list[bytes],
                   encodings: list[bytes]) -> Memo:
        """The shared Memo of a small request decoded before; decodes (and remembers) it otherwise. Raises
        as ``decode`` does; what does not decode is never remembered."""
        if len(body) > _MEMO_BODY:
            return Memo(dispatch.decode_wire(route, body, header_lengths, encodings, self.max_decoded_bytes))
        key = (route, tuple(header_lengths), tuple(encodings), body)
        memo = self._memo.get(key)
        if memo is not None:
            self._memo.move_to_end(key)
            return memo
        memo = Memo(dispatch.decode_wire(route, body, header_lengths, encodings, self.max_decoded_bytes))
        if len(self._memo) >= _MEMO_ENTRIES:
            self._memo.popitem(last=False)
        self._memo[key] = memo
        return memo

    async def decode(self, route: dispatch.InferenceRoute, body: bytes, header_lengths: list[bytes],
                     encodings: list[bytes]) -> Memo:
        """The canonical request, in a Memo shared by identical small bodies decoded on the loop;
        DecodeError when the codecs cannot model it, UnsafeInput to refuse it."""
        if len(body) <= self.inline_bytes or self.workers == 0:
            return self.remembered(route, body, header_lengths, encodings)
        self.offloaded += 1
        loop = asyncio.get_running_loop()
        try:
            return Memo(await loop.run_in_executor(self._executor(), dispatch.decode_wire, route, body,
                                                   header_lengths, encodings, self.max_decoded_bytes))
        except BrokenProcessPool:
            log.warning("a decoding worker died; replacing it (the call goes upstream unmodelled)")
            self._pool = None
            raise DecodeError("body: the decoding worker failed on it") from None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # forkserver: workers start from a clean process, not a copy of this one's loop and sockets.
            context = multiprocessing.get_context("forkserver")
            self._pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context,
                                                                initializer=_lower_priority)
        return self._pool

    def start(self) -> None:
        """Start the workers now, so the first large body does not pay for it."""
        if self.workers:
            self._executor().submit(int)

    async def close(self) -> None:
        """Stop the workers and wait for them to go: a pool still winding down at interpreter exit races
        CPython's own exit hook on its wake-up pipe ("Exception ignored ... Bad file descriptor")."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


def _lower_priority() -> None:
    """A huge body's decode yields the CPU to the event loop (probes, small calls) when they compete."""
    with contextlib.suppress(OSError):
        os.nice(10)

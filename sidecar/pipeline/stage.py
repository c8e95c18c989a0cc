"""The stage contract: an ordered list of small async callables, like Envoy filters.

Each stage receives a :class:`~sidecar.calls.Call` and the ``next`` callable; it may answer by itself
(a cache hit, a gate while draining) or await ``next``. The last callable is the upstream. The list
is built in one place, the data plane (``sidecar/dataplane.py``).

The contract is protocol-neutral: a stage sees the canonical request and answers with a ``Reply``
whose canonical response (tensors) any front can encode for its own caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from ..calls import Call, Reply

Next = Callable[[Call], Awaitable[Reply]]


class Stage(Protocol):
    name: str

    async def __call__(self, call: Call, next: Next) -> Reply: ...


def chain(stages: Sequence[Stage], terminal: Next) -> Next:
    """Fold the stages into one callable; stage 0 runs first."""
    handler = terminal
    for stage in reversed(stages):
        handler = _bind(stage, handler)
    return handler


def _bind(stage: Stage, nxt: Next) -> Next:
    async def run(call: Call) -> Reply:
        return await stage(call, nxt)

    return run

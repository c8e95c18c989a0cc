"""The stage contract: an ordered list of small async callables, like Envoy filters.

Each stage receives a :class:`Call` and the ``next`` callable; it may answer by
itself (a cache hit, a gate while draining) or await ``next``. The last callable
is the upstream client. The list is built in one place, ``sidecar.app``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..protocols.request import InferenceRequest

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Call:
    """One inference call as the stages see it: canonical request plus what travels upstream."""

    request: InferenceRequest
    path: str
    query: str
    # Request headers to forward (hop-by-hop ones already removed).
    headers: Headers
    # Exactly the bytes to send upstream; a stage that rewrites the request replaces them.
    body: bytes
    request_id: str
    # Absolute deadline on the event loop's clock.
    deadline: float
    route: str = "infer"


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    reason: str = ""
    # Which stage produced the answer, for metrics and the x-sidecar-source header.
    source: str = field(default="upstream")


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

"""The traffic store's interface and what both stores share: samples, limits, forward decay, health.

The design (decay, payload TTL, failure policy) is told in the package's docstring (``__init__.py``).
"""


from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

Clock = Callable[[], float]

# Half-lives the epoch may lag behind before scores are rescaled: scores stay below 2**32 times a
# count, far from float overflow, and a rescale (which touches every entry) happens once a month
# with the default one-day half-life.
RESCALE_AFTER = 32.0


# -- values -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """Aggregated observations of one request identity since the last flush."""

    model: str
    key: str  # hex digest of the canonical request identity; "" for a batch shape only (the batcher's)
    shape: str  # shape signature, e.g. "INPUT0:FP32[4,16];INPUT1:INT64[4]"
    batch: int  # leading (batch) dimension, 1 if none
    count: int  # how many times seen since the last flush
    payload: bytes  # opaque serialized request (b"" if the recorder dropped it for size)


@dataclass(frozen=True, slots=True)
class StoredRequest:
    model: str
    key: str
    weight: float  # decayed count
    shape: str
    batch: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class StoreLimits:
    capacity: int = 400  # entries kept per model (lowest weight evicted); also shapes per model
    max_payload_bytes: int = 1 << 20
    max_total_bytes: int = 256 << 20  # all payloads together; lowest-weight payloads dropped first
    payload_ttl: float = 7 * 86400  # seconds since last seen
    half_life: float = 86400  # weights halve every half_life seconds
    namespace: str = "warm-sidecar"  # Redis key prefix (several fleets can share one Redis)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {self.capacity}")
        if self.max_payload_bytes < 0 or self.max_total_bytes < 0:
            raise ValueError("payload byte limits must not be negative")
        if not (self.payload_ttl > 0 and self.half_life > 0):
            raise ValueError("payload_ttl and half_life must be positive")
        if not self.namespace:
            raise ValueError("namespace must not be empty")


class TrafficStore(Protocol):
    kind: str  # "sqlite" | "redis"
    dropped: int  # samples dropped because the store was unavailable

    async def add(self, samples: Sequence[Sample]) -> None: ...

    async def top(self, model: str, n: int) -> list[StoredRequest]:
        """Up to ``n`` entries with a live payload, weight descending."""
        ...

    async def shapes(self, model: str) -> list[tuple[str, int, float]]:
        """(shape, batch, weight), weight descending."""
        ...

    async def models(self) -> list[tuple[str, float]]:
        """(model, total weight), weight descending."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> str:
        """For logs and status; never includes a password."""
        ...


# -- shared helpers ---------------------------------------------------------------------------------


def _pow2(exponent: float) -> float:
    # Clamped: a clock far behind the epoch must not overflow (2 ** 1024 raises OverflowError).
    return math.pow(2.0, min(exponent, 1000.0))


def _decay(now: float, epoch: float | None, half_life: float) -> float:
    """Factor turning a forward score into the weight at ``now``."""
    return 1.0 if epoch is None else _pow2(-(now - epoch) / half_life)


def _storable(payload: bytes, limits: StoreLimits) -> bytes:
    """The payload to keep, or b"" when it is over the per-payload limit (its counts still count)."""
    return payload if len(payload) <= limits.max_payload_bytes else b""



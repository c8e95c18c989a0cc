"""A traffic store filled as the recorder would have filled it: for tests and benchmarks that start a sidecar
with a memory of earlier traffic (warm-up order, layered loading)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from sidecar.identity import batch_size, request_key, shape_signature
from sidecar.protocols import kserve_http
from sidecar.warmup import payload
from sidecar.warmup.store import Sample, StoreLimits, open_store


def recorded_store(location: str, calls: Mapping[str, tuple[bytes, int]]) -> str:
    """``calls``: model -> (KServe v2 JSON body, times seen). Each payload is kept under its own request's
    key, as the recorder keeps it (warm-up replays nothing else). Returns ``location``."""
    async def fill() -> None:
        store = open_store(location, StoreLimits())
        samples = []
        for model, (body, count) in calls.items():
            request = kserve_http.decode_request(model, "", body, None)
            samples.append(Sample(model, request_key(request), shape_signature(request), batch_size(request), count,
                                  payload.encode(payload.RecordedCall.canonical(request))))
        await store.add(samples)
        await store.close()

    asyncio.run(fill())
    return location

"""Build a request of batch size B by stacking rows of recorded requests. Pure functions.

Rows are taken along dimension 0 of every input, cycling through the given requests,
so a sweep request at batch 8 is made of real traffic, not zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..protocols.request import (
    DATATYPE_SIZES,
    InferenceRequest,
    Tensor,
    element_count,
    pack_bytes_elements,
    unpack_bytes_elements,
)


def row_signature(req: InferenceRequest) -> tuple[tuple[str, str, tuple[int, ...]], ...] | None:
    """(name, datatype, inner dims) of every input, or None when the inputs share no batch dimension."""
    if not req.inputs or any(not t.shape for t in req.inputs) or len({t.shape[0] for t in req.inputs}) != 1:
        return None
    return tuple(sorted((t.name, t.datatype, t.shape[1:]) for t in req.inputs))


def tensor_rows(t: Tensor) -> list[bytes]:
    """The tensor split along dimension 0, each row as raw bytes in the tensor's own serialisation."""
    n = t.shape[0]
    if n == 0:
        return []
    if t.datatype == "BYTES":
        elements = unpack_bytes_elements(t.data)
        per_row = element_count(t.shape[1:])
        return [pack_bytes_elements(elements[i * per_row : (i + 1) * per_row]) for i in range(n)]
    size = (DATATYPE_SIZES[t.datatype] or 1) * element_count(t.shape[1:])
    return [t.data[i * size : (i + 1) * size] for i in range(n)]


def stack(requests: Sequence[InferenceRequest], batch: int) -> InferenceRequest:
    """A request like ``requests[0]`` with ``batch`` rows drawn cyclically from all of them.

    All requests must share one ``row_signature``; raises ValueError otherwise.
    """
    if not requests or batch < 1:
        raise ValueError("stacking needs at least one request and a batch >= 1")
    signature = row_signature(requests[0])
    if signature is None or any(row_signature(r) != signature for r in requests):
        raise ValueError("requests to stack must share inputs with one batch dimension")
    rows_by_input: dict[str, list[bytes]] = {t.name: [] for t in requests[0].inputs}
    for req in requests:
        for t in req.inputs:
            rows_by_input[t.name].extend(tensor_rows(t))
    total = len(next(iter(rows_by_input.values())))
    if total == 0:
        raise ValueError("requests to stack hold no rows")
    inputs = tuple(
        Tensor(t.name, t.datatype, (batch, *t.shape[1:]),
               b"".join(rows_by_input[t.name][i % total] for i in range(batch)))
        for t in requests[0].inputs
    )
    return dataclasses.replace(requests[0], inputs=inputs, id="")

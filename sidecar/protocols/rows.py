"""Rows of canonical tensors along dimension 0 (the batch dimension). Pure functions.

- ``stack``: a request of batch size B made of rows of recorded requests, cycling through them, so a
  warm-up sweep at batch 8 is real traffic, not zeros;
- ``batch_signature`` / ``merge`` / ``split``: what the batcher needs to put several callers' rows in
  one request and hand each caller exactly its own rows of the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .request import (
    DATATYPE_SIZES,
    InferenceRequest,
    InferenceResponse,
    Params,
    RequestedOutput,
    Tensor,
    element_count,
    pack_bytes_elements,
    unpack_bytes_elements,
)

# Options that choose only each caller's wire form (JSON or binary outputs, TF Serving's row or columnar),
# so callers differing in them may share a batch. Other options (priority, timeout) must agree: the batch
# goes to the server with them.
WIRE_FORM_OPTIONS = frozenset({"binary_data_output", "format"})


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


Signature = tuple[object, ...]


def rows_of(req: InferenceRequest) -> int | None:
    """The batch size every input shares (>= 1), or None when the request has no common batch dimension."""
    if row_signature(req) is None:
        return None
    rows = req.inputs[0].shape[0]
    return rows if rows >= 1 else None


def batch_signature(req: InferenceRequest) -> Signature | None:
    """What callers must share to be batched without changing anyone's answer: model, version, method,
    input names, datatypes and non-batch dimensions, requested outputs, result-changing parameters.
    None when the request cannot be batched at all."""
    rows = row_signature(req)
    if rows is None:
        return None
    family = "kserve" if req.protocol.value.startswith("kserve") else req.protocol.value
    outputs = tuple(sorted((o.name, o.parameters) for o in req.outputs))
    options = tuple(p for p in req.options if p[0] not in WIRE_FORM_OPTIONS)
    return family, req.model, req.version, req.method, rows, outputs, req.parameters, options


def merge(requests: Sequence[InferenceRequest]) -> InferenceRequest:
    """One request holding every caller's rows in order; the callers share one ``batch_signature``.

    Outputs are asked for in the binary form (the cheapest to read back); the request carries no id."""
    first = requests[0]
    inputs = []
    for t in first.inputs:
        parts = [r.input(t.name) for r in requests]
        inputs.append(Tensor(t.name, t.datatype, (sum(p.shape[0] for p in parts), *t.shape[1:]),
                             b"".join(p.data for p in parts)))
    options: Params = tuple(sorted((*(p for p in first.options if p[0] not in WIRE_FORM_OPTIONS),
                                    ("binary_data_output", "true"))))
    outputs = tuple(RequestedOutput(o.name, True, o.parameters) for o in first.outputs)
    return dataclasses.replace(first, inputs=tuple(inputs), outputs=outputs, options=options, id="")


def split(response: InferenceResponse, rows: Sequence[int]) -> list[InferenceResponse]:
    """Each caller's own rows of a batched answer, in order; ValueError when an output's leading
    dimension is not the batch's total (the answer cannot be divided: each caller goes alone)."""
    total = sum(rows)
    per_output: list[list[bytes]] = []
    for t in response.outputs:
        if not t.shape or t.shape[0] != total:
            raise ValueError(f"output {t.name!r} has shape {t.shape}, not a batch of {total} rows")
        per_output.append(tensor_rows(t))
    parts = []
    start = 0
    for n in rows:
        outputs = tuple(Tensor(t.name, t.datatype, (n, *t.shape[1:]), b"".join(cut[start : start + n]))
                        for t, cut in zip(response.outputs, per_output, strict=True))
        parts.append(dataclasses.replace(response, outputs=outputs, id=""))
        start += n
    return parts

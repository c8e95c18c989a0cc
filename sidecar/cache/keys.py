"""Request identity: one digest for "the same call", whatever wire form carried it.

The recorder counts requests by it and the response cache will key on it. It covers
everything that changes the answer (model, version, call, inputs, requested outputs,
parameters) and nothing that does not (request id, JSON vs binary encoding, header order).
"""

from __future__ import annotations

import hashlib
import struct

from ..protocols.request import InferenceRequest, Params

# Parameters that only choose a wire form or a scheduling hint, not the answer.
_WIRE_ONLY_PARAMS = frozenset({"binary_data_output", "binary_data_size", "binary_data", "priority", "timeout"})
# TF Serving REST's row or columnar form (``instances``/``predictions`` or ``inputs``/``outputs``) holds the
# same tensors and gets the same answer: one cached answer serves both, encoded for each caller. Only for
# TF Serving, whose request parameters are the codec's own; a KServe parameter "format" reaches the model.
_TF_CACHE_WIRE_ONLY = _WIRE_ONLY_PARAMS | {"format"}
# Parameters of stateful (sequence) calls: their answer depends on what came before.
_SEQUENCE_PARAMS = frozenset({"sequence_id", "sequence_start", "sequence_end"})


def _frame(h: hashlib.blake2b, *parts: bytes) -> None:
    # Length-prefix every part, so ("ab", "c") and ("a", "bc") never collide.
    for part in parts:
        h.update(struct.pack("<Q", len(part)))
        h.update(part)


def _params(h: hashlib.blake2b, params: Params, wire_only: frozenset[str] = _WIRE_ONLY_PARAMS) -> None:
    kept = [(k, v) for k, v in params if k not in wire_only]
    h.update(struct.pack("<I", len(kept)))
    for k, v in kept:
        _frame(h, k.encode(), v.encode())


def request_key(req: InferenceRequest) -> str:
    """Hex digest (128 bits) of the request's identity."""
    return _identity(req, 16).hexdigest()


def cache_key(req: InferenceRequest, generation: str, scope: bytes = b"") -> bytes:
    """256-bit digest of a cached answer's identity: the request's, the generation of the model that
    answers it (versions served, reloads seen: an unversioned call never gets an answer of a version
    no longer loaded) and the caller's scope (a tenant header's value, when configured)."""
    h = _identity(req, 32, cache=True)
    _frame(h, generation.encode(), scope)
    return h.digest()


def is_stateful(req: InferenceRequest) -> bool:
    """A call of a sequence (Triton's sequence batcher): never cached, never batched with others."""
    return any(k in _SEQUENCE_PARAMS for k, _ in req.parameters)


def _identity(req: InferenceRequest, size: int, cache: bool = False) -> hashlib.blake2b:
    h = hashlib.blake2b(digest_size=size)
    # KServe HTTP and gRPC calls of one model are the same call; so are TF REST and gRPC.
    family = "kserve" if req.protocol.value.startswith("kserve") else "tfserving"
    _frame(h, family.encode(), req.model.encode(), req.version.encode(), req.method.encode())
    _params(h, req.parameters, _TF_CACHE_WIRE_ONLY if cache and family == "tfserving" else _WIRE_ONLY_PARAMS)
    h.update(struct.pack("<I", len(req.inputs)))
    for t in sorted(req.inputs, key=lambda t: t.name):
        _frame(h, t.name.encode(), t.datatype.encode(), struct.pack(f"<{len(t.shape)}q", *t.shape), t.data)
    h.update(struct.pack("<I", len(req.outputs)))
    for o in sorted(req.outputs, key=lambda o: o.name):
        _frame(h, o.name.encode())
        _params(h, o.parameters)
    return h


def shape_signature(req: InferenceRequest) -> str:
    """The shapes that reach the model, e.g. ``INPUT0:FP32[4,16];INPUT1:INT64[4]``."""
    return ";".join(
        f"{t.name}:{t.datatype}[{','.join(map(str, t.shape))}]" for t in sorted(req.inputs, key=lambda t: t.name)
    )


def batch_size(req: InferenceRequest) -> int:
    """The leading dimension shared by the inputs, or 1 when they have none."""
    leading = {t.shape[0] for t in req.inputs if t.shape}
    return leading.pop() if len(leading) == 1 else 1

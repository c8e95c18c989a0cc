"""Request identity: one digest for "the same call", whatever wire form carried it.

The recorder counts requests by it and the response cache keys on it. It covers everything the
model sees (model, version, call, inputs, requested outputs, the parameters the model reads) and
nothing that only the server or the wire consumes (request id, JSON vs binary encoding, priority,
timeout: ``InferenceRequest.options``). What travels outside the body but reaches the model
(forwarded headers, a restriction key: ``protocols.forwarded``) and the cache's scope are added by
the cache as ``scope``.
"""

from __future__ import annotations

import hashlib
import struct

from .protocols.request import InferenceRequest, Params, RequestedOutput, Tensor

# Output parameters that choose only a wire form (HTTP's binary_data; Triton's gRPC front ignores it).
_WIRE_ONLY_OUTPUT_PARAMS = frozenset({"binary_data"})
# Options (parameters the server consumes) of stateful calls: their answer depends on what came before.
_SEQUENCE_OPTIONS = frozenset({"sequence_id", "sequence_start", "sequence_end"})


_U64 = struct.Struct("<Q").pack
_U32 = struct.Struct("<I").pack
# Tensor data up to this size is hashed in one update with the framing around it; larger data is hashed
# where it lies (never copied).
_JOIN_BYTES = 4096


def _framed(out: list[bytes], part: bytes) -> None:
    out.append(_U64(len(part)))
    out.append(part)


def _params(out: list[bytes], params: Params, wire_only: frozenset[str] = frozenset()) -> None:
    kept = [(k, v) for k, v in params if k not in wire_only]
    out.append(_U32(len(kept)))
    for k, v in kept:
        _framed(out, k.encode())
        _framed(out, v.encode())


def request_key(req: InferenceRequest) -> str:
    """Hex digest (128 bits) of the request's identity."""
    return _identity(req, 16).hexdigest()


def cache_key(req: InferenceRequest, generation: str, scope: bytes = b"") -> bytes:
    """256-bit digest of a cached answer's identity: the request's, the generation of the model that
    answers it (versions served, reloads seen: an unversioned call never gets an answer of a version
    no longer loaded) and the caller's scope (a tenant header's value, when configured)."""
    return _identity(req, 32, tail=(generation.encode(), scope)).digest()


def is_stateful(req: InferenceRequest) -> bool:
    """A call of a sequence (Triton's sequence batcher): never cached, batched, recorded or replayed."""
    return bool(req.options) and any(k in _SEQUENCE_OPTIONS for k, _ in req.options)


def _by_name(t: Tensor | RequestedOutput) -> str:
    return t.name


def _identity(req: InferenceRequest, size: int, tail: tuple[bytes, ...] = ()) -> hashlib.blake2b:
    """The digest state of everything that makes the answer. The byte stream hashed is fixed (recorded
    traffic is keyed by it): framed parts, collected and hashed in few updates because this runs for
    every call, twice (the recorder's key and the cache's)."""
    h = hashlib.blake2b(digest_size=size)
    # KServe HTTP and gRPC calls of one model are the same call: both name each tensor's datatype, and
    # Triton checks it the same way. TF Serving REST JSON has no datatypes (the server casts to the
    # signature's), its gRPC tensors do (and must match): their canonical forms mean different things.
    family = "kserve" if req.protocol.value.startswith("kserve") else req.protocol.value
    out: list[bytes] = []
    for part in (family, req.model, req.version, req.method):
        _framed(out, part.encode())
    _params(out, req.parameters)  # what the model sees; options (priority, wire forms) change no answer
    out.append(_U32(len(req.inputs)))
    for t in sorted(req.inputs, key=_by_name) if len(req.inputs) > 1 else req.inputs:
        _framed(out, t.name.encode())
        _framed(out, t.datatype.encode())
        _framed(out, struct.pack(f"<{len(t.shape)}q", *t.shape))
        out.append(_U64(len(t.data)))
        if len(t.data) > _JOIN_BYTES:
            h.update(b"".join(out))
            h.update(t.data)
            out.clear()
        else:
            out.append(t.data)
    out.append(_U32(len(req.outputs)))
    for o in sorted(req.outputs, key=_by_name) if len(req.outputs) > 1 else req.outputs:
        _framed(out, o.name.encode())
        _params(out, o.parameters, _WIRE_ONLY_OUTPUT_PARAMS)
    for extra in tail:
        _framed(out, extra)
    h.update(b"".join(out))
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

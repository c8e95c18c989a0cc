"""The canonical inference request and response.

Every codec turns its wire format into these frozen values and back. Tensor
contents are always raw little-endian bytes; ``BYTES`` tensors use Triton's
serialisation (each element a 4-byte little-endian length, then its bytes), so
two requests that mean the same thing compare equal whatever wire form (JSON or
binary extension) carried them.

The caller's own wire bytes are not part of these values: they ride along on the stage
contract's ``Call`` and ``Reply`` (``pipeline/stage.py``) for untouched forwarding.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any

import orjson


class Protocol(enum.StrEnum):
    KSERVE_HTTP = "kserve_http"
    TFSERVING_REST = "tfserving_rest"
    KSERVE_GRPC = "kserve_grpc"
    TFSERVING_GRPC = "tfserving_grpc"


# KServe v2 datatype -> element size in bytes (None: variable, BYTES).
DATATYPE_SIZES: dict[str, int | None] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
    "BYTES": None,
}

# Parameters are kept as a sorted tuple of (key, JSON-encoded value) so they are
# hashable and order-independent.
Params = tuple[tuple[str, str], ...]


def freeze_params(params: dict[str, Any] | None) -> Params:
    if not params:
        return ()
    return tuple(sorted((str(k), orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()) for k, v in params.items()))


def thaw_params(params: Params) -> dict[str, Any]:
    return {k: orjson.loads(v) for k, v in params}


def element_count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def pack_bytes_elements(items: list[bytes]) -> bytes:
    """Triton's BYTES serialisation: each element as <u32 LE length><bytes>."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def unpack_bytes_elements(raw: bytes) -> list[bytes]:
    """Inverse of :func:`pack_bytes_elements`; raises ValueError on bad framing."""
    out: list[bytes] = []
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 4 > end:
            raise ValueError("truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > end:
            raise ValueError("BYTES element runs past the end of the tensor")
        out.append(raw[pos : pos + n])
        pos += n
    return out


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes

    @property
    def batch_size(self) -> int:
        return self.shape[0] if self.shape else 1


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    # Whether the caller asked for the binary tensor extension for this output.
    binary: bool | None = None
    parameters: Params = ()


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    protocol: Protocol
    model: str
    version: str = ""
    # Which call: "infer" for KServe v2; "predict" | "classify" | "regress" for TF Serving.
    method: str = "infer"
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[RequestedOutput, ...] = ()
    # Parameters the model sees (custom request parameters, TF `signature_name`, ...): they can change the
    # answer, so they are part of the call's identity.
    parameters: Params = ()
    # Parameters the model server consumes and the model never sees: scheduling (``priority``,
    # ``timeout``), sequence control (``sequence_id``, ``sequence_start``, ``sequence_end``) and wire
    # choices (HTTP's ``binary_data_output``, TF Serving REST's row or columnar ``format``). Kept so a
    # re-encoded call carries them; never part of a cached answer's identity.
    options: Params = ()
    # The caller's correlation id; echoed by the server but not part of identity.
    id: str = field(default="", compare=False)

    def input(self, name: str) -> Tensor:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class InferenceResponse:
    protocol: Protocol
    model: str
    version: str = ""
    outputs: tuple[Tensor, ...] = ()
    parameters: Params = ()
    id: str = field(default="", compare=False)

"""A cached answer: the canonical response plus its timing, and its byte form for the shared tier.

Byte form (pure functions): ``<u32 LE header length><JSON header><tensor bytes...>``; the header
holds protocol, model, version, parameters and, per output, name, datatype, shape and length.
Anything that does not decode exactly is refused (ValueError): a shared tier written by another
version of the sidecar, or corrupted, must read as a miss, never as a wrong answer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import orjson

from ..protocols.request import DATATYPE_SIZES, InferenceResponse, Protocol, Tensor, element_count

_VERSION = 1
_HEADER = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Entry:
    response: InferenceResponse
    stored_at: float  # time.time() when the model server answered
    expires_at: float
    size: int  # bytes the entry accounts for in a tier


def response_size(response: InferenceResponse) -> int:
    """What a response costs in memory, roughly: its tensor bytes plus a fixed overhead per tensor."""
    return 256 + sum(len(t.data) + 96 + len(t.name) for t in response.outputs)


def encode(response: InferenceResponse, stored_at: float) -> bytes:
    header = {
        "v": _VERSION,
        "p": response.protocol.value,
        "m": response.model,
        "ver": response.version,
        "params": [list(p) for p in response.parameters],
        "t": stored_at,
        "out": [[t.name, t.datatype, list(t.shape), len(t.data)] for t in response.outputs],
    }
    head = orjson.dumps(header)
    return b"".join([_HEADER.pack(len(head)), head, *(t.data for t in response.outputs)])


def decode(data: bytes) -> tuple[InferenceResponse, float]:
    """(response, stored_at); ValueError for anything this version did not write exactly."""
    if len(data) < _HEADER.size:
        raise ValueError("cache entry too short")
    (n,) = _HEADER.unpack_from(data)
    try:
        header: Any = orjson.loads(data[_HEADER.size : _HEADER.size + n])
    except orjson.JSONDecodeError as e:
        raise ValueError(f"cache entry header is not JSON: {e}") from None
    if not isinstance(header, dict) or header.get("v") != _VERSION:
        raise ValueError("cache entry of an unknown layout")
    try:
        pos = _HEADER.size + n
        outputs = []
        for name, datatype, shape, length in header["out"]:
            tensor = Tensor(str(name), str(datatype), tuple(int(d) for d in shape), data[pos : pos + length])
            _check(tensor, length)
            outputs.append(tensor)
            pos += length
        if pos != len(data):
            raise ValueError("cache entry has bytes no output claims")
        response = InferenceResponse(Protocol(header["p"]), str(header["m"]), str(header["ver"]), tuple(outputs),
                                     tuple((str(k), str(v)) for k, v in header["params"]))
        return response, float(header["t"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"cache entry header is incomplete ({type(e).__name__})") from None


def _check(tensor: Tensor, length: int) -> None:
    if len(tensor.data) != length or tensor.datatype not in DATATYPE_SIZES or any(d < 0 for d in tensor.shape):
        raise ValueError("cache entry is truncated or malformed")
    size = DATATYPE_SIZES[tensor.datatype]
    if size is not None and length != element_count(tensor.shape) * size:
        raise ValueError("cache entry tensor size does not match its shape")

"""Protocol-buffer wire format, written by hand for the few messages the sidecar builds on a hot path
(a stream's response wrapper, an ORCA load report), where a generated message's round trip costs more
than the bytes. Pure functions; the layout is protoc's: fields in number order, zero values left out
by the caller."""

from __future__ import annotations

import struct

__all__ = ["double_field", "length_field", "varint"]

_FIXED64, _LENGTH = 1, 2


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: a string, bytes, an embedded message or a map entry."""
    return varint(number << 3 | _LENGTH) + varint(len(payload)) + payload


def double_field(number: int, value: float) -> bytes:
    return varint(number << 3 | _FIXED64) + struct.pack("<d", value)

"""TFRecord framing, as TF Serving reads ``assets.extra/tf_serving_warmup_requests``. Pure functions.

A record is ``<u64 LE length><u32 LE masked crc32c of the length bytes><data><u32 LE masked crc32c
of data>`` (tensorflow/core/lib/io/record_writer.cc). The CRC is CRC-32C (Castagnoli), "masked" so
that a CRC of data holding CRCs is not trivially predictable (tensorflow/core/lib/hash/crc32c.h).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

_POLY = 0x82F63B78  # CRC-32C, reflected
_MASK_DELTA = 0xA282EAD8


def _table() -> tuple[int, ...]:
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        out.append(c)
    return tuple(out)


_TABLE = _table()


def crc32c(data: bytes) -> int:
    # Table-driven, one byte a step: warm-up files are small (TF Serving reads at most 1000 records),
    # so a C extension would not earn its place as a dependency.
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def write_records(records: Iterable[bytes]) -> bytes:
    out = bytearray()
    for data in records:
        length = struct.pack("<Q", len(data))
        out += length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))
    return bytes(out)


def read_records(blob: bytes) -> Iterator[bytes]:
    """Each record's data; ValueError naming the record on bad framing or a CRC mismatch."""
    pos, index = 0, 0
    while pos < len(blob):
        if pos + 12 > len(blob):
            raise ValueError(f"record {index}: truncated header")
        length_bytes = blob[pos : pos + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack_from("<I", blob, pos + 8)
        if masked_crc(length_bytes) != length_crc:
            raise ValueError(f"record {index}: length CRC mismatch")
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(blob):
            raise ValueError(f"record {index}: truncated data ({length} bytes announced)")
        data = blob[start:end]
        (data_crc,) = struct.unpack_from("<I", blob, end)
        if masked_crc(data) != data_crc:
            raise ValueError(f"record {index}: data CRC mismatch")
        yield data
        pos, index = end + 4, index + 1

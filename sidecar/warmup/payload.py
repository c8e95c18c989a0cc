"""A recorded call, serialised for the traffic store: exactly what to send again.

The caller's own wire bytes are kept (not a re-encoding), so replay sends the model
server precisely what real clients sent. Layout: <u32 LE header length><JSON header><body>.
Pure functions.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import orjson

from ..protocols import dispatch
from ..protocols.request import InferenceRequest

# Only these request headers change how the server reads the body.
KEPT_HEADERS = frozenset({"content-type", "inference-header-content-length", "content-encoding"})
_VERSION = 1


@dataclass(frozen=True, slots=True)
class RecordedCall:
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @classmethod
    def of(cls, path: str, headers: tuple[tuple[str, str], ...], body: bytes) -> RecordedCall:
        return cls(path, tuple((k, v) for k, v in headers if k.lower() in KEPT_HEADERS), body)

    @classmethod
    def from_wire(cls, target: bytes, headers: tuple[tuple[bytes, bytes], ...], body: bytes) -> RecordedCall:
        """From an HTTP caller's raw request (header bytes kept exactly, through latin-1)."""
        kept = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
                     if k.lower().decode("latin-1") in KEPT_HEADERS)
        return cls(target.decode("latin-1"), kept, body)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def to_request(self, max_decoded_bytes: int = 1 << 30) -> InferenceRequest:
        """Decode with the codec its path names; raises DecodeError (or ValueError) when it cannot."""
        route = dispatch.match(self.path.partition("?")[0])
        if route is None:
            raise ValueError(f"recorded path {self.path!r} is not an inference path")
        length = self.header("inference-header-content-length")
        encoding = self.header("content-encoding")
        return dispatch.decode_wire(route, self.body, [] if length is None else [length.encode("latin-1")],
                                    None if encoding is None else encoding.encode("latin-1"), max_decoded_bytes)


def encode(call: RecordedCall) -> bytes:
    header = orjson.dumps({"v": _VERSION, "path": call.path, "headers": [list(h) for h in call.headers]})
    return struct.pack("<I", len(header)) + header + call.body


def decode(data: bytes) -> RecordedCall:
    """Raises ValueError on anything that is not a payload this version wrote."""
    if len(data) < 4:
        raise ValueError("recorded payload too short")
    (n,) = struct.unpack_from("<I", data)
    try:
        header = orjson.loads(data[4 : 4 + n])
    except orjson.JSONDecodeError as e:
        raise ValueError(f"recorded payload header is not JSON: {e}") from None
    if not isinstance(header, dict) or header.get("v") != _VERSION or not isinstance(header.get("path"), str):
        raise ValueError("recorded payload header has an unknown layout")
    headers = tuple((str(k), str(v)) for k, v in header.get("headers", []))
    return RecordedCall(header["path"], headers, data[4 + n :])

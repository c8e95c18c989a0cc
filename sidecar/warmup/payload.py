"""A recorded call, serialised for the traffic store: exactly the call its key names, to send again.

What is kept is the canonical request re-encoded in its family's HTTP form (binary tensors for
KServe), never the caller's own bytes: a caller chooses those bytes, and only what the codec read
from them (the request's identity) may be replayed. Beside the body: the headers that shape it
(Content-Type, Inference-Header-Content-Length) and the headers the model server turns into model
parameters (``context``, Triton's header forwarding), never a credential or any other caller header.

Layout: <u32 LE header length><JSON header><body>. Version 2 adds ``context``; version 1 payloads
(the caller's own bytes, written by older sidecars) are still read, and like every payload are
replayed only when they decode to exactly the request their key names (:func:`check`).
Pure functions.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import orjson

from ..errors import SidecarError
from ..identity import is_stateful, request_key
from ..protocols import dispatch, forwarded
from ..protocols.request import InferenceRequest

# Only these request headers change how the server reads the body.
KEPT_HEADERS = frozenset({"content-type", "inference-header-content-length", "content-encoding"})
# Headers that carry credentials whatever the configuration says: a call forwarding one of them to the
# model cannot be recorded without storing the credential. (gRPC metadata keys are lower case already.)
CREDENTIALS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})
_VERSION = 2
_READABLE = frozenset({1, 2})


class Unreplayable(ValueError):
    """A stored payload that must not be replayed; ``reason`` is one of the REASONS (no payload text)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


STATEFUL, MISMATCH, UNREADABLE, CREDENTIAL = "stateful", "mismatch", "unreadable", "credential"
REASONS = (STATEFUL, MISMATCH, UNREADABLE, CREDENTIAL)


@dataclass(frozen=True, slots=True)
class RecordedCall:
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    # Headers that reach the model as parameters (names and values as sent, latin-1 text of their bytes).
    context: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, path: str, headers: tuple[tuple[str, str], ...], body: bytes) -> RecordedCall:
        return cls(path, tuple((k, v) for k, v in headers if k.lower() in KEPT_HEADERS), body)

    @classmethod
    def from_wire(cls, target: bytes, headers: tuple[tuple[bytes, bytes], ...], body: bytes,
                  context: forwarded.Context = ()) -> RecordedCall:
        """From an HTTP request's parts (header bytes kept exactly, through latin-1)."""
        kept = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
                     if k.lower().decode("latin-1") in KEPT_HEADERS)
        return cls(target.decode("latin-1"), kept, body, _text(context))

    @classmethod
    def canonical(cls, request: InferenceRequest, context: forwarded.Context = ()) -> RecordedCall:
        """``request`` in its family's HTTP form with the model-reaching headers ``context`` (no learned
        restriction key: the caller must have filtered them). ValueError when it has no such form."""
        return cls.from_wire(*dispatch.encode_http(request), context=context)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def context_bytes(self) -> forwarded.Context:
        return tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in self.context)

    def to_request(self, max_decoded_bytes: int = 1 << 30) -> InferenceRequest:
        """Decode with the codec its path names; raises DecodeError (or ValueError) when it cannot."""
        route = dispatch.match(self.path.partition("?")[0])
        if route is None:
            raise ValueError(f"recorded path {self.path!r} is not an inference path")
        length = self.header("inference-header-content-length")
        encodings = [v.encode("latin-1") for k, v in self.headers if k.lower() == "content-encoding"]
        return dispatch.decode_wire(route, self.body, [] if length is None else [length.encode("latin-1")],
                                    encodings, max_decoded_bytes)


def _text(context: forwarded.Context) -> tuple[tuple[str, str], ...]:
    return tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in context)


def call_key(identity: str, context: forwarded.Context) -> str:
    """The recorder's key of a call: the request's identity (``request_key``), and the headers that reach
    the model with it, which make it another call to the model. Without such headers, the request key
    itself (what every version has stored)."""
    if not context:
        return identity
    return hashlib.blake2b(identity.encode() + b"\0" + forwarded.encode(context), digest_size=16).hexdigest()


def check(call: RecordedCall, key: str, secret_names: frozenset[bytes] = CREDENTIALS,
          max_decoded_bytes: int = 1 << 30) -> InferenceRequest:
    """The request ``call`` replays, when it is exactly the call ``key`` names and may be sent again:
    not stateful, no credential among its headers. Raises Unreplayable."""
    context = call.context_bytes()
    if any(name.startswith(b"\0") or name.lower() in secret_names for name, _ in context):
        raise Unreplayable(CREDENTIAL)
    try:
        request = call.to_request(max_decoded_bytes)
    except (ValueError, SidecarError):
        raise Unreplayable(UNREADABLE) from None
    if is_stateful(request):
        raise Unreplayable(STATEFUL)
    if call_key(request_key(request), context) != key:
        raise Unreplayable(MISMATCH)
    return request


def encode(call: RecordedCall) -> bytes:
    fields: dict[str, object] = {"v": _VERSION, "path": call.path, "headers": [list(h) for h in call.headers]}
    if call.context:
        fields["context"] = [list(h) for h in call.context]
    header = orjson.dumps(fields)
    return struct.pack("<I", len(header)) + header + call.body


def decode(data: bytes) -> RecordedCall:
    """Raises ValueError on anything that is not a payload a known version wrote."""
    if len(data) < 4:
        raise ValueError("recorded payload too short")
    (n,) = struct.unpack_from("<I", data)
    try:
        header = orjson.loads(data[4 : 4 + n])
    except orjson.JSONDecodeError as e:
        raise ValueError(f"recorded payload header is not JSON: {e}") from None
    version = header.get("v") if isinstance(header, dict) else None
    if type(version) is not int or version not in _READABLE or not isinstance(header.get("path"), str):
        raise ValueError("recorded payload header has an unknown layout")
    headers = _pairs(header.get("headers", []))
    context = _pairs(header.get("context", [])) if version >= 2 else ()
    return RecordedCall(header["path"], headers, data[4 + n :], context)


def _pairs(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
        raise ValueError("recorded payload header has an unknown layout")
    return tuple((str(k), str(v)) for k, v in value)

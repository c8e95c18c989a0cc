"""What travels between the edge, the stages and the upstream: one call and its answer.

A :class:`Call` is one inference call as the stages see it: the canonical request, the caller's
wire form for untouched forwarding, a deadline and what the edge learned of the caller. A
:class:`Reply` is its answer: the upstream's own wire answer for the call it belongs to, and/or the
canonical response any front can encode for its own caller. Ground floor: imports only the
canonical types below it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .identity import is_stateful
from .protocols.forwarded import Context
from .protocols.request import InferenceRequest, InferenceResponse

Header = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class HttpWire:
    """An HTTP caller's request exactly as it goes upstream: raw target, end-to-end headers, body."""

    target: bytes
    headers: tuple[Header, ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """The model server's own HTTP answer: status, reason, end-to-end headers and body."""

    status: int
    reason: bytes
    headers: tuple[Header, ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class GrpcWire:
    """A gRPC caller's request exactly as it goes upstream: full method name, serialized message,
    the metadata to forward (hop-specific keys removed)."""

    method: str  # e.g. "/inference.GRPCInferenceService/ModelInfer"
    message: bytes
    metadata: tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True, slots=True)
class GrpcAnswer:
    """The model server's own gRPC answer: the serialized response message (b"" on error), its status
    code name ("OK", "INVALID_ARGUMENT", ...) and details, initial and trailing metadata."""

    code: str
    details: str
    message: bytes
    initial_metadata: tuple[tuple[str, str | bytes], ...] = ()
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()


Wire = HttpWire | GrpcWire
Answer = HttpAnswer | GrpcAnswer


class Memo:
    """What calls with byte-identical requests share: the decoded request (so it is decoded once), its cache
    identity per scope, and the last answer encoded for it. A front hands the same Memo to such calls;
    everything in it is a pure function of those bytes (and of the response object it names), so sharing
    it can never give a caller anything that is not its own."""

    __slots__ = ("answer", "idents", "record_key", "request")

    def __init__(self, request: InferenceRequest) -> None:
        self.request = request
        self.idents: dict[bytes, bytes] = {}  # scope -> cache identity
        self.record_key: str | None = None  # the recorder's key
        self.answer: tuple[InferenceResponse, Any] | None = None  # (response, the front's encoding of it)


@dataclass(slots=True, eq=False)
class Call:
    """One inference call as the stages see it."""

    request: InferenceRequest
    request_id: str
    deadline: float  # absolute, on the event loop's clock
    # The caller's own request; None for calls the sidecar builds (batches, the warm-up sweep).
    wire: Wire | None = None
    # False when the codecs could not model the call: it goes upstream untouched, unrecorded, uncached.
    modelled: bool = True
    route: str = "infer"  # metrics label
    origin: str = "http"  # http | grpc | warmup
    # The caller's cache directives (Cache-Control): no_store skips the cache both ways, no_cache skips
    # the read but stores the answer.
    no_store: bool = False
    no_cache: bool = False
    # The call carries credentials (Authorization, Cookie); ``scope`` is the value of cache.scope_header.
    private: bool = False
    scope: bytes = b""
    memo: Memo | None = None  # set when the front has seen these exact bytes before (small requests)
    # Headers the model server turns into model parameters or checks as a key (``protocols.forwarded``):
    # part of the call's identity, and sent with any call the sidecar builds from this one.
    context: Context = ()

    # The one rule of who may share what, read by the cache, the batcher and the recorder.

    @property
    def shareable(self) -> bool:
        """Whether another caller may get this call's answer (the cache) and its payload be kept to replay (the
        recorder): a modelled call outside a sequence, whose credentials, if any, the operator scoped."""
        return self.modelled and not (self.private and not self.scope) and not is_stateful(self.request)

    @property
    def batchable(self) -> bool:
        """Whether it may share one upstream call with other callers' calls: shareable and without credentials,
        as a batch carries none of its callers' own."""
        return not self.private and self.shareable


Decoder = Callable[[], InferenceResponse]


class Reply:
    """An answer: the upstream's own wire answer for the call that produced it, and/or the canonical
    response (decoded on first use, since a pass-through answer usually never needs it).

    ``status`` is HTTP-like whatever the protocol (200 for a gRPC OK, a gRPC error mapped to the status
    Triton's HTTP API uses for it), so stages judge success the same way for every front."""

    __slots__ = ("_decode", "_response", "cache", "for_call", "source", "status", "wire")

    def __init__(self, status: int, *, wire: Answer | None = None, for_call: Call | None = None,
                 response: InferenceResponse | None = None, decode: Decoder | None = None,
                 source: str = "upstream", cache: str = "") -> None:
        self.status = status
        self.wire = wire
        self.for_call = for_call
        self.source = source
        self.cache = cache
        self._response = response
        self._decode = decode

    def __repr__(self) -> str:
        return f"<Reply {self.status} from {self.source}{' wire' if self.wire else ''}>"

    @property
    def ok(self) -> bool:
        return self.status == 200

    def response(self) -> InferenceResponse:
        """The canonical answer; raises DecodeError when the upstream's answer cannot be modelled."""
        if self._response is None:
            if self._decode is None:
                raise ValueError("this reply carries no canonical response")
            self._response = self._decode()
        return self._response

    def raw_for(self, call: Call) -> Answer | None:
        """The upstream's own bytes, when they answer exactly this caller's request."""
        return self.wire if self.for_call is call else None



"""Which codec owns an HTTP path, and the HTTP forms of requests and answers. Pure functions.

Every decision is taken on the raw path the model server will receive (still percent-encoded,
never normalised): Triton and TF Serving route on exactly that, so the sidecar must too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import DecodeError
from . import compression, kserve_http, safety, tfserving_rest
from .request import InferenceRequest, InferenceResponse, Protocol

Header = tuple[bytes, bytes]
JSON = b"application/json"
OCTET = b"application/octet-stream"
HEADER_LENGTH = b"inference-header-content-length"
# Request-level parameters with which a caller asks for every output in the binary section.
BINARY_OUTPUT_PARAM = "binary_data_output"


@dataclass(frozen=True, slots=True)
class InferenceRoute:
    protocol: Protocol
    model: str
    version: str = ""
    label: str = ""
    method: str = "infer"


def match(path: str) -> InferenceRoute | None:
    """The inference route a POST to ``path`` is, or None for pass-through."""
    if path.startswith("/v2/"):
        kserve = kserve_http.match_infer_path(path)
        if kserve is not None:
            return InferenceRoute(Protocol.KSERVE_HTTP, kserve[0], kserve[1])
    elif path.startswith("/v1/"):
        tf = tfserving_rest.match_infer_path(path)
        if tf is not None:
            model, version, label, method = tf
            return InferenceRoute(Protocol.TFSERVING_REST, model, version, label, method)
    return None


def decode(route: InferenceRoute, body: bytes, header_length: int | None) -> InferenceRequest:
    if route.protocol is Protocol.KSERVE_HTTP:
        return kserve_http.decode_request(route.model, route.version, body, header_length)
    return tfserving_rest.decode_request(route.model, route.version, route.label, route.method, body)


def decode_wire(route: InferenceRoute, body: bytes, header_lengths: list[bytes], encodings: list[bytes],
                limit: int) -> InferenceRequest:
    """Decode a request as it came off the wire; DecodeError when it cannot be modelled, UnsafeInput when the
    model server must not see it, PayloadTooLarge when it decompresses past ``limit``.

    ``header_lengths`` are the raw Inference-Header-Content-Length values (normally none or one);
    ``encodings`` the raw Content-Encoding values (normally none or one)."""
    if len(encodings) > 1:
        # Triton reads the first and ignores the rest: one reading of "which coding" is all the sidecar models.
        raise DecodeError("Content-Encoding: given more than once")
    if encodings:
        body = compression.decompress(encodings[0], body, limit)
    if route.protocol is Protocol.KSERVE_HTTP:
        safety.check(body, header_lengths)
    if len(header_lengths) > 1:
        raise DecodeError("Inference-Header-Content-Length: given more than once")
    return decode(route, body, parse_length(header_lengths[0] if header_lengths else None))


def parse_length(value: bytes | None) -> int | None:
    """A strict non-negative decimal (ASCII digits only, at most 19 of them); DecodeError otherwise. (Triton
    reads it with atoi, which takes more spellings: those it reads alike are left to it, not modelled.)"""
    if value is None:
        return None
    text = value
    if not text or len(text) > 19 or not text.isdigit():  # bytes.isdigit is ASCII-only
        raise DecodeError("Inference-Header-Content-Length: expected a non-negative integer")
    return int(text)


def decode_answer(request: InferenceRequest, headers: tuple[Header, ...], body: bytes,
                  limit: int) -> InferenceResponse:
    """The canonical form of the model server's successful HTTP answer to ``request``."""
    length = encoding = None
    for k, v in headers:
        lower = k.lower()
        if lower == HEADER_LENGTH:
            length = v
        elif lower == b"content-encoding":
            encoding = v
    if encoding is not None:
        body = compression.decompress(encoding, body, limit)
    if request.protocol is Protocol.TFSERVING_REST:
        return tfserving_rest.decode_response(request.method, body, tfserving_rest.row_format(request))
    return kserve_http.decode_response(body, parse_length(length))


def encode_answer(request: InferenceRequest, response: InferenceResponse) -> tuple[list[Header], bytes]:
    """The answer for the caller of ``request``, in its own protocol and encoding, with its own id.

    ValueError when the response cannot take the form the caller needs."""
    if request.protocol is Protocol.TFSERVING_REST:
        body = tfserving_rest.encode_response(response, request.method, tfserving_rest.row_format(request))
        return [(b"Content-Type", JSON)], body
    outputs = response.outputs
    if request.outputs:
        # In the answer's own order (the model's), as the server lists them, not in the order asked.
        asked = {o.name for o in request.outputs}
        outputs = tuple(t for t in outputs if t.name in asked)
    wanted = dataclasses.replace(response, outputs=outputs, id=request.id)
    body, header_length = kserve_http.encode_response(wanted, binary_outputs(request, wanted))
    if header_length is None:
        return [(b"Content-Type", JSON)], body
    return [(b"Content-Type", OCTET), (b"Inference-Header-Content-Length", b"%d" % header_length)], body


def encode_http(request: InferenceRequest) -> tuple[bytes, tuple[Header, ...], bytes]:
    """(target, headers, body): a canonical request in its family's HTTP form; KServe v2 requests use the
    binary tensor extension. For calls the sidecar builds (batches, the warm-up sweep) and for recording
    gRPC callers' requests so warm-up can replay them."""
    if request.protocol in (Protocol.TFSERVING_REST, Protocol.TFSERVING_GRPC):
        return tfserving_rest.infer_path(request).encode(), ((b"Content-Type", JSON),), \
            tfserving_rest.encode_request(request)
    body, header_length = kserve_http.encode_request(request, True)
    target = kserve_http.infer_path(request.model, request.version).encode()
    if header_length is None:
        return target, ((b"Content-Type", JSON),), body
    return target, ((b"Content-Type", OCTET), (b"Inference-Header-Content-Length", b"%d" % header_length)), body


def binary_outputs(request: InferenceRequest, response: InferenceResponse) -> frozenset[str]:
    """The outputs the caller asked to receive in the binary section (Triton's rules)."""
    everything = any(k == BINARY_OUTPUT_PARAM and v == "true" for k, v in request.options)
    asked = {o.name: o.binary for o in request.outputs}
    return frozenset(t.name for t in response.outputs
                     if asked.get(t.name) is True or (everything and asked.get(t.name) is not False))


def route_label(path: str) -> str:
    """A small fixed set of labels, so callers cannot mint metric series."""
    if path.startswith("/v2/health") or path == "/v2":
        return "health"
    if path.startswith("/v2/repository"):
        return "repository"
    if path.startswith("/v2/models/"):
        if path.endswith("/ready"):
            return "health"
        if path.endswith("/stats"):
            return "stats"
        return "metadata"
    if path.startswith("/v1/models/"):
        return "metadata"
    return "other"

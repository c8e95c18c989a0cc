"""Which codec owns a path, and a metrics label for every path. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

from . import kserve_http, tfserving_rest
from .request import InferenceRequest, Protocol


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

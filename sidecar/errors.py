"""One exception hierarchy for the whole sidecar.

Stages and codecs raise these; the fronts map them to an HTTP status or a gRPC
code exactly once, at the edge, in the upstream's own error shape.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base class. ``http_status`` is what the HTTP front answers with."""

    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DecodeError(SidecarError):
    """The caller sent something a codec cannot read; the message names the field."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class UnsafeInput(SidecarError):
    """A call the sidecar refuses because it would crash or exhaust the model server (e.g. a JSON tensor
    whose shape declares far more elements than the body holds: Triton reserves memory for the shape)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class BadRequest(SidecarError):
    """A request the sidecar cannot forward as received (a target or header no proxy may pass on)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class Forbidden(SidecarError):
    """A restricted API called without the required header, or an admin action without its token."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class RequestTimeout(SidecarError):
    """The client did not send its request (headers or body) in time."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"


class ClientClosed(SidecarError):
    """The caller went away; nobody is left to answer."""

    http_status = 499
    grpc_code = "CANCELLED"


class PayloadTooLarge(SidecarError):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class UpstreamUnavailable(SidecarError):
    """The model server refused or reset the connection."""

    http_status = 502
    grpc_code = "UNAVAILABLE"


class AnswerTooLarge(UpstreamUnavailable):
    """The model server's answer exceeds ``limits.max_answer_bytes``: a batch's joined answer may, where each
    member's own would not."""


class UpstreamTimeout(SidecarError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class Overloaded(SidecarError):
    """A bounded queue is full or the sidecar refuses work (draining, not warm)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(SidecarError):
    """A configuration value is invalid; start-up stops with exit status 2."""

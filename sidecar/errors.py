"""One exception hierarchy for the whole sidecar.

Stages and codecs raise these; the fronts map them to an HTTP status or a gRPC
code exactly once, at the edge, in the upstream's own error shape.
"""

from __future__ import annotations

from dataclasses import dataclass


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


# -- the one mapping to the wire ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """An error as a front writes it: HTTP status, gRPC code, message, Retry-After (seconds, or None), and
    the Content-Type of an HTTP body, which is ``{"error": message}`` unless ``text`` (Triton's own 403 and
    405 say text/plain)."""

    http_status: int
    grpc_code: str
    message: str
    retry_after: int | None = None
    text: bool = False
    close: bool = False  # the request body may still be arriving: the HTTP connection closes after


def refusal(err: SidecarError) -> Refusal:
    retry = getattr(err, "retry_after", None)
    return Refusal(
        http_status=400 if err.http_status == 499 else err.http_status,  # nobody to answer: Triton's own word
        grpc_code=err.grpc_code,
        message=err.message,
        retry_after=None if retry is None else max(1, round(retry)),
        text=err.http_status in (403, 405),
        close=err.http_status in (408, 413),
    )


# A model server's gRPC status as the HTTP-like status stages judge answers by (Reply.status), whatever the
# protocol: the status Triton's HTTP API uses for the same outcome.
GRPC_TO_HTTP = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}


class MethodNotAllowed(SidecarError):
    http_status = 405
    grpc_code = "UNIMPLEMENTED"

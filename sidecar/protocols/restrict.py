"""Restricted APIs on both data ports, as Triton's ``--http-restricted-api`` and
``--grpc-restricted-protocol`` do it.

The sidecar is the pod's public face, so it offers the same protection in front of the model
server, on every port: a category of API answers only calls that carry a given header with a given
value. Specification (config keys ``restricted_api``, ``grpc_restricted_protocol``):
``API[,API...]:HEADER=VALUE``, several separated by ``;``. APIs: health, metadata, inference,
shared-memory, model-config, model-repository, statistics, trace, logging. A refused call gets
exactly Triton's answer: HTTP 403 ``{"error":"This API is restricted, expecting header 'H'"}`` (the
header name case-insensitive, the first one counts); gRPC status UNAVAILABLE "This protocol is
restricted, expecting header 'triton-grpc-protocol-H'" (metadata keys are lower case).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

API_NAMES = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
             "statistics", "trace", "logging")

_MODEL = r"/v2/models/[^/]+(?:/versions/[^/]+)?"
_TF_MODEL = r"/v1/models/[^/:]+(?:/versions/[^/:]+|/labels/[^/:]+)?"
_CATEGORIES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"/v2/health/(?:live|ready)|" + _MODEL + "/ready"), "health"),
    (re.compile(_MODEL + r"/(?:infer|generate|generate_stream)|" + _TF_MODEL + r":(?:predict|classify|regress)",
                re.IGNORECASE), "inference"),
    (re.compile(r"/v2/(?:system|cuda)sharedmemory(?:/.*)?"), "shared-memory"),
    (re.compile(_MODEL + r"/config"), "model-config"),
    (re.compile(r"/v2/repository(?:/.*)?"), "model-repository"),
    (re.compile(r"/v2/models(?:/[^/]+(?:/versions/[^/]+)?)?/stats"), "statistics"),
    (re.compile(r"/v2(?:/models/[^/]+)?/trace/setting"), "trace"),
    (re.compile(r"/v2/logging"), "logging"),
    (re.compile(r"/v2|" + _MODEL + "|" + _TF_MODEL + r"(?:/metadata)?"), "metadata"),
]


# Triton's gRPC methods per category (grpc_server.cc); TF Serving's, by the same meaning.
_GRPC_CATEGORIES: dict[str, str] = {
    "ServerLive": "health", "ServerReady": "health", "ModelReady": "health", "Check": "health", "Watch": "health",
    "List": "health", "ServerMetadata": "metadata", "ModelMetadata": "metadata", "ModelConfig": "model-config",
    "SystemSharedMemoryStatus": "shared-memory", "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory", "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory", "CudaSharedMemoryUnregister": "shared-memory",
    "RepositoryIndex": "model-repository", "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository", "ModelStatistics": "statistics", "TraceSetting": "trace",
    "LogSettings": "logging", "ModelInfer": "inference", "ModelStreamInfer": "inference",
    # TF Serving
    "Predict": "inference", "Classify": "inference", "Regress": "inference", "MultiInference": "inference",
    "GetModelMetadata": "metadata", "GetModelStatus": "metadata", "HandleReloadConfigRequest": "model-repository",
}
GRPC_KEY_PREFIX = b"triton-grpc-protocol-"


def grpc_category(method: str) -> str | None:
    """The API category of a gRPC method (its bare name, e.g. "ModelInfer")."""
    return _GRPC_CATEGORIES.get(method)


def category(path: str) -> str | None:
    """The API category of a raw request path, or None (an unknown path belongs to none)."""
    for pattern, name in _CATEGORIES:
        if pattern.fullmatch(path):
            return name
    return None


@dataclass(frozen=True, slots=True)
class Restriction:
    apis: frozenset[str]
    header: bytes  # lower case
    value: bytes


def parse_grpc(spec: str) -> list[Restriction]:
    """The gRPC port's restrictions: the same spec, each key read as Triton's gRPC front reads it."""
    return [Restriction(r.apis, GRPC_KEY_PREFIX + r.header, r.value) for r in parse(spec)]


def parse(spec: str) -> list[Restriction]:
    """ValueError naming what is wrong; an empty spec restricts nothing."""
    out: list[Restriction] = []
    seen: set[str] = set()
    for n, part in enumerate(filter(None, (p.strip() for p in spec.split(";"))), 1):
        apis_text, sep, pair = part.partition(":")
        header, eq, value = pair.partition("=")
        if not sep or not eq or not header.strip() or not value:
            # The text is not quoted back: it holds a secret value.
            raise ValueError(f"restriction {n}: expected API[,API...]:HEADER=VALUE")
        apis = frozenset(a.strip() for a in apis_text.split(","))
        unknown = apis - set(API_NAMES)
        if unknown:
            raise ValueError(f"unknown API {sorted(unknown)[0]!r}; known: {', '.join(API_NAMES)}")
        if apis & seen:
            raise ValueError(f"API {sorted(apis & seen)[0]!r} restricted twice")
        seen |= apis
        out.append(Restriction(apis, header.strip().lower().encode(), value.encode()))
    return out


def refusal(restrictions: list[Restriction], path: str, header_value: Callable[[bytes], bytes | None]) -> bytes | None:
    """Triton's 403 body when the call lacks its category's header, else None."""
    if not restrictions:
        return None
    api = category(path)
    for r in restrictions:
        if api in r.apis:
            given = header_value(r.header)
            if given is None or not hmac.compare_digest(given, r.value):
                return b"{\"error\":\"This API is restricted, expecting header '%s'\"}" % r.header
            return None
    return None


def grpc_refusal(restrictions: list[Restriction], method: str,
                 metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """Triton's UNAVAILABLE message when a gRPC call lacks its category's key, else None."""
    if not restrictions:
        return None
    api = grpc_category(method)
    for r in restrictions:
        if api in r.apis:
            key = r.header.decode("latin-1")
            given = next((v for k, v in metadata if k == key), None)  # the first one counts
            raw = given.encode() if isinstance(given, str) else given
            if raw is None or not hmac.compare_digest(raw, r.value):
                return f"This protocol is restricted, expecting header '{key}'"
            return None
    return None


def inference_key(restrictions: list[Restriction]) -> tuple[bytes, bytes] | None:
    """The (header, value) the inference API requires, for the calls the sidecar makes itself."""
    return next(((r.header, r.value) for r in restrictions if "inference" in r.apis), None)

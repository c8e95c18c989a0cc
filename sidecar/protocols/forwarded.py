"""The part of a call that travels outside its body but reaches the model or gates the call. Pure.

- **Forwarded headers.** Triton's ``--http-header-forward-pattern`` / ``--grpc-header-forward-pattern``
  turn every header (gRPC: metadata key) the pattern matches into a string parameter the model can
  read: an unanchored, case-insensitive RE2 match (``(?i)`` is prepended; ``(?-i)`` turns it off), the
  parameter named as the header was sent (HTTP keeps its case; gRPC keys are lower case), one
  parameter per header line. The sidecar mirrors the patterns (``upstream.http_header_forward_pattern``,
  ``upstream.grpc_header_forward_pattern``): the matching headers, names and values as they go
  upstream, are part of the call's identity, and go with any call the sidecar builds for it.
- **Restriction keys the sidecar was not told of.** A model server that restricts inference to callers
  holding a header answers the others 403 (HTTP) or UNAVAILABLE (gRPC) naming the header; the sidecar
  learns the header from that answer (``learned``), and from then on the header's value (or its
  absence) is part of the identity, so a caller without the key never receives a keyed caller's answer.

``Context`` is the tuple of (name, value) pairs, in the order the server reads them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

Context = tuple[tuple[bytes, bytes], ...]
_KEY = b"\0"  # marks a learned restriction key in a context (no header name holds a NUL)
_ABSENT = b"\0"  # the value of a restriction key the caller did not send (no header value holds a NUL)

# Triton's answers to a call lacking a restriction key, and the header they name.
HTTP_RESTRICTED = re.compile(rb"This API is restricted, expecting header '([^']+)'")
GRPC_RESTRICTED = re.compile(r"This protocol is restricted, expecting header '([^']+)'")


def compile_pattern(pattern: str) -> re.Pattern[str] | None:
    """Triton's reading of a forward pattern: None when off (empty), case-insensitive unless ``(?-i)``.
    ValueError when Python's regular expressions cannot read it."""
    if not pattern:
        return None
    flags: re.RegexFlag | int = re.IGNORECASE
    if pattern.startswith("(?-i)"):
        pattern, flags = pattern[5:], 0
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise ValueError(f"not a regular expression ({e})") from None


@dataclass(slots=True)
class Rules:
    """What the sidecar knows of the model server's header rules (patterns configured, keys learned)."""

    http_pattern: re.Pattern[str] | None = None
    grpc_pattern: re.Pattern[str] | None = None
    http_learned: bytes = b""  # a restriction header of the inference API, lower case ("" none)
    grpc_learned: bytes = b""

    @property
    def active(self) -> bool:
        return bool(self.http_pattern or self.grpc_pattern or self.http_learned or self.grpc_learned)

    def http_context(self, headers: Iterable[tuple[bytes, bytes]]) -> Context:
        """The forwarded headers (as sent) and the learned restriction key of an HTTP call, in order."""
        out: list[tuple[bytes, bytes]] = []
        key_seen = False
        for name, value in headers:
            if self.http_pattern is not None and self.http_pattern.search(name.decode("latin-1")):
                out.append((name, value))
            if self.http_learned and not key_seen and name.lower() == self.http_learned:
                out.append((_KEY + self.http_learned, value))  # the first one is what the server checks
                key_seen = True
        if self.http_learned and not key_seen:
            out.append((_KEY + self.http_learned, _ABSENT))
        return tuple(out)

    def grpc_context(self, metadata: Iterable[tuple[str, str | bytes]]) -> Context:
        """The same for gRPC metadata: the server walks it sorted by key (a multimap)."""
        out: list[tuple[bytes, bytes]] = []
        key_seen = False
        for key, value in sorted(metadata, key=lambda kv: kv[0]):
            raw = value if isinstance(value, bytes) else value.encode()
            if self.grpc_pattern is not None and self.grpc_pattern.search(key):
                out.append((key.encode(), raw))
            if self.grpc_learned and not key_seen and key.encode() == self.grpc_learned:
                out.append((_KEY + self.grpc_learned, raw))
                key_seen = True
        if self.grpc_learned and not key_seen:
            out.append((_KEY + self.grpc_learned, _ABSENT))
        return tuple(out)

    def learn_http(self, body: bytes) -> bool:
        """From a 403 body: whether it named a restriction header not known before."""
        match = HTTP_RESTRICTED.search(body)
        if match is None or match.group(1).lower() == self.http_learned:
            return False
        self.http_learned = match.group(1).lower()
        return True

    def learn_grpc(self, details: str) -> bool:
        match = GRPC_RESTRICTED.search(details)
        if match is None or match.group(1).encode() == self.grpc_learned:
            return False
        self.grpc_learned = match.group(1).encode()
        return True


def upstream_headers(context: Context) -> list[tuple[bytes, bytes]]:
    """The context's headers as they go with a call the sidecar builds: the forwarded ones, and a learned
    restriction key unless it is forwarded already (it would reach the model twice)."""
    out = [(name, value) for name, value in context if not name.startswith(_KEY)]
    sent = {name.lower() for name, _ in out}
    out.extend((name[1:], value) for name, value in context
               if name.startswith(_KEY) and name[1:] not in sent and value != _ABSENT)
    return out


def encode(context: Context) -> bytes:
    """A byte string for the identity digest: length-framed, so no two contexts encode alike."""
    return b"".join(b"%d:%s%d:%s" % (len(k), k, len(v), v) for k, v in context)


def restriction_keys(context: Context) -> Context:
    """Only the learned restriction keys of a context: what a call the sidecar makes on a caller's behalf
    needs to be let in, without the caller's forwarded headers (they would change the model's answer)."""
    return tuple((name, value) for name, value in context if name.startswith(_KEY))

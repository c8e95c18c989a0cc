"""Header rules shared by the HTTP front and the upstream client. Headers are raw bytes pairs."""

from __future__ import annotations

from collections.abc import Iterable

Header = tuple[bytes, bytes]

# RFC 9110 section 7.6.1 connection-specific headers, plus the framing headers each hop
# recomputes for itself. Host is not among them: it goes on as the client sent it (as HAProxy and
# Envoy keep it), so the model server's absolute URLs name the address clients use.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        # The sidecar's own server answers 100-continue at once; the upstream gets the whole body.
        b"expect",
    }
)

REQUEST_ID = b"x-request-id"
SIDECAR_PREFIX = b"x-sidecar-"


def end_to_end(headers: Iterable[Header]) -> list[Header]:
    """Drop hop-by-hop headers, including any the Connection header names."""
    kept: list[Header] = []
    named: set[bytes] = set()
    for k, v in headers:
        lower = k.lower()
        if lower == b"connection":
            named.update(token.strip().lower() for token in v.split(b","))
        elif lower not in HOP_BY_HOP:
            kept.append((k, v))
    if named:
        kept = [(k, v) for k, v in kept if k.lower() not in named]
    return kept

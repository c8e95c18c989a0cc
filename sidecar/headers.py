"""Header rules shared by the HTTP front and the upstream client."""

from __future__ import annotations

from collections.abc import Iterable

# RFC 9110 section 7.6.1 connection-specific headers, plus the framing headers
# each hop recomputes for itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        # The sidecar's own server already answered any 100-continue; the upstream gets the whole body.
        "expect",
    }
)

REQUEST_ID = "x-request-id"
SIDECAR_PREFIX = "x-sidecar-"


def end_to_end(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers, including any the Connection header names."""
    kept: list[tuple[str, str]] = []
    named: set[str] = set()
    for k, v in headers:
        lower = k.lower()
        if lower == "connection":
            named.update(token.strip().lower() for token in v.split(","))
        elif lower not in HOP_BY_HOP:
            kept.append((k, v))
    if named:
        kept = [(k, v) for k, v in kept if k.lower() not in named]
    return kept

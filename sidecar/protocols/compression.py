"""Content-Encoding of request and response bodies (gzip, deflate), for the codecs' eyes only.

Bodies always travel between client and model server exactly as sent, encoding and all; a codec
that needs a body's contents reads a decompressed copy, bounded so that a small compressed body
cannot expand into an unbounded allocation. Pure functions.
"""

from __future__ import annotations

import zlib

from ..errors import DecodeError, PayloadTooLarge

IDENTITY = frozenset({b"", b"identity"})


def decompress(encoding: bytes, body: bytes, limit: int) -> bytes:
    """The body with ``encoding`` undone; DecodeError for an unknown encoding or corrupt data,
    PayloadTooLarge past ``limit`` bytes of output. ``encoding`` is the Content-Encoding value (one coding)."""
    coding = encoding.strip().lower()
    if coding in IDENTITY:
        return body
    if coding in (b"gzip", b"x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif coding == b"deflate":
        # RFC 9110 means zlib-wrapped deflate; some clients send raw deflate. Accept both, as servers do.
        wbits = zlib.MAX_WBITS if _zlib_header(body) else -zlib.MAX_WBITS
    else:
        raise DecodeError(f"Content-Encoding {coding.decode('latin-1')!r} is not one the sidecar reads")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise DecodeError(f"body: corrupt {coding.decode()} data ({e})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        # The sidecar's own body limit, applied to what the body expands to: a small compressed body must not
        # become an unbounded allocation here or in the model server.
        raise PayloadTooLarge(f"request body decompresses to more than the limit of {limit} bytes")
    if not inflater.eof:
        raise DecodeError(f"body: truncated {coding.decode()} data")
    return out


def _zlib_header(body: bytes) -> bool:
    return len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0

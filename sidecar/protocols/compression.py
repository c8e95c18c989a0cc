"""Content-Encoding of request and response bodies (gzip, deflate), for the codecs' eyes only.

Bodies always travel between client and model server exactly as sent, encoding and all; a codec
that needs a body's contents reads a decompressed copy, bounded so that a small compressed body
cannot expand into an unbounded allocation. Pure functions.
"""

from __future__ import annotations

import zlib

from ..errors import DecodeError, PayloadTooLarge

IDENTITY = frozenset({b"", b"identity"})
# Triton's own reading (GetRequestCompressionType): these exact, case-sensitive values, and nothing else.
# It inflates both with zlib's automatic zlib-or-gzip header detection (15 | 32) and does not notice a
# truncated stream or bytes after its end; the sidecar models only streams that end exactly at the end
# of the body, so that both read the same bytes.
_CODINGS = frozenset({b"gzip", b"deflate"})
_AUTO_HEADER = 32 | zlib.MAX_WBITS


def decompress(encoding: bytes, body: bytes, limit: int) -> bytes:
    """The body with ``encoding`` undone; DecodeError for an encoding or stream the model server reads
    otherwise (or not at all), PayloadTooLarge past ``limit`` bytes of output. ``encoding`` is the one
    Content-Encoding value, as it goes upstream."""
    if encoding in IDENTITY:
        return body
    if encoding not in _CODINGS:
        raise DecodeError(f"Content-Encoding {encoding.decode('latin-1')!r} is not one the model server reads")
    inflater = zlib.decompressobj(_AUTO_HEADER)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise DecodeError(f"body: corrupt {encoding.decode()} data ({e})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        # The sidecar's own body limit, applied to what the body expands to: a small compressed body must not
        # become an unbounded allocation here or in the model server.
        raise PayloadTooLarge(f"request body decompresses to more than the limit of {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise DecodeError(f"body: {encoding.decode()} data that does not end where the body ends")
    return out

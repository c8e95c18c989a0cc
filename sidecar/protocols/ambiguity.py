"""Inputs the model server reads differently from the sidecar's codecs. Pure functions.

The sidecar caches, batches and records a call only when it reads the call exactly as the model
server does; anything else goes upstream untouched (:class:`DecodeError`: "not modelled"). Each
check here is one place where a correct JSON reader (orjson) and the server's own (RapidJSON, as
Triton and TF Serving link it) part ways, found by reading their sources and confirmed against the
real server:

- **Duplicated keys.** RapidJSON keeps every member and its lookup finds the first; orjson keeps the
  last. Counted in the codec's one pass: every ``:`` outside strings starts a member, so when the
  text holds no more colons than the parser kept keys, no key was given twice; only when strings hold
  colons are the string tokens scanned.
- **Numbers.** Without ``kParseFullPrecisionFlag`` RapidJSON's decimal-to-double conversion can be a
  few units in the last place off (it truncates past 17 digits, accumulates long integer parts in
  doubles, multiplies by inexact powers of ten). A double reaching FP32 changes only when it lies
  next to the midpoint between two floats (or in the subnormal range); there the call is not
  modelled. FP64 values with a fraction or exponent are never modelled (the codec refuses them).
  RapidJSON also refuses a zero written with an exponent past 308 (``0e999``) that orjson reads as 0.
- **NUL in names and ids.** Triton hands names, ids and parameter keys to its C API as C strings, so
  ``"INPUT0\\u0000x"`` is ``INPUT0`` to it.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import DecodeError

# A JSON string token, then whether a colon follows it (a member's key). Exact on text that parsed.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"(\s*:)?', re.DOTALL)
# A zero with an exponent of 300 or more (RapidJSON refuses one past 308 plus its fraction digits).
_BIG_EXPONENT = re.compile(rb"(?<![0-9])-?0(?:\.0+)?[eE]\+?0*(?:[3-9][0-9]{2}|[1-9][0-9]{3,})")

# Units in the last place (of a double) within which a double counts as next to an FP32 rounding
# boundary. RapidJSON's error is a few tens of units at most for numbers in the FP32 range; this leaves
# a wide margin and still models all but about 1 in 65,000 inexact values.
_WINDOW = 1 << 12
_LOW_BITS = (1 << 29) - 1  # the 29 bits a double has beyond an FP32 significand
_MIDPOINT = 1 << 28
_SMALLEST_NORMAL_EXPONENT = 1023 - 126  # biased double exponent of 2^-126, FP32's smallest normal


def check_text(value: str, field: str) -> None:
    """A name, id, key or value the server reads as a C string: a NUL cuts it short there."""
    if "\0" in value:
        raise DecodeError(f"{field}: a NUL character, which the model server reads as the end of the text")


def check_unique_keys(text: bytes, end: int, keys: int) -> None:
    """DecodeError when ``text[:end]`` (JSON that parsed) holds more members than the ``keys`` the parser
    kept, i.e. some object repeats a key."""
    colons = text.count(b":", 0, end)
    if colons == keys:
        return
    members = sum(1 for m in _STRING.finditer(text, 0, end) if m.group(1) is not None)
    if members != keys:
        raise DecodeError("body: a key given more than once, which the model server reads as its first value "
                          "and the sidecar as its last")


def check_exponents(text: bytes, end: int, field: str) -> None:
    """Called when an FP32 tensor holds a float zero: it may be spelt ``0e999``, which the server refuses."""
    numbers = _STRING.sub(b'""', text[:end])  # what strings say is no number's exponent
    if _BIG_EXPONENT.search(numbers) is not None:
        raise DecodeError(f"{field}: a number with an exponent the model server's parser refuses")


def check_float_params(text: bytes, end: int, keys: set[str]) -> None:
    """Parameters holding a number with a fraction or exponent (``keys``): modelled only when each is spelt so
    that RapidJSON's fast path reads it exactly - at most 15 significant digits, a power of ten within
    10^+-22 - for then its one rounding is the correctly rounded one. DecodeError otherwise."""
    found: dict[bytes, list[bytes]] = {}
    for match in _NUMBER_MEMBER.finditer(text, 0, end):
        found.setdefault(match.group(1), []).append(match.group(2))
    for key in keys:
        spellings = found.get(key.encode())
        if not spellings or not all(_fast_path(s) for s in spellings):
            raise DecodeError(f"parameters.{key}: a number spelt so that the model server's parser may round it "
                              "differently; not modelled")


def _fast_path(number: bytes) -> bool:
    match = _NUMBER.fullmatch(number)
    if match is None:
        return False
    digits = (match.group(1) + (match.group(2) or b"")).lstrip(b"0")
    power = int(match.group(3) or 0) - len(match.group(2) or b"")
    return len(digits) <= 15 and -22 <= power <= 22


# A member whose value is a number: its key as spelt (no escapes, else no match and so not modelled) and the
# number's text. Exact on text that parsed: a string token is consumed whole before its colon.
_NUMBER_MEMBER = re.compile(rb'"([^"\\]*)"\s*:\s*(-?[0-9][0-9.eE+-]*)')
_NUMBER = re.compile(rb"-?([0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?")


def check_fp32_small(values: list[Any], packed: bytes, field: str) -> None:
    """``values`` (JSON numbers) as packed into FP32 ``packed``: DecodeError when one lies so near an FP32
    rounding boundary that the server's inexact parse could round it to the other float."""
    narrowed = struct.unpack(f"<{len(values)}f", packed)
    if narrowed == tuple(values):
        return  # each value is a float already (what clients send for FP32): no rounding to disagree on
    for value, got in zip(values, narrowed, strict=True):
        if value != got and _near_boundary(struct.unpack("<Q", struct.pack("<d", value))[0]):
            raise DecodeError(_NEAR_BOUNDARY.format(field=field))


def check_fp32(wide: npt.NDArray[np.float64], narrow: npt.NDArray[np.float32], field: str) -> None:
    """The vectorised :func:`check_fp32_small` for large tensors."""
    inexact = wide != narrow.astype(np.float64)
    if not inexact.any():
        return
    bits = wide[inexact].view(np.uint64)
    exponent = (bits >> np.uint64(52)) & np.uint64(0x7FF)
    low = (bits & np.uint64(_LOW_BITS)).astype(np.int64)
    near = (np.abs(low - _MIDPOINT) <= _WINDOW) | (exponent < _SMALLEST_NORMAL_EXPONENT)
    if near.any():
        raise DecodeError(_NEAR_BOUNDARY.format(field=field))


def has_float_zero(values: list[Any] | npt.NDArray[np.float64]) -> bool:
    if isinstance(values, np.ndarray):
        return bool((values == 0).any())
    return any(type(v) is float and v == 0 for v in values)


_NEAR_BOUNDARY = ("{field}: a number so near an FP32 rounding boundary that the model server's parser may round it "
                  "the other way; not modelled")


def _near_boundary(bits: int) -> bool:
    if (bits >> 52) & 0x7FF < _SMALLEST_NORMAL_EXPONENT:
        return True  # subnormal in FP32: its rounding boundaries are not where the formula looks
    return abs((bits & _LOW_BITS) - _MIDPOINT) <= _WINDOW

"""Doubles written as Triton writes them in JSON: RapidJSON's ``Writer::Double`` digits, vectorised.

Why this exists: the sidecar promises that an answer it re-encodes (a cache hit, one caller's share
of a batch) is byte for byte what Triton would have sent. Triton writes every FP32/FP64 JSON value
with RapidJSON's ``Writer::Double`` (FP32 widened to double first), and that is not the shortest
round-trip text orjson or ``repr`` give. RapidJSON (``include/rapidjson/internal/dtoa.h``) runs
Grisu2, whose digits read back exactly but are neither always the shortest nor the closest, and
its ``Prettify`` lays them out its own way: FP32 1234.5678 reads ``1234.5677490234376`` from
Triton and ``1234.5677490234375`` from orjson; 1e17 reads ``99999998430674950.0`` against
``9.999999843067494e+16``; 3.4e38 ``3.3999999521443644e38`` against ``3.3999999521443642e+38``.
The same doubles; only the bytes differ, and the bytes are the promise.

The steps are those of ``dtoa.h``, ``diyfp.h`` and ``ieee754.h``, as Triton links them (checked
value by value against the real server): the value and its boundaries are scaled by a cached power
of ten (``GetCachedPower``, 64-bit products rounded on the low half), digits are taken from the
upper boundary until what is left falls within the boundaries' distance (``DigitGen``), the last
digit is walked down towards the value (``GrisuRound``; after the ninth fractional digit its scale
``kPow10[index]`` is 0, so there is no walking down) and ``Prettify`` writes ``1234.0``,
``12.34``, ``0.001234``, ``1e30``, ``1.234e-7``: fixed notation up to 21 integer digits and down
to 1e-6, exponents with no ``+`` and no zero padding, ``-0.0`` for negative zero.

It runs on the hot path (embeddings of thousands of floats per answer), so each step works on whole
numpy arrays: 64x64-bit products from 32-bit halves, the integer part's stopping digit found at
all nine candidate places at once, one loop step per fractional digit for all values together
(some 12 to 15 for FP32 values), and the text laid out by one gather through a template per
layout. A few values (up to ``_SCALAR_MAX``) go through the same steps on Python integers
instead, where numpy's per-call cost would dominate. Only finite values have a JSON form (Triton
cannot write NaN or Infinity either).
"""

from __future__ import annotations

import functools
import math
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["double_texts", "json_array"]

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

# diyfp.h kCachedPowers_F / kCachedPowers_E: 10^-348, 10^-340, ..., 10^340 as 64-bit significands.
_POWERS_F: Final = np.array([
    0xFA8FD5A0081C0288, 0xBAAEE17FA23EBF76, 0x8B16FB203055AC76, 0xCF42894A5DCE35EA, 0x9A6BB0AA55653B2D,
    0xE61ACF033D1A45DF, 0xAB70FE17C79AC6CA, 0xFF77B1FCBEBCDC4F, 0xBE5691EF416BD60C, 0x8DD01FAD907FFC3C,
    0xD3515C2831559A83, 0x9D71AC8FADA6C9B5, 0xEA9C227723EE8BCB, 0xAECC49914078536D, 0x823C12795DB6CE57,
    0xC21094364DFB5637, 0x9096EA6F3848984F, 0xD77485CB25823AC7, 0xA086CFCD97BF97F4, 0xEF340A98172AACE5,
    0xB23867FB2A35B28E, 0x84C8D4DFD2C63F3B, 0xC5DD44271AD3CDBA, 0x936B9FCEBB25C996, 0xDBAC6C247D62A584,
    0xA3AB66580D5FDAF6, 0xF3E2F893DEC3F126, 0xB5B5ADA8AAFF80B8, 0x87625F056C7C4A8B, 0xC9BCFF6034C13053,
    0x964E858C91BA2655, 0xDFF9772470297EBD, 0xA6DFBD9FB8E5B88F, 0xF8A95FCF88747D94, 0xB94470938FA89BCF,
    0x8A08F0F8BF0F156B, 0xCDB02555653131B6, 0x993FE2C6D07B7FAC, 0xE45C10C42A2B3B06, 0xAA242499697392D3,
    0xFD87B5F28300CA0E, 0xBCE5086492111AEB, 0x8CBCCC096F5088CC, 0xD1B71758E219652C, 0x9C40000000000000,
    0xE8D4A51000000000, 0xAD78EBC5AC620000, 0x813F3978F8940984, 0xC097CE7BC90715B3, 0x8F7E32CE7BEA5C70,
    0xD5D238A4ABE98068, 0x9F4F2726179A2245, 0xED63A231D4C4FB27, 0xB0DE65388CC8ADA8, 0x83C7088E1AAB65DB,
    0xC45D1DF942711D9A, 0x924D692CA61BE758, 0xDA01EE641A708DEA, 0xA26DA3999AEF774A, 0xF209787BB47D6B85,
    0xB454E4A179DD1877, 0x865B86925B9BC5C2, 0xC83553C5C8965D3D, 0x952AB45CFA97A0B3, 0xDE469FBD99A05FE3,
    0xA59BC234DB398C25, 0xF6C69A72A3989F5C, 0xB7DCBF5354E9BECE, 0x88FCF317F22241E2, 0xCC20CE9BD35C78A5,
    0x98165AF37B2153DF, 0xE2A0B5DC971F303A, 0xA8D9D1535CE3B396, 0xFB9B7CD9A4A7443C, 0xBB764C4CA7A44410,
    0x8BAB8EEFB6409C1A, 0xD01FEF10A657842C, 0x9B10A4E5E9913129, 0xE7109BFBA19C0C9D, 0xAC2820D9623BF429,
    0x80444B5E7AA7CF85, 0xBF21E44003ACDD2D, 0x8E679C2F5E44FF8F, 0xD433179D9C8CB841, 0x9E19DB92B4E31BA9,
    0xEB96BF6EBADF77D9, 0xAF87023B9BF0EE6B,
], dtype=np.uint64)
_POWERS_E: Final = (
    -1220, -1193, -1166, -1140, -1113, -1087, -1060, -1034, -1007, -980, -954, -927, -901, -874, -847,
    -821, -794, -768, -741, -715, -688, -661, -635, -608, -582, -555, -529, -502, -475, -449, -422, -396,
    -369, -343, -316, -289, -263, -236, -210, -183, -157, -130, -103, -77, -50, -24, 3, 30, 56, 83, 109,
    136, 162, 189, 216, 242, 269, 295, 322, 348, 375, 402, 428, 455, 481, 508, 534, 561, 588, 614, 641,
    667, 694, 720, 747, 774, 800, 827, 853, 880, 907, 933, 960, 986, 1013, 1039, 1066,
)

_HIDDEN: Final = np.uint64(1 << 52)
_FRACTION: Final = np.uint64((1 << 52) - 1)
_EXPONENT_BIAS: Final = 1075  # ieee754.h: 0x3FF + 52
_M32: Final = np.uint64(0xFFFFFFFF)
_HALF: Final = np.uint64(1 << 31)
_U1: Final = np.uint64(1)
_POW10: Final = np.array([10**i for i in range(20)], dtype=np.uint64)
_POW10_U32: Final = _POW10[:9, None].astype(np.uint32)
# dtoa.h scales the rounding distance by kPow10[index] only while index < 9, by 0 beyond (so no
# rounding at all): Triton's digits depend on it (with 10^index, 1234.5678f would end in 5, not 6).
_MAX_FRACTION_STEPS: Final = 40  # Grisu2 takes 20 at most: a guard against looping, not a limit
_ROUND_SCALE: Final = np.array([10**i if i < 9 else 0 for i in range(_MAX_FRACTION_STEPS + 1)], dtype=np.uint64)
_TEN_OR_ONE: Final = np.array([1, 10], dtype=np.uint64)
# Normalised exponents of finite doubles: -1137 (5e-324) to 960 (the largest binade).
_LOWEST_EXP: Final = -1137
_HIGHEST_EXP: Final = 960
# Whole arrays at once, but in slices of this many values: every temporary then stays small enough
# for the allocator to reuse instead of mapping fresh (page-faulting) memory for each.
_CHUNK: Final = 2048


def _cached_power_tables() -> tuple[U64, U64, I64]:
    """Per normalised binary exponent: (cached power, digit shift -one.e, decimal exponent K).

    Computed once, as ``GetCachedPower`` does (its double-precision ceiling included), for every
    exponent a finite double's boundaries can have; the hot path then only indexes.
    """
    fs, shifts, ks = [], [], []
    for e in range(_LOWEST_EXP, _HIGHEST_EXP + 1):
        dk = (-61 - e) * 0.30102999566398114 + 347
        k = int(dk)
        if dk - k > 0.0:
            k += 1
        index = (k >> 3) + 1
        fs.append(int(_POWERS_F[index]))
        shifts.append(-(e + _POWERS_E[index] + 64))
        ks.append(348 - (index << 3))
    return np.array(fs, np.uint64), np.array(shifts, np.uint64), np.array(ks, np.int64)


_CACHED_F, _CACHED_SHIFT, _CACHED_K = _cached_power_tables()


def _mul_wide(a: U64, b: U64) -> tuple[U64, U64]:
    """The 128-bit products a*b as (high, low) 64-bit halves, from 32-bit pieces."""
    a_hi, a_lo, b_hi, b_lo = a >> 32, a & _M32, b >> 32, b & _M32
    hi_lo, lo_hi = a_hi * b_lo, a_lo * b_hi
    mid = ((a_lo * b_lo) >> 32) + (hi_lo & _M32) + (lo_hi & _M32)
    return a_hi * b_hi + (hi_lo >> 32) + (lo_hi >> 32) + (mid >> 32), a * b


def _mul_high(a: U64, b: U64) -> U64:
    """``DiyFp::operator*``: the high 64 bits of a*b, rounded up when bit 63 of the low half is set."""
    high, low = _mul_wide(a, b)
    return high + (low >> 63)


class _Scaled:
    """Grisu2's scaled upper boundary ``Wp``, the interval's width and Wp - W, per element."""

    def __init__(self, bits: U64) -> None:
        biased = bits >> 52
        normal = biased != 0
        f = np.where(normal, (bits & _FRACTION) | _HIDDEN, bits & _FRACTION)
        e = np.where(normal, biased.astype(np.int64) - _EXPONENT_BIAS, 1 - _EXPONENT_BIAS)
        # Leading zeros of f (11 for normal numbers); f < 2^53 converts to float exactly.
        lead = (64 - np.frexp(f.astype(np.float64))[1]).astype(np.uint64)
        upper = ((f << _U1) + _U1) << (lead - _U1)  # NormalizedBoundaries: 2f+1, normalised
        # 2f-1 at the same scale; (4f-1)/2 when f is a power of two (the binade below is denser),
        # which is 2^(lead-2) more once shifted. Subnormals never have f == 2^52.
        lower = (((f << _U1) - _U1) << (lead - _U1)) + ((f == _HIDDEN) << (lead - np.uint64(2)))
        row = e - lead.astype(np.int64) - _LOWEST_EXP  # W, Wp and Wm share this exponent
        w, wp, wm = _mul_high(np.stack([f << lead, upper, lower]), _CACHED_F[row])
        self.wp = wp - _U1  # Grisu2 narrows the interval by one unit on each side
        self.delta = self.wp - (wm + _U1)
        self.wp_w = self.wp - w
        self.shift = _CACHED_SHIFT[row]
        self.k = _CACHED_K[row]


def _integer_stop(p1: U32, p2: U64, delta: U64, shift: U64) -> tuple[Mask, I64, U32, U32]:
    """Where ``DigitGen`` stops within the integer part: (stops there, kappa, p1 // 10^kappa, p1 % 10^kappa).

    All nine places are tried at once: after the digit for 10^k what is left is
    ``(p1 % 10^k) << shift + p2``, which grows with k, so the loop's first stop (the largest k
    below p1's digit count whose rest is within delta) is the count of such k, less one. Those
    that do not stop there (p2 > delta) go on to fractional digits with kappa 0.
    """
    heads = p1 // _POW10_U32  # p1 // 10^k for k = 0..8: floor division is fast, % is not
    tails = p1 - heads * _POW10_U32
    # tail << shift + p2 <= delta  <=>  tail <= (delta - p2) >> shift, once p2 <= delta
    in_integer = p2 <= delta
    room = np.minimum((delta - p2) >> shift, np.uint64(0xFFFFFFFF)).astype(np.uint32)
    count = ((tails <= room) & (heads != 0)).sum(axis=0) * in_integer  # heads[k] != 0: p1 >= 10^k
    kappa = np.maximum(count - 1, 0)
    column = np.arange(len(kappa))
    return in_integer, kappa, heads[kappa, column], tails[kappa, column]


class _Digits:
    """Grisu2's digits (as one integer) and decimal exponent, with ``GrisuRound``'s inputs."""

    def __init__(self, s: _Scaled) -> None:
        """``DigitGen``: digits of Wp until what is left of it falls within delta."""
        mask = (_U1 << s.shift) - _U1
        p1, p2 = (s.wp >> s.shift).astype(np.uint32), s.wp & mask  # p1 < 8e8 for every cached power
        in_integer, kappa, head, tail = _integer_stop(p1, p2, s.delta, s.shift)
        self.value = head.astype(np.uint64)  # all of p1 for those going on (kappa 0)
        self.ten_kappa = _POW10[kappa] << s.shift
        self.delta = s.delta.copy()
        self.rest = p2  # below 2^shift: stays put where multiplied by 1 instead of 10
        steps = self._fraction(~in_integer, mask)
        # The fractional digits taken, all at once: floor(p2 * 10^steps / 2^shift).
        high, low = _mul_wide(p2, _POW10[steps])
        self.value = self.value * _POW10[steps] + ((high << (64 - s.shift)) | (low >> s.shift))
        self.rest = np.where(in_integer, (tail.astype(np.uint64) << s.shift) + p2, self.rest)
        self.kappa = kappa - steps
        self.wp_w = s.wp_w * _ROUND_SCALE[steps]

    def _fraction(self, going: Mask, mask: U64) -> I64:
        """How many fractional digits each takes: steps for all at once, the finished ones times 1.

        Only what is left (p2 * 10^step mod 2^shift) and delta are followed here; the digits are
        read off afterwards in one product.
        """
        start = self.delta.copy()
        for _ in range(_MAX_FRACTION_STEPS):
            if not going.any():
                steps: I64 = np.searchsorted(_POW10, self.delta // start, side="right") - 1
                return steps
            times = _TEN_OR_ONE[going.view(np.uint8)]
            self.rest = (self.rest * times) & mask
            self.delta *= times
            going &= self.rest >= self.delta
        raise AssertionError("Grisu2 digit generation did not converge")

    def round(self) -> None:
        """``GrisuRound``: step the last digit down while that brings the text closer to the value."""
        rest, delta, ten, wp_w = self.rest, self.delta, self.ten_kappa, self.wp_w
        while True:
            # Unsigned wrap-around as in C: the right side of | only matters where the left is false.
            closer = (rest + ten < wp_w) | (wp_w - rest > rest + ten - wp_w)
            down = (rest < wp_w) & (delta - rest >= ten) & closer
            if not down.any():
                return
            self.value -= down
            rest = rest + ten * down


# -- Prettify --------------------------------------------------------------------------------------
# Each text is laid out by gathering bytes from a per-row source: the digits right-aligned in 20
# places, the sign (or a 0 byte), then constants. A template per (digit count, decimal point
# position) says which source byte goes where; unused places point at a 0 byte, dropped at the end.
_DIGIT_PLACES: Final = 20
_SIGN: Final = 20
_DOT, _E, _MINUS, _COMMA, _ZERO = 21, 22, 23, 24, 25
_NOTHING: Final = _ZERO + 10
_ROW: Final = _NOTHING + 1  # 36 bytes: nine 32-bit words
_CONSTANT_WORDS: Final = np.frombuffer(b".e-,0123456789\x00", np.uint8)
_WIDEST: Final = 30  # sign, "0." and 5 zeros, 20 digits, comma: no row needs more
_KK_OFFSET: Final = 330  # decimal point positions run from -323 (5e-324) to 309 (1.8e308)
_KK_SPAN: Final = 2 * _KK_OFFSET
# Four ASCII digits for each of 0..9999, as the 32-bit word that holds them in memory order.
_QUADS: Final = np.frombuffer(b"".join(b"%04d" % i for i in range(10_000)), np.uint32)
_QUAD_BASE: Final = np.uint64(10_000)


def _layout(length: int, kk: int) -> list[int]:
    """``Prettify`` for ``length`` digits with the decimal point after ``kk`` of them (source indices)."""
    digits = list(range(_DIGIT_PLACES - length, _DIGIT_PLACES))
    if length <= kk <= 21:  # 1234e7 -> 12340000000.0 (dtoa.h: 0 <= k, k = kk - length)
        body = digits + [_ZERO] * (kk - length) + [_DOT, _ZERO]
    elif 0 < kk <= 21:  # 1234e-2 -> 12.34
        body = [*digits[:kk], _DOT, *digits[kk:]]
    elif -6 < kk <= 0:  # 1234e-6 -> 0.001234
        body = [_ZERO, _DOT] + [_ZERO] * -kk + digits
    elif kk < -324:  # maxDecimalPlaces (324) truncates to zero; no double gets here
        body = [_ZERO, _DOT, _ZERO]
    else:  # 1e30, 1.234e-7: WriteExponent has no '+' and no zero padding
        mantissa = digits[:1] + ([_DOT, *digits[1:]] if length > 1 else [])
        sign = [_MINUS] if kk - 1 < 0 else []
        body = [*mantissa, _E, *sign, *(_ZERO + int(c) for c in str(abs(kk - 1)))]
    return [_SIGN, *body, _COMMA]


class _Layouts:
    """Templates by (digit count, kk), each built the first time it is needed (a few dozen in practice)."""

    def __init__(self) -> None:
        # Source indices fit a byte: the table stays ~400 kB for the ~14,000 possible layouts.
        self.table = np.full(((_DIGIT_PLACES + 1) * _KK_SPAN, _WIDEST), _NOTHING, np.uint8)
        self.widths = np.zeros(len(self.table), np.uint8)  # 0: not built yet

    def rows(self, length: I64, kk: I64) -> npt.NDArray[np.uint8]:
        """Each value's template, cut to the widest among them."""
        code = length * _KK_SPAN + (kk + _KK_OFFSET)
        widths = self.widths[code]
        if not widths.all():
            for c in np.unique(code[widths == 0]).tolist():
                row = _layout(c // _KK_SPAN, c % _KK_SPAN - _KK_OFFSET)
                self.table[c, : len(row)] = row
                self.widths[c] = len(row)
            widths = self.widths[code]
        rows: npt.NDArray[np.uint8] = self.table[code, : widths.max()]
        return rows


_LAYOUTS: Final = _Layouts()


def _source(value: U64, negative: Mask) -> npt.NDArray[np.uint8]:
    """Per value, 36 bytes: its digits right-aligned in 20, its sign (or 0), then the constants."""
    words = np.empty((len(value), _ROW // 4), np.uint32)
    quads = np.empty((_DIGIT_PLACES // 4, len(value)), np.uint64)
    for place in range(len(quads) - 1, -1, -1):
        high = value // _QUAD_BASE  # floor division is fast, % is not
        quads[place] = value - high * _QUAD_BASE
        value = high
    words[:, : len(quads)] = _QUADS[quads.T]
    source = words.view(np.uint8)
    source[:, _SIGN] = negative * np.uint8(ord("-"))
    source[:, _SIGN + 1 :] = _CONSTANT_WORDS
    return source


def _chunk_text(doubles: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """The texts of these (finite) values, each followed by a comma."""
    bits = doubles.view(np.uint64)
    magnitude = bits & np.uint64((1 << 63) - 1)
    zero = magnitude == 0
    # Zeros take 1.0's path (Grisu2 has no zero), then become the digit 0 written "0.0".
    scaled = _Scaled(np.where(zero, np.float64(1.0).view(np.uint64), magnitude))
    digits = _Digits(scaled)
    digits.round()
    value = np.where(zero, np.uint64(0), digits.value)
    length = np.searchsorted(_POW10, value, side="right") | zero
    kk = np.where(zero, 1, length + scaled.k + digits.kappa)
    source = _source(value, bits >> np.uint64(63) != 0)
    picks = _LAYOUTS.rows(length, kk) + np.arange(0, source.size, _ROW)[:, None]
    text = np.take(source.reshape(-1), picks).reshape(-1)
    kept: npt.NDArray[np.uint8] = text[text != 0]
    return kept


# -- one value at a time ---------------------------------------------------------------------------
# For a few values numpy's per-call cost (some 150 calls, ~190 us a chunk) outweighs the work: the
# same steps on Python integers take ~5 us a value. Both paths share the tables and the layouts.
_SCALAR_MAX: Final = 32
_MEMO_MAX: Final = 4096  # texts of recent values met one at a time (a cached answer read again)
_MEMO: dict[int, str] = {}
_LIST_F: Final[list[int]] = _CACHED_F.tolist()
_LIST_SHIFT: Final[list[int]] = _CACHED_SHIFT.tolist()
_LIST_K: Final[list[int]] = _CACHED_K.tolist()
_LIST_ROUND_SCALE: Final[list[int]] = _ROUND_SCALE.tolist()
_SOURCE_TAIL: Final = _CONSTANT_WORDS.tobytes().decode("ascii")


def _mul_high_int(a: int, b: int) -> int:
    product = a * b
    return (product >> 64) + ((product >> 63) & 1)


def _grisu2_int(bits: int) -> tuple[int, int]:
    """(digits as an integer, decimal exponent) of a positive finite double: dtoa.h's Grisu2."""
    biased, fraction = bits >> 52, bits & ((1 << 52) - 1)
    f, e = (fraction | (1 << 52), biased - _EXPONENT_BIAS) if biased else (fraction, 1 - _EXPONENT_BIAS)
    lead = 64 - f.bit_length()
    lower = (((f << 1) - 1) << (lead - 1)) + ((f == 1 << 52) << (lead - 2))  # as in _Scaled
    row = e - lead - _LOWEST_EXP
    c, shift, k = _LIST_F[row], _LIST_SHIFT[row], _LIST_K[row]
    wp = _mul_high_int(((f << 1) + 1) << (lead - 1), c) - 1
    delta = wp - _mul_high_int(lower, c) - 1
    wp_w = wp - _mul_high_int(f << lead, c)
    p1, p2 = wp >> shift, wp & ((1 << shift) - 1)
    if p2 <= delta:  # stops within the integer part: at the largest place whose tail fits
        room, kappa = (delta - p2) >> shift, 0
        while 10 ** (kappa + 1) <= p1 and p1 % 10 ** (kappa + 1) <= room:
            kappa += 1
        value, tail = divmod(p1, 10**kappa)
        return _grisu_round_int(value, delta, (tail << shift) + p2, 10**kappa << shift, wp_w), k + kappa
    value, steps = _fraction_int(p1, p2, delta, shift)
    delta *= 10**steps
    rest = (p2 * 10**steps) & ((1 << shift) - 1)
    return _grisu_round_int(value, delta, rest, 1 << shift, wp_w * _LIST_ROUND_SCALE[steps]), k - steps


def _fraction_int(value: int, p2: int, delta: int, shift: int) -> tuple[int, int]:
    """Fractional digits until what is left is within delta: (all digits, how many were added)."""
    steps = 0
    while True:
        p2, delta, steps = p2 * 10, delta * 10, steps + 1
        value = value * 10 + (p2 >> shift)
        p2 &= (1 << shift) - 1
        if p2 < delta:
            return value, steps


def _grisu_round_int(value: int, delta: int, rest: int, ten: int, wp_w: int) -> int:
    while rest < wp_w and delta - rest >= ten and (rest + ten < wp_w or wp_w - rest > rest + ten - wp_w):
        value -= 1
        rest += ten
    return value


@functools.lru_cache(maxsize=1024)
def _layout_cached(length: int, kk: int) -> tuple[int, ...]:
    return tuple(_layout(length, kk)[1:-1])  # no sign, no comma


def _scalar_text(bits: int) -> str:
    text = _MEMO.get(bits)
    if text is None:
        sign = "-" if bits >> 63 else ""
        magnitude = bits & ((1 << 63) - 1)
        value, k = _grisu2_int(magnitude) if magnitude else (0, 0)
        length = len(str(value))
        source = f"{value:020d}-{_SOURCE_TAIL}"  # the sign's place is kept, not used
        text = sign + "".join([source[i] for i in _layout_cached(length, length + k)])
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[bits] = text
    return text


# -- entry points ----------------------------------------------------------------------------------


def json_array(values: npt.ArrayLike, *, non_finite: bool = False) -> bytes:
    """The JSON array Triton writes for these values (FP32 widened to double), e.g. ``b"[1.0,-2.5]"``.

    Values are taken flat, in row-major order, as Triton writes a tensor's ``data``. NaN and infinity
    have no JSON form: :class:`ValueError`, unless ``non_finite``, which writes them as Triton's
    answers do (RapidJSON's ``kWriteNanAndInfFlag``): ``NaN``, ``Infinity``, ``-Infinity``.
    """
    with np.errstate(invalid="ignore"):  # a signalling NaN widened warns; it is written as NaN all the same
        doubles = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(doubles)
    if not finite.all():
        if not non_finite:
            raise ValueError("NaN and infinity have no JSON form")
        texts = iter(double_texts(doubles[finite]))
        words = [next(texts) if ok else _NON_FINITE[math.copysign(1.0, v) > 0 if math.isinf(v) else None]
                 for ok, v in zip(finite.tolist(), doubles.tolist(), strict=True)]
        return f"[{','.join(words)}]".encode()
    if len(doubles) <= _SCALAR_MAX:
        texts_ = [_scalar_text(b) for b in doubles.view(np.uint64).tolist()]
        return f"[{','.join(texts_)}]".encode()
    chunks = [_chunk_text(doubles[i : i + _CHUNK]) for i in range(0, len(doubles), _CHUNK)]
    chunks[-1] = chunks[-1][:-1]  # no comma after the last value
    return b"".join([b"[", *(c.tobytes() for c in chunks), b"]"])


_NON_FINITE: Final = {None: "NaN", True: "Infinity", False: "-Infinity"}


def double_texts(values: npt.ArrayLike) -> list[str]:
    """Each value's text on its own (the elements of :func:`json_array`)."""
    inner = json_array(values)[1:-1]
    return inner.decode().split(",") if inner else []

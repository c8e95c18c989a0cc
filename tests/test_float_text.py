"""float_text: doubles written byte for byte as Triton writes them (RapidJSON's ``Writer::Double``).

Three oracles: the real Triton server (FP32 and FP64 identity models in a repository made here:
``tests/models`` has no FP64 model), a literal scalar port of RapidJSON's ``dtoa.h`` written below
independently of the module (for property tests without a server), and the texts Triton wrote for
a fixed table of values.
"""

from __future__ import annotations

import math
import shutil
import struct
import warnings
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.protocols import float_text, kserve_http
from sidecar.protocols.float_text import double_texts, json_array
from tests.servers import MODELS_DIR, TritonServer
from tests.wire import exchange

# -- a literal port of RapidJSON's dtoa.h (diyfp.h, ieee754.h), one value at a time ------------------


def _cached_power(index: int) -> tuple[int, int]:
    """kCachedPowers_F/E[index]: 10^(-348 + 8 index) as a 64-bit significand, rounded to nearest."""
    x = Fraction(10) ** (-348 + 8 * index)
    e = x.numerator.bit_length() - x.denominator.bit_length() - 64
    while x / Fraction(2) ** e >= 2**64:
        e += 1
    while x / Fraction(2) ** e < 2**63:
        e -= 1
    return math.floor(x / Fraction(2) ** e + Fraction(1, 2)), e


CACHED = [_cached_power(i) for i in range(87)]
HIDDEN = 1 << 52
M64 = (1 << 64) - 1


def _mul(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    product = a[0] * b[0]
    return (product >> 64) + ((product >> 63) & 1), a[1] + b[1] + 64


def _grisu2(value: float) -> tuple[str, int]:
    u = struct.unpack("<Q", struct.pack("<d", value))[0]
    biased, significand = (u >> 52) & 0x7FF, u & (HIDDEN - 1)
    f, e = (significand + HIDDEN, biased - 1075) if biased else (significand, -1074)
    pf, pe = (f << 1) + 1, e - 1  # NormalizedBoundaries
    while not pf & (HIDDEN << 1):
        pf, pe = pf << 1, pe - 1
    pf, pe = pf << 10, pe - 10
    mf, me = ((f << 2) - 1, e - 2) if f == HIDDEN else ((f << 1) - 1, e - 1)
    mf, me = mf << (me - pe), pe
    dk = (-61 - pe) * 0.30102999566398114 + 347  # GetCachedPower
    k = int(dk) + (1 if dk - int(dk) > 0.0 else 0)
    index = (k >> 3) + 1
    big_k = -(-348 + (index << 3))
    c = CACHED[index]
    vf, ve = f, e
    while not vf & (1 << 63):  # Normalize
        vf, ve = vf << 1, ve - 1
    w = _mul((vf, ve), c)
    wp = _mul((pf, pe), c)
    wm = _mul((mf, me), c)
    wp, wm = (wp[0] - 1, wp[1]), (wm[0] + 1, wm[1])
    return _digit_gen(w, wp, wp[0] - wm[0], big_k)


def _digit_gen(w: tuple[int, int], mp: tuple[int, int], delta: int, big_k: int) -> tuple[str, int]:
    one_e = -mp[1]
    one_f = 1 << one_e
    wp_w = mp[0] - w[0]
    p1, p2 = mp[0] >> one_e, mp[0] & (one_f - 1)
    kappa = len(str(p1)) if p1 < 10**8 else 9  # CountDecimalDigit32
    buffer: list[int] = []
    while kappa > 0:
        d, p1 = divmod(p1, 10 ** (kappa - 1))
        if d or buffer:
            buffer.append(d)
        kappa -= 1
        tmp = (p1 << one_e) + p2
        if tmp <= delta:
            _grisu_round(buffer, delta, tmp, 10**kappa << one_e, wp_w)
            return "".join(map(str, buffer)), big_k + kappa
    while True:
        p2, delta = p2 * 10, delta * 10
        d = p2 >> one_e
        if d or buffer:
            buffer.append(d)
        p2 &= one_f - 1
        kappa -= 1
        if p2 < delta:
            index = -kappa
            _grisu_round(buffer, delta, p2, one_f, (wp_w * (10**index if index < 9 else 0)) & M64)
            return "".join(map(str, buffer)), big_k + kappa


def _grisu_round(buffer: list[int], delta: int, rest: int, ten_kappa: int, wp_w: int) -> None:
    while rest < wp_w and delta - rest >= ten_kappa and (
        rest + ten_kappa < wp_w or wp_w - rest > rest + ten_kappa - wp_w
    ):
        buffer[-1] -= 1
        rest += ten_kappa
    assert 0 <= buffer[-1] <= 9


def _prettify(digits: str, k: int, max_decimal_places: int = 324) -> str:
    length = len(digits)
    kk = length + k
    if k >= 0 and kk <= 21:
        return digits + "0" * k + ".0"
    if 0 < kk <= 21:
        return digits[:kk] + "." + digits[kk:]  # no truncation: k > -20 > -maxDecimalPlaces
    if -6 < kk <= 0:
        return "0." + "0" * -kk + digits
    if kk < -max_decimal_places:
        return "0.0"
    if length == 1:
        return f"{digits}e{kk - 1}"
    return f"{digits[0]}.{digits[1:]}e{kk - 1}"


def reference_text(value: float) -> str:
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    digits, k = _grisu2(abs(value))
    return ("-" if value < 0 else "") + _prettify(digits, k)


def test_the_reference_port_reads_the_same_tables() -> None:
    assert [c[0] for c in CACHED] == float_text._POWERS_F.tolist()
    assert [c[1] for c in CACHED] == list(float_text._POWERS_E)


# -- fixed examples (texts the real Triton wrote) -----------------------------------------------------

FP32_EXAMPLES = [
    ([1234.5678, 1.0e17, 3.4e38, 0.1, -2.5, 1e-7, -0.0, 7.0, 65504.0],
     b"[1234.5677490234376,99999998430674950.0,3.3999999521443644e38,0.10000000149011612,-2.5,"
     b"1.0000000116860974e-7,-0.0,7.0,65504.0]"),
    ([1e-30, 123456789012, 1e21, 1e22, 0.000001, 1.5e-5],
     b"[1.0000000031710769e-30,123456790528.0,1.0000000200408774e21,9.999999778196309e21,"
     b"9.999999974752428e-7,0.000014999999621068128]"),
    ([-13.166112899780273, 25.278705596923828, 1.401298464324817e-45, 3.4028234663852886e38],
     b"[-13.166112899780274,25.278705596923829,1.401298464324817e-45,3.4028234663852887e38]"),
]
FP64_EXAMPLES = [
    ([1234.5678, 1e17, 3.4e38, 0.1, -2.5, 1e-7, -0.0, 7.0, 65504.0, 5e-324, 1.7976931348623157e308],
     b"[1234.5678,100000000000000000.0,3.4e38,0.1,-2.5,1e-7,-0.0,7.0,65504.0,5e-324,1.7976931348623157e308]"),
    ([1e21, 1e22, 1e-6, 1e-7, 123456789012345680000.0, 0.0, -1e-5, 2.0**-1074 * 2, 1e-323],
     b"[1e21,1e22,0.000001,1e-7,123456789012345680000.0,0.0,-0.00001,1e-323,1e-323]"),
    ([-0.034858029327385874, 1.8014398509481984e16],
     b"[-0.034858029327385877,18014398509481985.0]"),
]


@pytest.mark.parametrize(("values", "text"), FP32_EXAMPLES)
def test_fp32_examples_read_as_triton_wrote_them(values: list[float], text: bytes) -> None:
    assert json_array(np.array(values, np.float32)) == text
    assert json_array(np.array(values * 5, np.float32)) == b"[" + b",".join([text[1:-1]] * 5) + b"]"


@pytest.mark.parametrize(("values", "text"), FP64_EXAMPLES)
def test_fp64_examples_read_as_triton_wrote_them(values: list[float], text: bytes) -> None:
    assert json_array(np.array(values, np.float64)) == text
    assert json_array(np.array(values * 5, np.float64)) == b"[" + b",".join([text[1:-1]] * 5) + b"]"


def test_arrays_are_written_flat_and_only_finite_values_have_a_text() -> None:
    assert json_array(np.zeros((0,), np.float32)) == b"[]"
    assert json_array(np.array([[1.0, 2.0], [3.0, -0.5]], np.float32)) == b"[1.0,2.0,3.0,-0.5]"
    assert double_texts([]) == []
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="no JSON form"):
            json_array(np.array([1.0, bad]))
        with pytest.raises(ValueError, match="no JSON form"):
            json_array(np.full(100, bad))


# -- properties, against the reference port ------------------------------------------------------------


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _bits64(b: int) -> float:
    value: float = np.uint64(b).view(np.float64).item()
    return value


def _bits32(b: int) -> float:
    value: float = np.uint32(b).view(np.float32).item()
    return value


BOUNDARIES = [
    0.0, -0.0, 5e-324, 2.2250738585072014e-308, 2.225073858507201e-308, 1.7976931348623157e308, 1e21, 1e22,
    9.999999999999999e20, 1.0000000000000002e21, 1e-7, 1e-6, 9.999999999999999e-7, 1.0000000000000002e-6,
    2.0**53, 2.0**53 + 2, 2.0**64, 1.401298464324817e-45, 1.1754943508222875e-38, 3.4028234663852886e38,
    0.1, 0.2, 0.3, 1 / 3, 2 / 3,
]
doubles = st.one_of(
    st.integers(0, 2**32 - 1).map(_bits32).filter(_finite),  # FP32 bit patterns, widened
    st.integers(0, 2**64 - 1).map(_bits64).filter(_finite),  # FP64 bit patterns
    st.integers(1, 2**52 - 1).map(_bits64),  # FP64 subnormals
    st.integers(1, 2**23 - 1).map(_bits32),  # FP32 subnormals
    st.integers(-323, 308).map(lambda k: float(f"1e{k}")),  # powers of ten
    st.integers(-1074, 1023).map(lambda k: 2.0**k),  # powers of two (the denser binade below)
    st.sampled_from(BOUNDARIES).flatmap(lambda x: st.sampled_from([x, math.nextafter(x, math.inf),
                                                                  math.nextafter(x, -math.inf)])),
    st.floats(-1.0, 1.0, width=32),  # embeddings
    st.integers(-(2**53), 2**53).map(float),
).filter(_finite).flatmap(lambda x: st.sampled_from([x, -x]))
# Up to 80 values: both the one-value-at-a-time path (up to 32) and the whole-array path.
arrays = st.lists(doubles, max_size=80)


@given(arrays)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_every_text_reads_back_as_its_double(values: list[float]) -> None:
    texts = double_texts(values)
    assert len(texts) == len(values)
    for value, text in zip(values, texts, strict=True):
        assert struct.pack("<d", float(text)) == struct.pack("<d", value), (value, text)
    assert orjson.loads(json_array(values)) == values


@given(arrays)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_every_text_is_the_reference_ports(values: list[float]) -> None:
    assert double_texts(values) == [reference_text(v) for v in values]


@given(st.lists(doubles, min_size=1, max_size=float_text._SCALAR_MAX))
@settings(max_examples=100, deadline=None)
def test_both_paths_write_the_same_texts(values: list[float]) -> None:
    float_text._MEMO.clear()
    one_by_one = json_array(values)[1:-1]  # few values: written one at a time
    times = float_text._SCALAR_MAX // len(values) + 1
    assert json_array(values * times) == b"[" + b",".join([one_by_one] * times) + b"]"  # as a whole array


def test_long_arrays_cross_chunk_boundaries() -> None:
    rng = np.random.default_rng(7)
    values = rng.standard_normal(2 * float_text._CHUNK + 3).astype(np.float32)
    texts = double_texts(values)
    assert texts == [reference_text(float(v)) for v in values]


# -- the real Triton ---------------------------------------------------------------------------------

IDENTITY_CONFIG = """backend: "python"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_{t} dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_{t} dims: [ -1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


@pytest.fixture(scope="module")
def triton_floats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """Triton with identity models for FP32, FP64 and FP16 (the project's identity model.py)."""
    repo = tmp_path_factory.mktemp("float-models")
    for datatype in ("FP32", "FP64", "FP16"):
        model = repo / f"identity_{datatype.lower()}"
        (model / "1").mkdir(parents=True)
        shutil.copy(MODELS_DIR / "identity_fp32" / "1" / "model.py", model / "1" / "model.py")
        (model / "config.pbtxt").write_text(IDENTITY_CONFIG.format(t=datatype))
    with TritonServer(repo, tmp_path_factory.mktemp("float-triton")) as server:
        yield server


def triton_data(server: TritonServer, values: npt.NDArray[np.floating]) -> bytes:
    """The ``data`` array Triton writes in JSON for ``values`` (sent in binary: no parsing involved)."""
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}[values.dtype]
    raw = values.tobytes()
    head = orjson.dumps({
        "inputs": [{"name": "INPUT0", "datatype": datatype, "shape": [len(values)],
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}],
    })
    answer = exchange(server.url, "POST", f"/v2/models/identity_{datatype.lower()}/infer", head + raw,
                      {"Inference-Header-Content-Length": str(len(head))})
    assert answer.status == 200, answer.body
    start = answer.body.index(b'"data":[') + len(b'"data":')
    return answer.body[start : answer.body.index(b"]", start) + 1]


def assert_same_texts(server: TritonServer, values: npt.NDArray[np.floating]) -> None:
    theirs, ours = triton_data(server, values), json_array(values)
    if theirs != ours:
        pairs = zip(values.tolist(), theirs[1:-1].split(b","), ours[1:-1].split(b","), strict=True)
        wrong = [(v, t, o) for v, t, o in pairs if t != o]
        pytest.fail(f"{len(wrong)} of {len(values)} differ from Triton's, first (value, Triton, ours): {wrong[:5]}")


def _finite_only(a: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    return a[np.isfinite(a)]


def _edges(dtype: type[np.floating]) -> npt.NDArray[np.floating]:
    with np.errstate(over="ignore", under="ignore"):
        tens = np.array([float(f"1e{k}") for k in range(-323, 309)]).astype(dtype)
        twos = np.ldexp(1.0, np.arange(-1074, 1024)).astype(dtype)
        near = np.array(BOUNDARIES, dtype)
        near = np.concatenate([near, np.nextafter(near, dtype(np.inf)), np.nextafter(near, dtype(-np.inf))])
    values = _finite_only(np.concatenate([tens, twos, near, np.arange(-3000, 3000, dtype=dtype)]))
    return np.concatenate([values, -values])


def test_fp32_texts_are_tritons(triton_floats: TritonServer) -> None:
    rng = np.random.default_rng(2024)
    bits = _finite_only(rng.integers(0, 2**32, 60_000, dtype=np.uint64).astype(np.uint32).view(np.float32))
    embeddings = rng.standard_normal(30_000).astype(np.float32)
    subnormal = rng.integers(1, 2**23, 5_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    assert_same_texts(triton_floats, np.concatenate([bits, embeddings, subnormal, _edges(np.float32)]))


def test_fp64_texts_are_tritons(triton_floats: TritonServer) -> None:
    rng = np.random.default_rng(2025)
    bits = _finite_only(rng.integers(0, 2**64 - 1, 60_000, dtype=np.uint64).view(np.float64))
    normal = rng.standard_normal(30_000)
    subnormal = rng.integers(1, 2**52, 5_000, dtype=np.uint64).view(np.float64)
    widened = rng.standard_normal(5_000).astype(np.float32).astype(np.float64)
    assert_same_texts(triton_floats, np.concatenate([bits, normal, subnormal, widened, _edges(np.float64)]))


@given(st.lists(doubles, min_size=1, max_size=200))
@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=None)
def test_drawn_arrays_are_written_as_triton_writes_them(triton_floats: TritonServer, values: list[float]) -> None:
    assert_same_texts(triton_floats, np.array(values, np.float64))
    with np.errstate(over="ignore"):
        narrow = np.array(values, np.float64).astype(np.float32)
    if np.isfinite(narrow).any():
        assert_same_texts(triton_floats, _finite_only(narrow))


def test_triton_refuses_fp16_outputs_in_json(triton_floats: TritonServer) -> None:
    """Why the codec writes FP16 in binary whatever a caller asks: Triton has no JSON form for it."""
    raw = np.array([1.5, 2.0], np.float16).tobytes()
    head = orjson.dumps({
        "inputs": [{"name": "INPUT0", "datatype": "FP16", "shape": [2], "parameters": {"binary_data_size": 4}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}],
    })
    answer = exchange(triton_floats.url, "POST", "/v2/models/identity_fp16/infer", head + raw,
                      {"Inference-Header-Content-Length": str(len(head))})
    assert answer.status == 400
    assert b"FP16 data via JSON is not supported" in answer.body


def test_a_signalling_nan_is_written_as_nan_without_a_warning() -> None:
    """Widening an FP32 signalling NaN to double raises the FPU's invalid flag, which numpy turns into
    a RuntimeWarning on the sidecar's stderr: a model's output must never cause that."""
    values = np.array([0x7FA00000, 0xFFA00001, 0x3F800000], dtype=np.uint32).view(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert json_array(values, non_finite=True) == b"[NaN,NaN,1.0]"


@given(st.lists(st.integers(0, 40), min_size=1, max_size=60), st.integers(0, 4096))
def test_the_answer_text_memo_stays_within_its_budget_and_never_changes_a_text(picks: list[int], budget: int) -> None:
    """``cache.text_bytes``: the memo of float answers' JSON text holds at most its budget, and what it gives
    is always the text written afresh, whatever it kept or let go of."""
    memo = kserve_http._FloatTexts(budget)
    tensors = [np.arange(i, i + 8, dtype=np.float32) / 7 for i in range(41)]
    for i in picks:
        data = tensors[i].tobytes()
        assert memo.get("FP32", data) == float_text.json_array(tensors[i])
        assert memo.used <= memo.max_bytes
    memo.resize(budget // 2)
    assert memo.used <= budget // 2

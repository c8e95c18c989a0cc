"""TF Serving REST codec: the documented examples (g3doc/api_rest.md), round trips, typing rules, fuzz."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sidecar.errors import DecodeError
from sidecar.protocols import tfserving_rest as codec
from sidecar.protocols.request import (
    InferenceRequest,
    InferenceResponse,
    Protocol,
    Tensor,
    element_count,
    freeze_params,
    pack_bytes_elements,
    thaw_params,
    unpack_bytes_elements,
)
from tests.strategies import json_values, mutated, names, tensor_data

SLOW_OK = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)


def _f64(*values: float) -> bytes:
    return np.array(values, dtype="<f8").tobytes()


def _i64(*values: int) -> bytes:
    return np.array(values, dtype="<i8").tobytes()


def _strings(*values: str | bytes) -> bytes:
    return pack_bytes_elements([v.encode() if isinstance(v, str) else v for v in values])


def _predict(body: bytes | str, label: str = "") -> InferenceRequest:
    raw = body.encode() if isinstance(body, str) else body
    return codec.decode_request("m", "", label, "predict", raw)


def _params(req: InferenceRequest | InferenceResponse) -> dict[str, Any]:
    """Parameters and, for requests, options (the row or columnar ``format``) together."""
    options = thaw_params(req.options) if isinstance(req, InferenceRequest) else {}
    return thaw_params(req.parameters) | options


# ----------------------------------------------------------------------------------------------
# paths


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/models/half:predict", ("half", "", "", "predict")),
        ("/v1/models/half/versions/123:classify", ("half", "123", "", "classify")),
        ("/v1/models/half/labels/stable:regress", ("half", "", "stable", "regress")),
        ("/v1/models/half:PREDICT", ("half", "", "", "predict")),  # TF Serving's regex is (?i)
        ("/v1/models/half/versions/x:predict", None),
        ("/v1/models/half/labels/a/b:predict", None),
        ("/v1/models/half:explain", None),
        ("/v1/models/half", None),
        ("/v1/models/half/metadata", None),
        ("/v1/models/:predict", None),
        ("/v1/models/a:b:predict", None),
        ("/v2/models/half/infer", None),
    ],
)
def test_match_infer_path(path: str, expected: tuple[str, str, str, str] | None) -> None:
    assert codec.match_infer_path(path) == expected


# Paths reach the codec decoded as latin-1 (h1server): never a lone surrogate, which has no UTF-8 form.
_PATH_TEXT = st.characters(blacklist_characters="/:", blacklist_categories=("Cs",))


@given(
    st.text(alphabet=_PATH_TEXT, min_size=1),
    st.sampled_from(["", "7"]),
    st.text(alphabet=_PATH_TEXT, max_size=5),
    st.sampled_from(codec.METHODS),
)
def test_infer_path_round_trips(model: str, version: str, label: str, method: str) -> None:
    label = "" if version else label
    params = {codec.LABEL_PARAM: label} if label else {}
    req = InferenceRequest(Protocol.TFSERVING_REST, model, version, method, parameters=freeze_params(params))
    assert codec.match_infer_path(codec.infer_path(req)) == (model, version, label, method)


def test_error_body() -> None:
    assert orjson.loads(codec.error_body("Servable not found")) == {"error": "Servable not found"}


# ----------------------------------------------------------------------------------------------
# the documented examples


def test_doc_row_format_scalars() -> None:
    req = _predict('{"instances": [ "foo", "bar", "baz" ]}')
    assert req.inputs == (Tensor("", "BYTES", (3,), _strings("foo", "bar", "baz")),)
    assert _params(req) == {"format": "row"}
    assert req.protocol is Protocol.TFSERVING_REST and req.method == "predict"


def test_doc_row_format_nested_lists() -> None:
    req = _predict('{"instances": [ [[1, 2]], [[3, 4]] ]}')
    assert req.inputs == (Tensor("", "INT64", (2, 1, 2), _i64(1, 2, 3, 4)),)


DOC_ROWS = """{
 "instances": [
   {"tag": "foo", "signal": [1, 2, 3, 4, 5], "sensor": [[1, 2], [3, 4]]},
   {"tag": "bar", "signal": [3, 4, 1, 2, 5], "sensor": [[4, 5], [6, 8]]}
 ]
}"""
DOC_COLUMNS = """{
 "inputs": {
   "tag": ["foo", "bar"],
   "signal": [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]],
   "sensor": [[[1, 2], [3, 4]], [[4, 5], [6, 8]]]
 }
}"""
DOC_TENSORS = (
    Tensor("tag", "BYTES", (2,), _strings("foo", "bar")),
    Tensor("signal", "INT64", (2, 5), _i64(1, 2, 3, 4, 5, 3, 4, 1, 2, 5)),
    Tensor("sensor", "INT64", (2, 2, 2), _i64(1, 2, 3, 4, 4, 5, 6, 8)),
)


def test_doc_row_and_columnar_forms_carry_the_same_tensors() -> None:
    rows, columns = _predict(DOC_ROWS), _predict(DOC_COLUMNS)
    assert rows.inputs == columns.inputs == DOC_TENSORS
    assert _params(rows) == {"format": "row"} and _params(columns) == {"format": "columnar"}
    assert codec.row_format(rows) and not codec.row_format(columns)
    assert orjson.loads(codec.encode_request(rows)) == orjson.loads(DOC_ROWS)
    assert orjson.loads(codec.encode_request(columns)) == orjson.loads(DOC_COLUMNS)


def test_doc_classify_request_with_binary_feature() -> None:
    body = """{
      "signature_name": "classify_objects",
      "examples": [
        {"image": { "b64": "aW1hZ2UgYnl0ZXM=" }, "caption": "seaside"},
        {"image": { "b64": "YXdlc29tZSBpbWFnZSBieXRlcw==" }, "caption": "mountains"}
      ]
    }"""
    req = codec.decode_request("m", "", "", "classify", body.encode())
    assert req.method == "classify"
    assert _params(req) == {"signature_name": "classify_objects"}
    (examples,) = req.inputs
    assert examples.name == "examples" and examples.datatype == "BYTES" and examples.shape == (2,)
    assert [orjson.loads(e) for e in unpack_bytes_elements(examples.data)] == orjson.loads(body)["examples"]
    # Canonical: sorted keys, so key order on the wire does not change identity.
    assert (
        unpack_bytes_elements(examples.data)[0] == b'{"caption":"seaside","image":{"b64":"aW1hZ2UgYnl0ZXM="}}'
    )
    assert orjson.loads(codec.encode_request(req)) == orjson.loads(body)


def test_doc_half_plus_three_predict() -> None:
    req = _predict('{"instances": [1.0,2.0,5.0]}')
    assert req.inputs == (Tensor("", "FP64", (3,), _f64(1.0, 2.0, 5.0)),)
    resp = codec.decode_response("predict", b'{\n    "predictions": [3.5, 4.0, 5.5]\n}', row_format=True)
    assert resp.outputs == (Tensor("", "FP64", (3,), _f64(3.5, 4.0, 5.5)),)
    assert orjson.loads(codec.encode_response(resp, "predict", True)) == {"predictions": [3.5, 4.0, 5.5]}


def test_doc_half_plus_three_regress() -> None:
    body = b'{"signature_name": "tensorflow/serving/regress", "examples": [{"x": 1.0}, {"x": 2.0}]}'
    req = codec.decode_request("half_plus_three", "", "", "regress", body)
    assert _params(req) == {"signature_name": "tensorflow/serving/regress"}
    assert req.inputs == (Tensor("examples", "BYTES", (2,), _strings('{"x":1.0}', '{"x":2.0}')),)
    resp = codec.decode_response("regress", b'{\n    "results": [3.5, 4.0]\n}', row_format=False)
    assert resp.outputs == (Tensor("outputs", "FP64", (2,), _f64(3.5, 4.0)),)
    assert codec.encode_response(resp, "regress", False) == b'{"results":[3.5,4.0]}'


def test_doc_classify_response() -> None:
    # The doc's format section says "result"; the server writes "results". Both are read.
    for key in ("result", "results"):
        body = orjson.dumps({key: [[["cat", 0.75], ["", 0.25]], [["dog", 1.0], ["cat", 0]]]})
        resp = codec.decode_response("classify", body, row_format=True)
        assert resp.outputs == (
            Tensor("classes", "BYTES", (2, 2), _strings("cat", "", "dog", "cat")),
            Tensor("scores", "FP64", (2, 2), _f64(0.75, 0.25, 1.0, 0.0)),
        )
    assert orjson.loads(codec.encode_response(resp, "classify", True)) == {
        "results": [[["cat", 0.75], ["", 0.25]], [["dog", 1.0], ["cat", 0.0]]]
    }


def test_doc_json_conformance_nan_and_infinity() -> None:
    req = _predict('{"instances": [{"sensor_readings": [ 1.0, -3.14, NaN, Infinity, -Infinity ]}]}')
    (t,) = req.inputs
    values = np.frombuffer(t.data, dtype="<f8")
    assert t.name == "sensor_readings" and t.shape == (1, 5)
    assert (
        values[:2].tolist() == [1.0, -3.14]
        and math.isnan(values[2])
        and values[3:].tolist()
        == [
            math.inf,
            -math.inf,
        ]
    )
    assert b"NaN" in codec.encode_request(req) and b"-Infinity" in codec.encode_request(req)
    assert _predict(codec.encode_request(req)) == req


def test_doc_error_response() -> None:
    with pytest.raises(DecodeError, match=r"^error: .*Servable not found"):
        codec.decode_response("predict", b'{ "error": "Servable not found for request: Latest(half)" }', True)


# ----------------------------------------------------------------------------------------------
# typing and shape rules


@pytest.mark.parametrize(
    ("inputs", "datatype", "shape", "data"),
    [
        ("[1, 2]", "INT64", (2,), _i64(1, 2)),
        ("[1, 2.5]", "FP64", (2,), _f64(1, 2.5)),
        ("[1.0, 2.0]", "FP64", (2,), _f64(1, 2)),
        ("[true, false]", "BOOL", (2,), b"\x01\x00"),
        ('["a", {"b64": "/w=="}]', "BYTES", (2,), _strings("a", b"\xff")),
        ('{"b64": "/w"}', "BYTES", (), _strings(b"\xff")),  # unpadded base64, as absl accepts
        ("7", "INT64", (), _i64(7)),
        ("[[], []]", "FP64", (2, 0), b""),
        ("[]", "FP64", (0,), b""),
        ("[18446744073709551615, 1]", "UINT64", (2,), np.array([2**64 - 1, 1], "<u8").tobytes()),
        ("[-9223372036854775808]", "INT64", (1,), _i64(-(2**63))),
        ("[123456789012345678]", "INT64", (1,), _i64(123456789012345678)),  # integers are exact to 64 bits
        ("[0.5, 16777215]", "FP64", (2,), _f64(0.5, 16777215)),
    ],
)
def test_type_inference(inputs: str, datatype: str, shape: tuple[int, ...], data: bytes) -> None:
    (t,) = _predict(f'{{"inputs": {inputs}}}').inputs
    assert (t.name, t.datatype, t.shape, t.data) == ("", datatype, shape, data)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"inputs": [1, true]}', r"^inputs\[1\]: a boolean among number values"),
        ('{"inputs": [[1, "a"]]}', r"^inputs\[0\]\[1\]: a string among number values"),
        ('{"inputs": [1, null]}', r"^inputs\[1\]: expected a number, string, boolean .*got null"),
        ('{"inputs": {"x": [[1], [{"a": 1}]]}}', r"^inputs\.x\[1\]\[0\]: expected a number.*got an object"),
        ('{"inputs": [[1, 2], [3]]}', r"^inputs\[1\]: has 1 elements, its siblings 2"),
        ('{"inputs": [[1], 2]}', r"^inputs\[1\]: expected a list like its siblings"),
        ('{"inputs": [1, [2]]}', r"^inputs\[1\]: expected a value like its siblings, got a list"),
        ('{"inputs": [-1, 18446744073709551615]}', r"^inputs: integers span more than"),
        ('{"inputs": {"x_bytes": [{"b64": "!!"}]}}', r"^inputs\.x_bytes\[0\]\.b64: not valid base64"),
        ('{"instances": [{"a": [1, 2]}, {"a": [1]}]}', r"^instances\[1\]\.a: has 1 elements, its siblings 2"),
        ('{"instances": [{"a": 1}, {"a": true}]}', r"^instances\[1\]\.a: a boolean among number values"),
        ('{"instances": [{"a": 1}, {"b": 1}]}', r"^instances\[1\]: has keys \['b'\], but instances\[0\] has"),
        ('{"instances": [{"a": 1}, 2]}', r"^instances\[1\]: expected an object of named inputs"),
        ('{"instances": [1, {"a": 2}]}', r"^instances\[1\]: an object of named inputs among bare values"),
        ('{"instances": [{}]}', r"^instances\[0\]: expected at least one named input"),
        ('{"instances": []}', r"^instances: expected a non-empty list"),
        ('{"instances": {"a": 1}}', r"^instances: expected a non-empty list"),
        ('{"instances": [1], "inputs": [1]}', r"^body: expected only one of"),
        ('{"signature_name": "x"}', r"^body: missing 'instances' or 'inputs'"),
        ('{"signature_name": 1, "inputs": 1}', r"^signature_name: expected a string"),
        ("[1]", r"^body: expected a JSON object"),
        ("{", r"^body: not valid JSON"),
        ('{"inputs": [NaN], "x": "\\ud800"}', r"^body: not valid JSON"),
        ('{"inputs": [Nan]}', r"^body: not valid JSON"),
    ],
)
def test_malformed_predict_requests_name_the_field(body: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        _predict(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{}", r"^examples: expected a non-empty list"),
        ('{"examples": []}', r"^examples: expected a non-empty list"),
        ('{"examples": [1]}', r"^examples\[0\]: expected an object of features"),
        ('{"examples": [{"x": null}]}', r"^examples\[0\]\.x: expected a number"),
        ('{"examples": [{"x": [[1]]}]}', r"^examples\[0\]\.x\[0\]: expected a number.*got a list"),
        ('{"examples": [{"x": [1, 2.5]}]}', r"^examples\[0\]\.x\[1\]: a float value in a int64 feature"),
        ('{"examples": [{"x": ["a", 1]}]}', r"^examples\[0\]\.x\[1\]: a int64 value in a bytes feature"),
        ('{"examples": [{"x": 18446744073709551615}]}', r"^examples\[0\]\.x: integer beyond INT64"),
        ('{"examples": [{"x": 1e39}]}', r"^examples\[0\]\.x: beyond the float range"),
        ('{"examples": [{"x": {"b64": "%%"}}]}', r"^examples\[0\]\.x\.b64: not valid base64"),
        ('{"context": [], "examples": [{"x": 1}]}', r"^context: expected an object of features"),
        ('{"context": {"x": 1}, "examples": [{"x": 1}]}', r"^examples\[0\]\.x: also in context"),
    ],
)
def test_malformed_classify_requests_name_the_field(body: str, message: str) -> None:
    for method in ("classify", "regress"):
        with pytest.raises(DecodeError, match=message):
            codec.decode_request("m", "", "", method, body.encode())


def test_unknown_method() -> None:
    with pytest.raises(DecodeError, match=r"^method"):
        codec.decode_request("m", "", "", "explain", b'{"inputs": 1}')
    with pytest.raises(DecodeError, match=r"^method"):
        codec.decode_response("explain", b'{"outputs": 1}', False)


@pytest.mark.parametrize(
    ("method", "row_format", "body", "message"),
    [
        ("predict", True, '{"outputs": [1]}', r"^predictions: missing"),
        ("predict", False, '{"predictions": [1]}', r"^outputs: missing"),
        ("predict", True, '{"predictions": [[1], [1, 2]]}', r"^predictions\[1\]: has 2 elements"),
        (
            "classify",
            True,
            '{"results": [[["a", 1]], [["a", 1], ["b", 2]]]}',
            r"^results\[1\]: has 2 classes",
        ),
        ("classify", True, '{"results": [[["a"]]]}', r"^results\[0\]\[0\]: expected a \[label, score\] pair"),
        ("classify", True, '{"results": [[[1, 0.5]]]}', r"^results\[0\]\[0\]\[0\]: expected a string"),
        ("classify", True, '{"results": [[["a", "b"]]]}', r"^results\[0\]\[0\]\[0\]: expected a number"),
        ("classify", True, '{"results": {}}', r"^results: expected a list"),
        ("regress", True, '{"results": [1, true]}', r"^results\[1\]: expected a number"),
        ("regress", True, '{"error": "boom"}', r"^error: .*boom"),
    ],
)
def test_malformed_responses_name_the_field(method: str, row_format: bool, body: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        codec.decode_response(method, body.encode(), row_format)


def test_label_and_signature_are_parameters() -> None:
    req = codec.decode_request(
        "m", "", "canary", "predict", b'{"signature_name": "serving_default", "inputs": [1]}'
    )
    assert _params(req) == {"format": "columnar", "signature_name": "serving_default", "label": "canary"}
    assert codec.infer_path(req) == "/v1/models/m/labels/canary:predict"
    assert orjson.loads(codec.encode_request(req)) == {"signature_name": "serving_default", "inputs": [1]}


def test_context_is_a_parameter_and_survives() -> None:
    body = b'{"context": {"lang": "en", "w": [NaN, 1.5]}, "examples": [{"x": [1, 2]}, {"x": 3}]}'
    req = codec.decode_request("m", "", "", "classify", body)
    assert _params(req) == {"context": '{"lang":"en","w":[NaN,1.5]}'}
    again = codec.decode_request("m", "", "", "classify", codec.encode_request(req))
    assert again == req


def test_bytes_encoding_rules() -> None:
    req = InferenceRequest(
        Protocol.TFSERVING_REST,
        "m",
        method="predict",
        inputs=(
            Tensor("text", "BYTES", (2,), _strings("héllo", "")),
            Tensor(
                "image_bytes", "BYTES", (1,), _strings("abc")
            ),  # *_bytes: always b64, as TF Serving writes
            Tensor("raw", "BYTES", (2,), _strings("ok", b"\xff\x00")),  # not UTF-8: b64
        ),
    )
    assert orjson.loads(codec.encode_request(req)) == {
        "inputs": {
            "text": ["héllo", ""],
            "image_bytes": [{"b64": "YWJj"}],
            "raw": [{"b64": "b2s="}, {"b64": "/wA="}],
        }
    }
    assert _predict(codec.encode_request(req)).inputs == req.inputs


@pytest.mark.parametrize(
    ("datatype", "data", "decoded"),
    [
        (
            "FP32",
            np.array([0.1, -2.5], "<f4").tobytes(),
            Tensor("x", "FP64", (2,), _f64(np.float32(0.1), -2.5)),
        ),
        ("FP16", np.array([0.1, 1], "<f2").tobytes(), Tensor("x", "FP64", (2,), _f64(np.float16(0.1), 1.0))),
        ("BF16", b"\xcd\x3d\x80\x3f", Tensor("x", "FP64", (2,), _f64(0.10009765625, 1.0))),
        ("INT32", np.array([-3, 4], "<i4").tobytes(), Tensor("x", "INT64", (2,), _i64(-3, 4))),
        ("UINT8", b"\x00\xff", Tensor("x", "INT64", (2,), _i64(0, 255))),
    ],
)
def test_other_datatypes_encode_as_json_numbers(datatype: str, data: bytes, decoded: Tensor) -> None:
    req = InferenceRequest(
        Protocol.TFSERVING_REST, "m", method="predict", inputs=(Tensor("x", datatype, (2,), data),)
    )
    assert _predict(codec.encode_request(req)).inputs == (decoded,)


def test_requests_without_format_encode_columnar() -> None:
    req = InferenceRequest(
        Protocol.TFSERVING_REST, "m", method="predict", inputs=(Tensor("a", "INT64", (), _i64(1)),)
    )
    assert codec.encode_request(req) == b'{"inputs":{"a":1}}'
    assert not codec.row_format(req)


def test_row_format_needs_one_batch_size() -> None:
    params = freeze_params({"format": "row"})
    a, b = Tensor("a", "INT64", (1,), _i64(1)), Tensor("b", "INT64", (2,), _i64(1, 2))
    with pytest.raises(ValueError, match="batch size"):
        codec.encode_request(
            InferenceRequest(Protocol.TFSERVING_REST, "m", method="predict", inputs=(a, b), options=params)
        )


# ----------------------------------------------------------------------------------------------
# what TF Serving reads differently: never modelled
#
# TF Serving parses with RapidJSON 1.1.0 and kParseNanAndInfFlag only (util/json_tensor.cc). The oracle below
# is its ParseNumber, step by step, without kParseFullPrecisionFlag: the double TF Serving's signature cast
# starts from. Its ``d * 10 + digit`` steps round twice, as compiled without FMA contraction; the numbers the
# codec models never take those steps, so the properties below hold either way.

_FLT_MAX = float(np.finfo(np.float32).max)
_POW10 = [float(f"1e{k}") for k in range(309)]  # RapidJSON's table: each entry the correctly rounded double


def _fast_path(d: float, p: int) -> float:
    if p < -308:
        return 0.0
    return d * _POW10[p] if p >= 0 else d / _POW10[-p]


def _rapidjson(text: str) -> float | int:
    """What RapidJSON 1.1.0 (normal precision, 64-bit build) reads for one JSON number token; ValueError for
    one it refuses (an exponent past 308, a result past DBL_MAX)."""
    pos, minus = 0, text.startswith("-")
    pos += minus
    small, wide, use64, digits, d = 0, 0, False, 0, 0.0
    if text[pos] == "0":
        pos += 1
    else:
        small, pos = int(text[pos]), pos + 1
        limit, last = (214748364, "8") if minus else (429496729, "5")
        while pos < len(text) and text[pos].isdigit():
            if small >= limit and (small != limit or text[pos] > last):
                wide, use64 = small, True
                break
            small, pos, digits = small * 10 + int(text[pos]), pos + 1, digits + 1
    use_double = False
    if use64:
        limit, last = (0x0CCCCCCCCCCCCCCC, "8") if minus else (0x1999999999999999, "5")
        while pos < len(text) and text[pos].isdigit():
            if wide >= limit and (wide != limit or text[pos] > last):
                d, use_double = float(wide), True
                break
            wide, pos, digits = wide * 10 + int(text[pos]), pos + 1, digits + 1
    while use_double and pos < len(text) and text[pos].isdigit():
        d, pos = d * 10 + int(text[pos]), pos + 1
    exp_frac = 0
    if pos < len(text) and text[pos] == ".":
        pos += 1
        if not use_double:
            wide = wide if use64 else small
            while pos < len(text) and text[pos].isdigit() and wide <= 2**53 - 1:
                wide, pos, exp_frac = wide * 10 + int(text[pos]), pos + 1, exp_frac - 1
                digits += wide != 0
            d, use_double = float(wide), True
        while pos < len(text) and text[pos].isdigit():
            if digits < 17:
                d, exp_frac = d * 10.0 + int(text[pos]), exp_frac - 1
                digits += d > 0.0
            pos += 1
    exp = 0
    if pos < len(text) and text[pos] in "eE":
        pos += 1
        if not use_double:
            d, use_double = float(wide if use64 else small), True
        negative = text[pos] == "-"
        pos += text[pos] in "+-"
        while pos < len(text) and text[pos].isdigit():
            exp, pos = exp * 10 + int(text[pos]), pos + 1
            if not negative and exp > 308 - exp_frac:
                raise ValueError("kParseErrorNumberTooBig")
        exp = -exp if negative else exp
    if not use_double:
        value = wide if use64 else small
        return -value if minus else value
    p = exp + exp_frac
    d = _fast_path(_fast_path(d, -308), p + 308) if p < -308 else _fast_path(d, p)
    if d > 1.7976931348623157e308:
        raise ValueError("kParseErrorNumberTooBig")
    return -d if minus else d


def _spelt_exactly(text: str) -> bool:
    try:
        return _rapidjson(text) == float(text)
    except ValueError:
        return False


@pytest.mark.parametrize(
    ("text", "read"),
    [
        ("0.1", 0.1), ("1.5e3", 1500.0), ("0.10000000149011612", 0.10000000149011612), ("-0.0", -0.0),
        ("0.29999999999999997", 0.29999999999999993), ("2.49999999999999978", 2.4999999999999996),
        ("3.7734267711639404", 3.773426771163941),  # repr() of a float32, read one unit off
        ("123456789012345678901234567890", 1.2345678901234566e29), ("18446744073709551615", 2**64 - 1),
    ],
)
def test_the_oracle_reads_as_rapidjson(text: str, read: float) -> None:
    """Known readings (worked through RapidJSON's ParseNumber by hand); the oracle itself is under test here."""
    assert _rapidjson(text) == read
    assert math.copysign(1, _rapidjson(text)) == math.copysign(1, read)
    with pytest.raises(ValueError):
        _rapidjson("0e999")


def short_decimals() -> st.SearchStrategy[float]:
    """Doubles whose text has at most 15 significant digits and a power of ten within 10^+-22, NaN and the
    infinities: what TF Serving's parser reads exactly, so what a request may hold (the property test of
    spellings covers every other)."""
    decimals = st.builds(lambda m, e: float(f"{m}e{e}"), st.integers(-(10**15) + 1, 10**15 - 1), st.integers(-22, 8))
    return decimals.filter(lambda v: _spelt_exactly(repr(v))) | st.sampled_from([math.nan, math.inf, -math.inf, -0.0])


def _is_short(text: str) -> bool:
    """At most 15 significant digits and a power of ten within 10^+-22: RapidJSON's one-rounding fast path."""
    match = re.fullmatch(r"-?([0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?", text)
    assert match is not None
    whole, fraction, exponent = match.group(1), match.group(2) or "", match.group(3) or "0"
    power = int(exponent) - len(fraction)
    return len((whole + fraction).lstrip("0")) <= 15 and -22 <= power <= 22


DUPLICATED = "a key given more than once"


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("predict", '{"instances": [[1.0]], "instances": [[2.0]]}'),
        ("predict", '{"inputs": [1], "inputs": [2]}'),
        ("predict", '{"signature_name": "a", "signature_name": "b", "inputs": [1]}'),
        ("predict", '{"inputs": {"x": [1], "x": [2]}}'),
        ("predict", '{"inputs": {"x": [1], "y": [2], "x": [3]}}'),
        ("predict", '{"instances": [{"x": 1, "x": 2}]}'),
        ("predict", '{"instances": [{"x": 1}, {"x": 2, "x": 3}]}'),
        ("predict", '{"instances": [{"b64": "YQ==", "b64": "Yg=="}]}'),
        ("predict", '{"inputs": {"x_bytes": [{"b64": "YQ==", "b64": "Yg=="}]}}'),
        ("predict", '{"instances": [{"x": {"b64": "YQ==", "b64": "Yg=="}}]}'),
        ("predict", '{"instances": [{"a:b": 1, "a:b": 2}]}'),  # a colon in a string: the members are counted
        ("predict", '{"inputs": [NaN], "inputs": [1.5]}'),  # the NaN dialect's own parser
        ("classify", '{"examples": [{"x": 1, "x": 2}]}'),
        ("regress", '{"examples": [{"x": 1}], "examples": [{"x": 2}]}'),
        ("classify", '{"context": {"c": 1, "c": 2}, "examples": [{"x": 1}]}'),
        ("classify", '{"examples": [{"x": [{"b64": "YQ==", "b64": "Yg=="}]}]}'),
        # An object TF Serving ignores (under an unknown key) is not walked, so its members count as repeats.
        ("predict", '{"inputs": [1], "extra": {"y": 1}}'),
    ],
)
def test_a_key_given_twice_at_any_level_is_not_modelled(method: str, body: str) -> None:
    """RapidJSON keeps every member: FindMember finds the first, a row is walked member by member, a b64 object
    must have exactly one; orjson keeps the last. No reading of such a body can be the server's."""
    with pytest.raises(DecodeError, match=DUPLICATED):
        codec.decode_request("m", "", "", method, body.encode())


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("predict", '{"instances": [{"a:b": ["c:d"]}], "signature_name": "s:t"}'),
        ("predict", '{"inputs": [1], "extra": 1, "more": [2]}'),
        ("classify", '{"examples": [{"x": ["k:v"], "y": {"b64": "YQ=="}}], "context": {"z": [1]}}'),
    ],
)
def test_distinct_keys_and_colons_in_strings_are_modelled(method: str, body: str) -> None:
    codec.decode_request("m", "", "", method, body.encode())


def test_an_ignored_top_level_key_leaves_the_call_as_it_is() -> None:
    assert _predict('{"inputs": [1.5], "extra": 1, "more": "x"}') == _predict('{"inputs": [1.5]}')


@pytest.mark.parametrize(
    ("number", "modelled"),
    [
        ("0.5", True), ("-0.0", True), ("1.5E3", True), ("1e-5", True), ("123.456", True), ("1e22", True),
        ("0.10000000149011612", True),  # 17 digits, all in RapidJSON's uint64 and exact in a double
        ("0.000000000000001", True),
        ("NaN", True), ("-Infinity", True),
        ("0.29999999999999997", False),  # 0.3 to orjson, 0.29999999999999993 to TF Serving
        ("3.7734267711639404", False),  # repr() of a float32, one unit off to TF Serving
        ("0.1000000000000000055511151231257827", False),  # digits past the 17th are dropped
        ("1e23", False), ("1e-23", False),  # powers of ten RapidJSON does not hold exactly
        ("0e999", False),  # RapidJSON refuses it, orjson reads 0
        ("18446744073709551616", False),  # past 64 bits: RapidJSON sums the digits in doubles
        ("-9223372036854775809", False),
    ],
)
def test_numbers_are_modelled_only_when_tf_serving_reads_them_exactly(number: str, modelled: bool) -> None:
    body = f'{{"inputs": [{number}]}}'.encode()
    if not modelled:
        with pytest.raises(DecodeError, match=r"^body: the number"):
            _predict(body)
        return
    (t,) = _predict(body).inputs
    (value,) = np.frombuffer(t.data, "<f8").tolist()
    if math.isfinite(value):
        assert value == _rapidjson(number) == float(number)
        assert _rapidjson(orjson.dumps(value).decode()) == value  # what the sidecar writes (a batch) reads back
    # The same number among strings, ints and short floats: the long scan stops at it.
    crowded = f'{{"inputs": {{"s": ["1234567890123456789", "0e5"], "i": [123456789012345678], "x": [0.5, {number}]}}}}'
    if modelled:
        _predict(crowded)
    else:
        with pytest.raises(DecodeError):
            _predict(crowded)


_SPELLINGS = ("{!r}", "{:.17g}", "{:.16g}", "{:.15g}", "{:.20g}", "{:.25e}", "{:.3e}", "{:.6f}")


@SLOW_OK
@given(st.floats(allow_nan=False, allow_infinity=False) | st.floats(width=32, allow_nan=False, allow_infinity=False)
       | short_decimals().filter(math.isfinite), st.sampled_from(_SPELLINGS), st.booleans())
def test_a_modelled_number_is_what_tf_serving_reads(value: float, spelling: str, row: bool) -> None:
    """Whatever the spelling, a number is modelled only when TF Serving's parser reads it as the canonical
    double, and reads the sidecar's own text of it (a batch, a replay) as that double too; and every short
    decimal (at most 15 digits, a power of ten within 10^+-22) is modelled."""
    text = spelling.format(value)
    body = (f'{{"instances": [[{text}]]}}' if row else f'{{"inputs": {{"x": [{text}, 0.25]}}}}').encode()
    try:
        req = _predict(body)
    except DecodeError:
        assert not (spelling == "{!r}" and _is_short(text)), f"a short decimal refused: {text}"
        return
    t = req.inputs[0]
    if t.datatype == "INT64":  # an integer spelling: exact within 64 bits
        assert np.frombuffer(t.data, "<i8")[0] == int(text) == _rapidjson(text)
        return
    got = np.frombuffer(t.data, "<f8")[0]
    assert got == _rapidjson(text) == float(text)
    assert _rapidjson(orjson.dumps(float(got)).decode()) == got


def test_an_integer_past_2_24_among_floats_is_not_modelled() -> None:
    """FP64 makes 16777217 and 16777217.0 one value; a DT_FLOAT signature refuses the integer (IsLosslessDecimal)
    and rounds the float."""
    for body in ('{"inputs": [16777216, 0.5]}', '{"instances": [[0.5], [-16777216]]}',
                 '{"inputs": {"x": [0.5, 18446744073709551615]}}'):
        with pytest.raises(DecodeError, match="integer past 2\\^24 among floats"):
            _predict(body)
    assert _predict('{"inputs": [16777215, 0.5]}') == _predict('{"inputs": [16777215.0, 0.5]}')
    (t,) = _predict('{"inputs": [16777216, 3]}').inputs  # all integers: INT64, exact
    assert t.datatype == "INT64"


@pytest.mark.parametrize(
    ("method", "body", "field"),
    [
        ("predict", '{"instances": [{"x\\u0000y": 1}]}', r"instances\[0\]\.x"),
        ("predict", '{"inputs": {"x\\u0000": [1]}}', r"inputs\.x"),
        ("classify", '{"examples": [{"f\\u0000g": 1}]}', r"examples\[0\]\.f"),
        ("regress", '{"context": {"c\\u0000": "v"}, "examples": [{"x": 1}]}', r"context\.c"),
    ],
)
def test_a_nul_in_an_input_or_feature_name_is_not_modelled(method: str, body: str, field: str) -> None:
    """TF Serving reads row keys and feature names as C strings (``kv.name.GetString()`` into a std::string)."""
    with pytest.raises(DecodeError, match=f"^{field}.*NUL"):
        codec.decode_request("m", "", "", method, body.encode())


def test_a_nul_in_a_value_or_the_signature_is_modelled() -> None:
    """Strings and the signature name are copied with their lengths (``GetString(), GetStringLength()``)."""
    (t,) = _predict('{"signature_name": "s\\u0000t", "inputs": {"x": ["a\\u0000b"]}}').inputs
    assert unpack_bytes_elements(t.data) == [b"a\0b"]
    req = codec.decode_request("m", "", "", "classify", b'{"examples": [{"x": "a\\u0000b"}]}')
    assert req.inputs[0].shape == (1,)


@pytest.mark.parametrize(
    ("b64", "decoded"),
    [("YQ==", b"a"), ("YQ", b"a"), ("YWI=", b"ab"), ("YWI", b"ab"), ("", b""),
     ("YR==", b"a"),  # trailing bits absl ignores too
     ("YQ=", None),  # absl: padding absent or exactly as due
     ("YQ===", None), ("Y Q==", None), ("YQ..", None),  # whitespace and "." padding absl accepts: not modelled
     ("YQ==YQ==", None), ("Y", None)],
)
def test_base64_is_read_as_absl_reads_it(b64: str, decoded: bytes | None) -> None:
    body = orjson.dumps({"inputs": {"x_bytes": [{"b64": b64}]}})
    if decoded is None:
        with pytest.raises(DecodeError, match=r"b64: not valid base64"):
            _predict(body)
    else:
        assert unpack_bytes_elements(_predict(body).inputs[0].data) == [decoded]


@pytest.mark.parametrize(
    ("feature", "modelled"),
    [
        ("0.1", True), ("0.10000000149011612", True), ("3.7734267711639404", True),  # FP32 to the server: exact
        ("0.29999999999999997", True), ("1e-30", True), ("0.0", True), ("3.4028234e38", True),
        ("1.000000059604644775390625", False),  # 1 + 2^-24: the midpoint between two floats
        ("3.4028234663852886e38", False),  # FLT_MAX itself: a unit past it is out of range to the server
        ("0e999", False),  # RapidJSON refuses it, orjson reads 0
        ("1e-50", False),  # below FP32's normal range: its rounding is not checked here
    ],
)
def test_float_features_are_fp32_to_tf_serving(feature: str, modelled: bool) -> None:
    """A float feature is ``GetFloat()`` of the inexact double, so only values next to an FP32 rounding
    boundary (or FLT_MAX) depend on the spelling."""
    body = f'{{"examples": [{{"x": [{feature}, 0.5]}}]}}'.encode()
    if modelled:
        codec.decode_request("m", "", "", "regress", body)
    else:
        with pytest.raises(DecodeError):
            codec.decode_request("m", "", "", "regress", body)


# ----------------------------------------------------------------------------------------------
# round trips

_NAMES = names(8).filter(lambda n: n != "b64")  # a lone "b64" key reads as base64 in TF Serving too


@st.composite
def tf_shapes(draw: st.DrawFn, batch: int | None) -> tuple[int, ...]:
    """Shapes JSON nesting can express: a zero dimension only last (it hides those after it)."""
    inner = draw(st.lists(st.integers(1, 3), max_size=3))
    dims = ([batch] if batch is not None else []) + inner
    if dims and (batch is None or len(dims) > 1) and draw(st.integers(0, 4)) == 0:
        dims[-1] = 0
    return tuple(dims)


@st.composite
def tf_tensors(draw: st.DrawFn, name: str, batch: int | None, request: bool = False) -> Tensor:
    """Tensors of the types TF Serving JSON decodes to: INT64, FP64 (NaN/Inf too), BOOL, BYTES. A request's
    floats are ones TF Serving reads exactly; an answer's any double."""
    shape = draw(tf_shapes(batch))
    count = element_count(shape)
    datatype = "FP64" if count == 0 else draw(st.sampled_from(["INT64", "FP64", "BOOL", "BYTES"]))
    if datatype == "FP64":
        floats = short_decimals() if request else st.floats(width=64)
        values = draw(hnp.arrays(np.dtype("<f8"), count, elements=floats))
        values[np.isnan(values)] = np.nan  # JSON has one NaN
        data = values.tobytes()
    else:
        data = draw(tensor_data(datatype, shape))
    return Tensor(name, datatype, shape, data)


@st.composite
def tf_tensor_sets(draw: st.DrawFn, row: bool, request: bool = False) -> tuple[Tensor, ...]:
    count = draw(st.integers(1 if row else 0, 3))
    tensor_names = draw(st.lists(_NAMES, min_size=count, max_size=count, unique=True))
    if count == 1 and draw(st.booleans()):
        tensor_names = [""]
    batch = draw(st.integers(1, 3)) if row else None
    return tuple(draw(tf_tensors(n, batch, request)) for n in tensor_names)


@st.composite
def tf_predict_requests(draw: st.DrawFn) -> InferenceRequest:
    row = draw(st.booleans())
    params: dict[str, Any] = {}
    if draw(st.booleans()):
        params["signature_name"] = draw(names(8))
    version = draw(st.sampled_from(["", "3"]))
    if not version and draw(st.booleans()):
        params["label"] = draw(names(6).filter(bool))
    return InferenceRequest(
        Protocol.TFSERVING_REST,
        draw(names(8)),
        version,
        "predict",
        inputs=draw(tf_tensor_sets(row, request=True)),
        parameters=freeze_params(params),
        options=freeze_params({"format": "row" if row else "columnar"}),
    )


def _decode_tf(req: InferenceRequest, body: bytes) -> InferenceRequest:
    label = _params(req).get("label", "")
    return codec.decode_request(req.model, req.version, label, req.method, body)


@SLOW_OK
@given(tf_predict_requests())
def test_predict_request_round_trip(req: InferenceRequest) -> None:
    body = codec.encode_request(req)
    got = _decode_tf(req, body)
    assert got == req


@SLOW_OK
@given(st.booleans(), st.data())
def test_predict_response_round_trip(row: bool, data: st.DataObject) -> None:
    resp = InferenceResponse(Protocol.TFSERVING_REST, "", outputs=data.draw(tf_tensor_sets(row)))
    body = codec.encode_response(resp, "predict", row)
    assert codec.decode_response("predict", body, row) == resp


@st.composite
def classify_responses(draw: st.DrawFn) -> InferenceResponse:
    n, k = draw(st.integers(1, 4)), draw(st.integers(0, 3))
    labels = draw(st.lists(st.binary(max_size=6) | names(6).map(str.encode), min_size=n * k, max_size=n * k))
    scores = draw(hnp.arrays(np.dtype("<f8"), n * k, elements=st.floats(width=64)))
    scores[np.isnan(scores)] = np.nan
    return InferenceResponse(
        Protocol.TFSERVING_REST,
        "",
        outputs=(
            Tensor("classes", "BYTES", (n, k), pack_bytes_elements(labels)),
            Tensor("scores", "FP64", (n, k), scores.tobytes()),
        ),
    )


@SLOW_OK
@given(classify_responses())
def test_classify_response_round_trip(resp: InferenceResponse) -> None:
    assert codec.decode_response("classify", codec.encode_response(resp, "classify", True), True) == resp


@SLOW_OK
@given(hnp.arrays(np.dtype("<f8"), st.integers(0, 6), elements=st.floats(width=64)))
def test_regress_response_round_trip(values: np.ndarray[Any, Any]) -> None:
    values[np.isnan(values)] = np.nan
    resp = InferenceResponse(
        Protocol.TFSERVING_REST, "", outputs=(Tensor("outputs", "FP64", (len(values),), values.tobytes()),)
    )
    assert codec.decode_response("regress", codec.encode_response(resp, "regress", False), False) == resp


def _feature_values() -> st.SearchStrategy[Any]:
    int64 = st.integers(-(2**63), 2**63 - 1) | st.booleans()
    # Float features are FP32 to TF Serving: any float value but FLT_MAX, which its parser may push past range.
    floats = st.floats(width=32).filter(lambda v: abs(v) != _FLT_MAX)
    text = names(6)
    b64 = st.binary(max_size=6).map(lambda b: {"b64": base64.b64encode(b).decode()})
    return st.one_of(
        *(s | st.lists(s, max_size=3) for s in (int64, floats, text | b64)),
    )


@st.composite
def classify_bodies(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["signature_name"] = draw(names(8))
    context_keys: set[str] = set()
    if draw(st.booleans()):
        doc["context"] = draw(st.dictionaries(names(5), _feature_values(), max_size=3))
        context_keys = set(doc["context"])
    feature_names = names(5).filter(lambda k: k not in context_keys)
    doc["examples"] = draw(
        st.lists(st.dictionaries(feature_names, _feature_values(), max_size=3), min_size=1, max_size=4)
    )
    return doc


@SLOW_OK
@given(classify_bodies(), st.sampled_from(["classify", "regress"]), st.sampled_from(["", "stable"]))
def test_classify_regress_request_round_trip(doc: dict[str, Any], method: str, label: str) -> None:
    # json.dumps: the TF dialect, NaN/Infinity tokens included.
    body = json.dumps(doc, allow_nan=True).encode()
    req = codec.decode_request("m", "", label, method, body)
    assert req.method == method
    assert codec.decode_request("m", "", label, method, codec.encode_request(req)) == req
    params = _params(req)
    assert params.get("signature_name") == doc.get("signature_name")
    assert ("context" in params) == ("context" in doc)
    (examples,) = req.inputs
    assert examples.shape == (len(doc["examples"]),)
    parsed = [json.loads(e) for e in unpack_bytes_elements(examples.data)]
    assert json.dumps(parsed, sort_keys=True) == json.dumps(doc["examples"], sort_keys=True)


def test_example_key_order_does_not_change_identity() -> None:
    a = codec.decode_request("m", "", "", "classify", b'{"examples": [{"a": 1, "b": "x"}]}')
    b = codec.decode_request("m", "", "", "classify", b'{"examples": [{"b": "x", "a": 1}]}')
    assert a == b


# ----------------------------------------------------------------------------------------------
# fuzz: only DecodeError, whatever arrives


def _only_decode_errors(body: bytes) -> None:
    for method in codec.METHODS:
        with contextlib.suppress(DecodeError):
            codec.decode_request("m", "", "", method, body)
        for row_format in (True, False):
            with contextlib.suppress(DecodeError):
                codec.decode_response(method, body, row_format)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(body: bytes) -> None:
    _only_decode_errors(body)


@settings(max_examples=300, deadline=None)
@given(json_values())
def test_fuzz_random_json(doc: Any) -> None:
    _only_decode_errors(orjson.dumps(doc))


_TOP_KEYS = [
    "instances",
    "inputs",
    "predictions",
    "outputs",
    "results",
    "examples",
    "context",
    "signature_name",
]


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(_TOP_KEYS), json_values(16), max_size=3), st.booleans())
def test_fuzz_plausible_documents(doc: dict[str, Any], nan_dialect: bool) -> None:
    """Documents with the right keys and arbitrary values reach deep into every decoder."""
    body = json.dumps(doc).encode()
    if nan_dialect:
        body = body.replace(b"null", b"NaN", 1)
    _only_decode_errors(body)


@st.composite
def _valid_bodies(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return codec.encode_request(draw(tf_predict_requests()))
    if choice == 1:
        return json.dumps(draw(classify_bodies()), allow_nan=True).encode()
    if choice == 2:
        row = draw(st.booleans())
        resp = InferenceResponse(Protocol.TFSERVING_REST, "", outputs=draw(tf_tensor_sets(row)))
        return codec.encode_response(resp, "predict", row)
    return codec.encode_response(draw(classify_responses()), "classify", True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_bodies().flatmap(lambda body: mutated(json.loads(body))))
def test_fuzz_mutated_valid_documents(doc: Any) -> None:
    _only_decode_errors(json.dumps(doc, allow_nan=True).encode())


def test_status_not_ready_shows_available_versions_as_loading() -> None:
    # TF Serving's documented status answer (g3doc/api_rest.md), during a version roll-over.
    body = orjson.dumps({"model_version_status": [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
        {"version": "1", "state": "END", "status": {"error_code": "OK", "error_message": ""}},
    ]})
    doc = orjson.loads(codec.status_not_ready(body))
    assert [v["state"] for v in doc["model_version_status"]] == ["LOADING", "END"]
    assert doc["model_version_status"][0]["status"] == {"error_code": "OK", "error_message": ""}
    assert orjson.loads(codec.status_not_ready(b'{"name": "m", "ready": true}')) == {"name": "m", "ready": False}
    assert codec.status_not_ready(b"not json") == b"not json"
    assert codec.status_not_ready(b"[1]") == b"[1]"
    for other in ({"error": "Servable not found"}, {"model_version_status": 3}):
        assert orjson.loads(codec.status_not_ready(orjson.dumps(other))) == other

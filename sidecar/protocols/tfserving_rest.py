"""TF Serving REST codec: ``POST /v1/models/{m}[/versions/{v} | /labels/{l}]:predict|classify|regress``.

Pure functions between wire bytes and the canonical types of :mod:`request`. Wire facts come from
TF Serving's ``g3doc/api_rest.md`` and ``util/json_tensor.cc``.

Canonical form
--------------
- predict: one tensor per named input. Row format (``instances``) gives each tensor a leading batch
  dimension; bare values (not objects of named inputs) form one tensor named ``""``, as do bare
  columnar ``inputs``. Responses decode the same way from ``predictions`` / ``outputs``.
- JSON has no tensor types, so they are inferred per tensor: integers -> INT64 (UINT64 when a value
  lies beyond INT64 and none is negative), floats, or floats mixed with integers -> FP64,
  booleans -> BOOL, strings and ``{"b64": ...}`` -> BYTES; a tensor with no elements -> FP64.
  Encoding accepts every datatype (FP16/BF16/FP32 are written as the exact doubles they widen to).
- classify / regress requests: one BYTES tensor ``"examples"`` of shape [n]; element i is the
  canonical JSON text of example i (orjson with sorted keys; the standard library with sorted keys
  when it holds NaN/Infinity, which orjson cannot write).
- classify responses: ``"classes"`` BYTES [n, k] and ``"scores"`` FP64 [n, k] (the output names of
  TF's classification signature); regress responses: ``"outputs"`` FP64 [n]. Ragged class lists
  are refused.
- ``parameters`` keys: ``signature_name`` (when sent), ``label`` (from the path, when present),
  ``context`` (classify/regress: canonical JSON text of the context object); ``options``: ``format``
  ("row" | "columnar", predict only: a wire form). Response ``model`` and ``version`` are "": the
  body carries neither.

TF Serving's JSON dialect allows the tokens NaN, Infinity and -Infinity; they are read and written.

Limits inherited from JSON: a zero dimension hides those after it (``[[], []]`` is shape [2, 0]),
and a lone input or output named ``"b64"`` holding a string reads back as base64 (TF Serving has the
same ambiguity).

What is not modelled
--------------------
A request is modelled only when TF Serving reads it exactly as this codec does. TF Serving parses with
RapidJSON 1.1.0, ``kParseNanAndInfFlag`` only (``util/json_tensor.cc``), and casts each value to its
signature's dtype, which the body does not name; anything else raises :class:`DecodeError`, and the
front forwards the call untouched:

- **A key given twice**, in any object (top level, a row, the columnar inputs, a ``{"b64": ...}``, an
  example, the context): RapidJSON keeps every member and its ``FindMember`` finds the first; a row is
  walked member by member (the input's values go in twice); a b64 object must have exactly one member;
  orjson keeps the last. Counted in the one pass (``ambiguity.check_unique_keys``); an object the codec
  does not walk (inside a top-level key TF Serving ignores) counts as a repeat, so such a body is not
  modelled either.
- **A number the server may read as another double.** Without ``kParseFullPrecisionFlag`` RapidJSON is
  exact only when the significand fits its uint64 accumulator and a double (at most 17 digits, a 17th
  only while the first 16 stay below 2^53) and the power of ten is one of 10^0..10^22. Otherwise it can
  be a unit or more in the last place off, as a function of the spelling (``0.29999999999999997`` is 0.3
  to orjson, 0.29999999999999993 to TF Serving), so no rule on values can tell, and a DT_DOUBLE signature
  reads that double as it is. A predict body is modelled only when every number in it is spelt so that
  the server's double is the correctly rounded one, and so is the text the sidecar writes for it (a
  batch); integers within 64 bits always are. The test needs no arithmetic of RapidJSON's to be
  replayed (a compiler may fuse its ``d * 10 + digit`` steps), so it passes some numbers the server reads
  exactly all the same: short decimals always (after a few searches of the text), but the ``repr`` of a
  widened float32 or of a double (what ``tolist()`` clients send) only 7 times in 10, so a body of more
  than a few such numbers is seldom modelled.
- **An integer of 2^24 or more among floats**: the FP64 canonical tensor makes ``16777217`` and
  ``16777217.0`` one value; a DT_FLOAT signature refuses the first (``IsLosslessDecimal``) and rounds the
  second.
- **Float features** (classify/regress) are always FP32 to the server (``GetFloat()`` of the inexact
  double), so there the value decides: not modelled when it lies so near an FP32 rounding boundary or
  FLT_MAX that a few units in the last place could change it, nor a zero spelt with an exponent past
  300 (``0e999``: RapidJSON refuses it, orjson reads 0).
- **NUL in an input or feature name**: TF Serving takes row keys and feature names as C strings
  (``kv.name.GetString()`` into a ``std::string``), so ``"x\\u0000y"`` is ``x`` to it.
- **Base64 TF Serving's absl decoder refuses or reads otherwise**: padding must be absent or exactly due
  (``"YQ="`` is an error to it); whitespace and ``.`` padding, which it accepts, are not modelled.
- Dialect differences: ``Inf``, ``-NaN``, a byte-order mark and invalid UTF-8 are accepted by RapidJSON
  and refused here.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson

from ..errors import DecodeError
from . import ambiguity
from .request import (
    DATATYPE_SIZES,
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

# TF Serving's own route regex (http_rest_api_handler.cc): case-insensitive, versions are digits.
INFER_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)", re.IGNORECASE
)
METHODS = ("predict", "classify", "regress")

FORMAT_PARAM = "format"
ROW = "row"
COLUMNAR = "columnar"
SIGNATURE_PARAM = "signature_name"
LABEL_PARAM = "label"
CONTEXT_PARAM = "context"

EXAMPLES = "examples"
CLASSES = "classes"
SCORES = "scores"
REGRESSION_OUTPUTS = "outputs"

_B64 = "b64"
_BYTES_SUFFIX = "_bytes"
_FLT_MAX = float(np.finfo(np.float32).max)
# Above this a double a few units in the last place off may pass FLT_MAX (2^12 units: ambiguity's window).
_FLT_MAX_NEAR = _FLT_MAX - 2.0 ** (127 - 52 + 12)
_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
_FP32_INTEGERS = 2**24  # IsLosslessDecimal<float>: an integer token must be below this

# Index path inside a JSON value -> the field name a DecodeError reports.
_Where = Callable[[tuple[int, ...]], str]


def match_infer_path(path: str) -> tuple[str, str, str, str] | None:
    """(model, version, label, method) for a TF Serving inference path, else None."""
    m = INFER_PATH.fullmatch(path)
    if m is None:
        return None
    return m.group(1), m.group(2) or "", m.group(3) or "", m.group(4).lower()


def infer_path(req: InferenceRequest) -> str:
    """The path :func:`match_infer_path` parses back into the request's model, version, label, method."""
    label = thaw_params(req.parameters).get(LABEL_PARAM, "")
    if req.version:
        return f"/v1/models/{req.model}/versions/{req.version}:{req.method}"
    if label:
        return f"/v1/models/{req.model}/labels/{label}:{req.method}"
    return f"/v1/models/{req.model}:{req.method}"


def row_format(req: InferenceRequest) -> bool:
    """Whether a predict request came in row format, so its response must too."""
    return thaw_params(req.options).get(FORMAT_PARAM) == ROW


def status_not_ready(body: bytes) -> bytes:
    """A model status document (``GET /v1/models/{m}``) saying not ready: AVAILABLE versions shown as
    LOADING; KServe v1's ``"ready": true`` as false. Anything else comes back unchanged."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(doc, dict):
        return body
    versions = doc.get("model_version_status")
    for version in versions if isinstance(versions, list) else []:
        if isinstance(version, dict) and version.get("state") == "AVAILABLE":
            version["state"] = "LOADING"
    if doc.get("ready") is True:
        doc["ready"] = False
    return orjson.dumps(doc)


def error_body(message: str) -> bytes:
    """TF Serving's error shape: ``{"error": "..."}``."""
    return orjson.dumps({"error": message})


# ----------------------------------------------------------------------------------------------
# JSON text


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        first = exc
    # TF Serving's parser takes NaN/Infinity/-Infinity and orjson does not: retry with the standard
    # library, made to read integers exactly as orjson does (beyond 64 bits -> float).
    try:
        value = json.loads(bytes(body).decode("utf-8"), parse_int=_parse_int)
        _check_text(value)
    except (ValueError, RecursionError):
        raise DecodeError(f"body: not valid JSON ({first})") from None
    return value


def _parse_int(text: str) -> int | float:
    value = int(text)
    return value if _INT64_MIN <= value < 2**64 else float(text)


def _check_text(value: Any) -> None:
    """The standard library lets escaped lone surrogates through; they are not UTF-8 text."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            v.encode()  # UnicodeEncodeError is a ValueError
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())


def _dumps(value: Any, nonfinite: bool) -> bytes:
    if not nonfinite:
        return orjson.dumps(value)
    # orjson writes NaN as null; the standard library writes TF Serving's own tokens.
    return json.dumps(value, allow_nan=True, ensure_ascii=False, separators=(",", ":")).encode()


def canonical_json(value: Any, nonfinite: bool) -> bytes:
    """The one text of a JSON value (sorted keys) that identity and replay rely on."""
    if not nonfinite:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    text = json.dumps(value, allow_nan=True, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return text.encode()


def _load_object(body: bytes) -> dict[str, Any]:
    doc = _loads(body)
    if not isinstance(doc, dict):
        raise DecodeError("body: expected a JSON object")
    return doc


# ----------------------------------------------------------------------------------------------
# what TF Serving reads differently


class _Reading:
    """What one request decode learns on the way: the members of every object it accepted (for
    ambiguity.check_unique_keys), whether a tensor holds a number with a fraction or exponent (whose spelling
    then decides what TF Serving reads), and the values of float features (FP32 to the server)."""

    __slots__ = ("float_features", "floats", "keys")

    def __init__(self, keys: int) -> None:
        self.keys = keys
        self.floats = False
        self.float_features: list[float] = []


def _check_spellings(body: bytes) -> None:
    """DecodeError unless TF Serving's parser reads every number of ``body`` as the correctly rounded double (so
    the canonical FP64 value is what the server reads, whatever dtype its signature casts to).

    A number RapidJSON may read inexactly has 16 or more digits, or an exponent: as the text's shape (digits
    and points as ``0``, exponent letters as ``e``) that is a run of 16 ``0`` or a ``0e``. Text without either
    (short decimals: what people write, what rounded data holds) is settled by C-speed searches; the rest is
    tokenised, strings skipped, and the first number the server may read otherwise stops the scan."""
    shape = body.translate(_SHAPES)
    if b"0" * 16 not in shape and not _has_exponent(shape):
        return
    for match in _TOKEN.finditer(body):
        number = match.group(1)
        if number is not None and not _read_exactly(number):
            raise DecodeError(f"body: the number {number[:40].decode()} is one TF Serving's JSON parser (RapidJSON "
                              "without full precision) may read as another double; not modelled")


def _has_exponent(shape: bytes) -> bool:
    # Digits are dense in a tensor's text and an "e" rare (a few keys): looking at what precedes each "e" is far
    # cheaper than searching for "0e" among the digits.
    if shape.count(b"e") > 64:
        return b"0e" in shape
    at = shape.find(b"e", 1)
    while at > 0:
        if shape[at - 1] == 0x30:
            return True
        at = shape.find(b"e", at + 1)
    return False


def _exact(number: bytes) -> bool:
    """Whether RapidJSON 1.1.0's ParseNumber, without kParseFullPrecisionFlag, reads ``number`` (a JSON number
    token) as the correctly rounded double: its significand digits all fit the uint64 accumulator and the
    double exactly, and the power of ten is one of the exact ones (10^0..10^22), so one IEEE division or
    multiplication makes the result. Integer tokens are exact within 64 bits (beyond, RapidJSON sums digits
    in doubles)."""
    match = _NUMBER.fullmatch(number)
    if match is None:
        return False
    whole, fraction, exponent = match.groups()
    if fraction is None and exponent is None:
        return len(number) <= 20 and _INT64_MIN <= int(number) <= _UINT64_MAX
    if exponent is not None and len(exponent) > 4:
        return False
    digits = (whole + (fraction or b"")).lstrip(b"0")
    power = int(exponent or 0) - len(fraction or b"")
    if not -22 <= power <= 22 or len(digits) > 17:
        return False
    if len(digits) == 17 and int(digits[:16]) > _FAST_SIGNIFICAND:
        return False  # the 17th digit goes through a double multiplication, not the uint64
    significand = int(digits or b"0")
    return float(significand) == significand  # the uint64 -> double conversion is exact


def _read_exactly(number: bytes) -> bool:
    """:func:`_exact` for the token and for the text orjson writes for its value, which is what TF Serving
    reads when the sidecar sends the call itself (a batch); integer tokens are written back as they came."""
    if not _exact(number):
        return False
    if number.isdigit() or (number[:1] == b"-" and number[1:].isdigit()):
        return True
    return _exact(orjson.dumps(float(number)))


_FAST_SIGNIFICAND = 2**53 - 1  # RapidJSON keeps taking digits into its uint64 while it holds no more than this
_SHAPES = bytes(ord("0") if c in b"0123456789." else ord("e") if c in b"eE" else ord(" ") for c in range(256))
# A JSON string token (skipped), or a number token (group 1). Exact on text that parsed.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|(-?[0-9][0-9.eE+-]*)', re.DOTALL)
_NUMBER = re.compile(rb"-?([0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?")


# ----------------------------------------------------------------------------------------------
# decoding


def decode_request(model: str, version: str, label: str, method: str, body: bytes) -> InferenceRequest:
    """Model, version, label and method come from :func:`match_infer_path`.

    Raises :class:`DecodeError` naming the offending field for any malformed input, and for any input TF
    Serving reads differently from the sidecar (see "What is not modelled" above).
    """
    _check_method(method)
    body = bytes(body)  # the text checks below need bytes (translate); a bytes body is not copied
    doc = _load_object(body)
    reading = _Reading(len(doc))
    params: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if SIGNATURE_PARAM in doc:
        if not isinstance(doc[SIGNATURE_PARAM], str):
            raise DecodeError(f"{SIGNATURE_PARAM}: expected a string")
        params[SIGNATURE_PARAM] = doc[SIGNATURE_PARAM]
    if label:
        params[LABEL_PARAM] = label
    if method == "predict":
        inputs, options[FORMAT_PARAM] = _decode_predict_inputs(doc, reading)
    else:
        inputs = (_decode_examples(doc, params, reading),)
    # Every object of a modelled request was counted on the way; a key given twice in any of them leaves the
    # text with more members than the parser kept (TF Serving reads the first, orjson the last).
    ambiguity.check_unique_keys(body, len(body), reading.keys)
    if reading.floats:
        _check_spellings(body)
    if reading.float_features:
        _check_float_features(reading.float_features)
        if ambiguity.has_float_zero(reading.float_features):
            ambiguity.check_exponents(body, len(body), EXAMPLES)
    return InferenceRequest(
        protocol=Protocol.TFSERVING_REST,
        model=model,
        version=version,
        method=method,
        inputs=inputs,
        parameters=freeze_params(params),
        options=freeze_params(options),
    )


def decode_response(method: str, body: bytes, row_format: bool) -> InferenceResponse:
    """``row_format``: whether the request was in row format, so the body holds ``predictions``.

    Raises :class:`DecodeError` for malformed input and for ``{"error": ...}`` bodies.
    """
    _check_method(method)
    doc = _load_object(body)
    key = ("predictions" if row_format else "outputs") if method == "predict" else _results_key(doc)
    if key not in doc:
        if "error" in doc:
            raise DecodeError(f"error: the server answered with an error: {doc['error']!r}")
        raise DecodeError(f"{key}: missing")
    outputs: tuple[Tensor, ...]
    if method == "predict":
        outputs = _decode_rows(doc[key], key) if row_format else _decode_columns(doc[key], key)
    elif method == "classify":
        outputs = _decode_classifications(doc[key], key)
    else:
        outputs = (_to_tensor(REGRESSION_OUTPUTS, _numbers(doc[key], key), lambda _: key),)
    return InferenceResponse(protocol=Protocol.TFSERVING_REST, model="", outputs=outputs)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise DecodeError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")


def _results_key(doc: dict[str, Any]) -> str:
    # The server writes "results"; the doc's format section says "result". Read both.
    return "result" if "result" in doc and "results" not in doc else "results"


def _decode_predict_inputs(doc: dict[str, Any], reading: _Reading) -> tuple[tuple[Tensor, ...], str]:
    if "instances" in doc and "inputs" in doc:
        raise DecodeError("body: expected only one of 'instances' or 'inputs'")
    if "instances" in doc:
        return _decode_rows(doc["instances"], "instances", reading), ROW
    if "inputs" in doc:
        return _decode_columns(doc["inputs"], "inputs", reading), COLUMNAR
    raise DecodeError("body: missing 'instances' or 'inputs'")


def _decode_rows(rows: Any, field: str, reading: _Reading | None = None) -> tuple[Tensor, ...]:
    """``reading`` is None for an answer of the server's, which is read as it is written."""
    if not isinstance(rows, list) or not rows:
        raise DecodeError(f"{field}: expected a non-empty list")
    if not _is_named(rows[0]):
        for i, row in enumerate(rows):
            if _is_named(row):
                raise DecodeError(f"{field}[{i}]: an object of named inputs among bare values")
        return (_to_tensor("", rows, lambda idx: field + _brackets(idx), reading),)
    names = list(rows[0])
    if not names:
        raise DecodeError(f"{field}[0]: expected at least one named input")
    for i, row in enumerate(rows):
        if not _is_named(row):
            raise DecodeError(f"{field}[{i}]: expected an object of named inputs like {field}[0]")
        if row.keys() != rows[0].keys():
            raise DecodeError(f"{field}[{i}]: has keys {sorted(row)}, but {field}[0] has {sorted(names)}")
    if reading is not None:
        reading.keys += len(names) * len(rows)
        for name in names:
            if "\0" in name:  # TF Serving takes a row's keys as C strings (``kv.name.GetString()``)
                ambiguity.check_text(name, f"{field}[0].{name}")
    return tuple(_to_tensor(name, [row[name] for row in rows], _row_where(field, name), reading) for name in names)


def _row_where(field: str, name: str) -> _Where:
    return lambda idx: f"{field}[{idx[0]}].{name}{_brackets(idx[1:])}" if idx else f"{field}[*].{name}"


def _decode_columns(value: Any, field: str, reading: _Reading | None = None) -> tuple[Tensor, ...]:
    if not _is_named(value):
        return (_to_tensor("", value, lambda idx: field + _brackets(idx), reading),)
    if reading is not None:
        reading.keys += len(value)
        for name in value:
            if "\0" in name:  # not the input TF Serving looks up by its C string (``name.c_str()``)
                ambiguity.check_text(name, f"{field}.{name}")
    return tuple(_to_tensor(name, v, _column_where(field, name), reading) for name, v in value.items())


def _column_where(field: str, name: str) -> _Where:
    return lambda idx: f"{field}.{name}{_brackets(idx)}"


def _brackets(idx: Sequence[int]) -> str:
    return "".join(f"[{i}]" for i in idx)


def _is_b64(value: Any) -> bool:
    # TF Serving's IsValBase64Object: an object whose only key is "b64", holding a string.
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(_B64), str)


def _is_named(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _to_tensor(name: str, value: Any, where: _Where, reading: _Reading | None = None) -> Tensor:
    shape, leaves = _dense(value, where)
    datatype, data = _pack(leaves, shape, where, reading)
    return Tensor(name=name, datatype=datatype, shape=shape, data=data)


def _dense(value: Any, where: _Where) -> tuple[tuple[int, ...], list[Any]]:
    """Shape and row-major leaves of a nested list; the first element at each level sets the shape."""
    shape: list[int] = []
    level = [value]
    while level and type(level[0]) is list:
        n = len(level[0])
        nxt: list[Any] = []
        for p, node in enumerate(level):
            if type(node) is not list:
                raise DecodeError(f"{where(_unravel(p, shape))}: expected a list like its siblings")
            if len(node) != n:
                raise DecodeError(f"{where(_unravel(p, shape))}: has {len(node)} elements, its siblings {n}")
            nxt.extend(node)
        shape.append(n)
        level = nxt
    if list in set(map(type, level)):
        p = next(p for p, leaf in enumerate(level) if type(leaf) is list)
        raise DecodeError(f"{where(_unravel(p, shape))}: expected a value like its siblings, got a list")
    return tuple(shape), level


def _unravel(p: int, dims: Sequence[int]) -> tuple[int, ...]:
    idx: list[int] = []
    for d in reversed(dims):
        p, r = divmod(p, d)
        idx.append(r)
    return tuple(reversed(idx))


_FAMILY = {bool: "boolean", int: "number", float: "number", str: "string", dict: "string"}


def _pack(leaves: list[Any], shape: Sequence[int], where: _Where, reading: _Reading | None) -> tuple[str, bytes]:
    kinds = set(map(type, leaves))
    if not kinds:
        return "FP64", b""
    if kinds == {bool}:
        return "BOOL", bytes(leaves)
    if kinds == {int}:
        return _pack_ints(leaves, where(()))
    if kinds <= {int, float}:
        if reading is not None:
            reading.floats = True
            if int in kinds:
                _check_mixed_ints(leaves, shape, where)
        return "FP64", np.array(leaves, dtype="<f8").tobytes()
    if kinds == {str}:
        return "BYTES", pack_bytes_elements([x.encode() for x in leaves])
    if kinds <= {str, dict}:
        if reading is not None:
            reading.keys += sum(type(x) is dict for x in leaves)  # a b64 object has its one key
        return "BYTES", pack_bytes_elements(
            [_leaf_bytes(x, _leaf_where(where, p, shape)) for p, x in enumerate(leaves)]
        )
    for p, x in enumerate(leaves):
        if type(x) not in _FAMILY or (type(x) is dict and not _is_b64(x)):
            raise DecodeError(
                f"{where(_unravel(p, shape))}: expected a number, string, boolean or "
                f'{{"b64": ...}}, got {_json_type(x)}'
            )
    first = _FAMILY[type(leaves[0])]
    p = next(p for p, x in enumerate(leaves) if _FAMILY[type(x)] != first)
    raise DecodeError(f"{where(_unravel(p, shape))}: a {_FAMILY[type(leaves[p])]} among {first} values")


def _leaf_where(where: _Where, p: int, shape: Sequence[int]) -> Callable[[], str]:
    return lambda: where(_unravel(p, shape))


def _check_mixed_ints(leaves: list[Any], shape: Sequence[int], where: _Where) -> None:
    """Integers among floats join the FP64 canonical tensor, where ``16777217`` and ``16777217.0`` are one value.
    TF Serving tells them apart: a float signature takes an integer token only below 2^24 (a double one below
    2^53) and refuses a larger one, while it rounds the float token. Below 2^24 both spellings read alike."""
    for p, x in enumerate(leaves):
        if type(x) is int and not -_FP32_INTEGERS < x < _FP32_INTEGERS:
            raise DecodeError(f"{where(_unravel(p, shape))}: an integer past 2^24 among floats, which TF Serving "
                              "reads differently from the same value written as a float; not modelled")


def _pack_ints(leaves: list[int], field: str) -> tuple[str, bytes]:
    try:
        return "INT64", np.array(leaves, dtype="<i8").tobytes()
    except OverflowError:
        pass
    try:
        return "UINT64", np.array(leaves, dtype="<u8").tobytes()
    except OverflowError:
        raise DecodeError(f"{field}: integers span more than INT64 or UINT64 can hold") from None


def _leaf_bytes(value: Any, where: Callable[[], str]) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if not _is_b64(value):
        raise DecodeError(f'{where()}: expected a string or {{"b64": ...}}, got {_json_type(value)}')
    return _b64decode(value[_B64], where)


def _b64decode(text: str, where: Callable[[], str]) -> bytes:
    # absl::Base64Unescape, which TF Serving uses, takes no padding or exactly the padding due ("YQ=" is an
    # error to it); it also skips whitespace and takes "." for "=", which b64decode refuses: not modelled.
    padded = text if "=" in text else text + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError(f"{where()}.b64: not valid base64") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _numbers(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise DecodeError(f"{field}: expected a list of numbers")
    for i, x in enumerate(value):
        if type(x) is not int and type(x) is not float:
            raise DecodeError(f"{field}[{i}]: expected a number, got {_json_type(x)}")
    # Regression values are decimals even when written without a fraction.
    return [float(x) for x in value]


def _decode_classifications(results: Any, field: str) -> tuple[Tensor, Tensor]:
    if not isinstance(results, list):
        raise DecodeError(f"{field}: expected a list of class lists")
    labels: list[bytes] = []
    scores: list[Any] = []
    k = 0
    for i, per_example in enumerate(results):
        if not isinstance(per_example, list):
            raise DecodeError(f"{field}[{i}]: expected a list of [label, score] pairs")
        if i == 0:
            k = len(per_example)
        elif len(per_example) != k:
            raise DecodeError(f"{field}[{i}]: has {len(per_example)} classes, {field}[0] has {k}")
        for j, pair in enumerate(per_example):
            at = f"{field}[{i}][{j}]"
            if not isinstance(pair, list) or len(pair) != 2:
                raise DecodeError(f"{at}: expected a [label, score] pair")
            labels.append(_leaf_bytes(pair[0], _fixed(f"{at}[0]")))
            scores.extend(_numbers(pair[1:], at))
    shape = (len(results), k)
    return (
        Tensor(CLASSES, "BYTES", shape, pack_bytes_elements(labels)),
        Tensor(SCORES, "FP64", shape, np.array(scores, dtype="<f8").tobytes()),
    )


def _fixed(field: str) -> Callable[[], str]:
    return lambda: field


def _decode_examples(doc: dict[str, Any], params: dict[str, Any], reading: _Reading) -> Tensor:
    context_keys: set[str] = set()
    if CONTEXT_PARAM in doc:
        context = doc[CONTEXT_PARAM]
        nonfinite = _check_example(context, CONTEXT_PARAM, reading)
        params[CONTEXT_PARAM] = canonical_json(context, nonfinite).decode()
        context_keys = set(context)
    examples = doc.get(EXAMPLES)
    if not isinstance(examples, list) or not examples:
        raise DecodeError(f"{EXAMPLES}: expected a non-empty list of objects")
    elements = []
    for i, example in enumerate(examples):
        field = f"{EXAMPLES}[{i}]"
        nonfinite = _check_example(example, field, reading)
        clash = context_keys & example.keys()
        if clash:
            raise DecodeError(f"{field}.{min(clash)}: also in context; a feature may appear in only one")
        elements.append(canonical_json(example, nonfinite))
    return Tensor(EXAMPLES, "BYTES", (len(elements),), pack_bytes_elements(elements))


def _check_example(example: Any, field: str, reading: _Reading) -> bool:
    """Validates a tf.Example in JSON form as TF Serving does; True when it holds NaN or infinities."""
    if not isinstance(example, dict):
        raise DecodeError(f"{field}: expected an object of features")
    reading.keys += len(example)
    nonfinite = False
    floats = reading.float_features
    for name, value in example.items():
        if "\0" in name:  # feature names are C strings to TF Serving (``kv.name.GetString()``)
            ambiguity.check_text(name, f"{field}.{name}")
        is_list = isinstance(value, list)
        kind = ""
        for j, v in enumerate(value if is_list else [value]):
            at = f"{field}.{name}[{j}]" if is_list else f"{field}.{name}"
            this = _feature_kind(v, at)
            if kind and this != kind:
                raise DecodeError(f"{at}: a {this} value in a {kind} feature")
            kind = this
            if type(v) is float:
                floats.append(v)
                nonfinite = nonfinite or not math.isfinite(v)
            elif type(v) is dict:
                reading.keys += 1  # a b64 object has its one key
    return nonfinite


def _check_float_features(values: list[float]) -> None:
    """A float feature is always FP32 to TF Serving (``GetFloat()`` of its inexactly parsed double), whatever
    the spelling: modelled unless the value lies so near an FP32 rounding boundary, or FLT_MAX, that an error
    of a few units in the last place of the double could change the float or overflow the range check; or a
    zero that may be spelt ``0e999``, which RapidJSON refuses (checked on the text by the caller)."""
    if any(_FLT_MAX_NEAR < abs(v) <= _FLT_MAX for v in values):
        raise DecodeError(f"{EXAMPLES}: a float so near FLT_MAX that TF Serving's parser may find it out of range")
    ambiguity.check_fp32_small(values, struct.pack(f"<{len(values)}f", *values), EXAMPLES)


def _feature_kind(value: Any, field: str) -> str:
    """The tf.train.Feature list a JSON value lands in (json_tensor.cc AddValueToFeature)."""
    if type(value) is bool:
        return "int64"
    if type(value) is int:
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise DecodeError(f"{field}: integer beyond INT64")
        return "int64"
    if type(value) is float:
        if math.isfinite(value) and abs(value) > _FLT_MAX:
            raise DecodeError(f"{field}: beyond the float range")
        return "float"
    if isinstance(value, str):
        return "bytes"
    if _is_b64(value):
        _b64decode(value[_B64], lambda: field)
        return "bytes"
    raise DecodeError(
        f'{field}: expected a number, string, boolean or {{"b64": ...}}, got {_json_type(value)}'
    )


# ----------------------------------------------------------------------------------------------
# encoding


def encode_request(req: InferenceRequest) -> bytes:
    """The body for :func:`infer_path`; ValueError when the tensors cannot take the recorded format."""
    params = thaw_params(req.parameters)
    if req.method in ("classify", "regress"):
        return _encode_examples(req, params)
    body: dict[str, Any] = {}
    if SIGNATURE_PARAM in params:
        body[SIGNATURE_PARAM] = params[SIGNATURE_PARAM]
    if row_format(req):
        body["instances"], nonfinite = _rows(req.inputs)
    else:
        # Columnar can express every set of tensors, so it is the choice for requests with no format.
        body["inputs"], nonfinite = _columns(req.inputs)
    return _dumps(body, nonfinite)


def encode_response(resp: InferenceResponse, method: str, row_format: bool) -> bytes:
    """ValueError when the outputs cannot take that form (row format needs one batch size >= 1)."""
    if method == "predict":
        if row_format:
            predictions, nonfinite = _rows(resp.outputs)
            return _dumps({"predictions": predictions}, nonfinite)
        outputs, nonfinite = _columns(resp.outputs)
        return _dumps({"outputs": outputs}, nonfinite)
    if method == "classify":
        return _encode_classifications(resp.outputs)
    if method == "regress":
        values = _floats(_find(resp.outputs, REGRESSION_OUTPUTS)).ravel()
        return _dumps({"results": values.tolist()}, not np.isfinite(values).all())
    raise ValueError(f"unknown method {method!r}")


def _encode_examples(req: InferenceRequest, params: dict[str, Any]) -> bytes:
    # The canonical texts are spliced in as they are: re-parsing them could lose NaN tokens.
    parts = []
    if SIGNATURE_PARAM in params:
        parts.append(b'"signature_name":' + orjson.dumps(params[SIGNATURE_PARAM]))
    if CONTEXT_PARAM in params:
        parts.append(b'"context":' + str(params[CONTEXT_PARAM]).encode())
    examples = unpack_bytes_elements(_find(req.inputs, EXAMPLES).data)
    parts.append(b'"examples":[' + b",".join(examples) + b"]")
    return b"{" + b",".join(parts) + b"}"


def _encode_classifications(outputs: Sequence[Tensor]) -> bytes:
    classes, scores = _find(outputs, CLASSES), _find(outputs, SCORES)
    if len(classes.shape) != 2 or classes.shape != scores.shape:
        raise ValueError(f"classes {classes.shape} and scores {scores.shape} must share one [n, k] shape")
    labels = _bytes_values(unpack_bytes_elements(classes.data), as_b64=False)
    values = _floats(scores)
    n, k = classes.shape
    flat = values.ravel().tolist()
    results = [[[labels[i * k + j], flat[i * k + j]] for j in range(k)] for i in range(n)]
    return _dumps({"results": results}, not np.isfinite(values).all())


def _find(tensors: Sequence[Tensor], name: str) -> Tensor:
    for t in tensors:
        if t.name == name:
            return t
    raise ValueError(f"no tensor named {name!r}")


def _rows(tensors: Sequence[Tensor]) -> tuple[Any, bool]:
    _check_unique(tensors)
    if not tensors:
        raise ValueError("row format needs at least one tensor")
    batch = tensors[0].shape[0] if tensors[0].shape else 0
    for t in tensors:
        if not t.shape or t.shape[0] != batch or batch < 1:
            raise ValueError(
                f"row format needs one batch size >= 1 for every tensor; {t.name!r} has {t.shape}"
            )
    values = [_tensor_value(t) for t in tensors]
    nonfinite = any(flag for _, flag in values)
    if len(tensors) == 1 and tensors[0].name == "":
        return values[0][0], nonfinite
    rows = [{t.name: v[i] for t, (v, _) in zip(tensors, values, strict=True)} for i in range(batch)]
    return rows, nonfinite


def _columns(tensors: Sequence[Tensor]) -> tuple[Any, bool]:
    _check_unique(tensors)
    values = [_tensor_value(t) for t in tensors]
    nonfinite = any(flag for _, flag in values)
    if len(tensors) == 1 and tensors[0].name == "":
        return values[0][0], nonfinite
    return {t.name: v for t, (v, _) in zip(tensors, values, strict=True)}, nonfinite


def _check_unique(tensors: Sequence[Tensor]) -> None:
    if len({t.name for t in tensors}) != len(tensors):
        raise ValueError("tensor names must be unique in TF Serving JSON")


def _tensor_value(t: Tensor) -> tuple[Any, bool]:
    """The nested JSON value of a tensor, and whether it holds NaN or infinities."""
    if t.datatype == "BYTES":
        elements = unpack_bytes_elements(t.data)
        flat = _bytes_values(elements, as_b64=t.name.endswith(_BYTES_SUFFIX))
        holder = np.empty(len(flat), dtype=object)
        holder[:] = flat
        return holder.reshape(t.shape).tolist(), False
    arr = _numeric(t)
    nonfinite = arr.dtype.kind == "f" and not np.isfinite(arr).all()
    return arr.reshape(t.shape).tolist(), bool(nonfinite)


def _bytes_values(elements: list[bytes], as_b64: bool) -> list[Any]:
    """Plain strings where possible; ``{"b64": ...}`` for ``*_bytes`` tensors or non-UTF-8 data."""
    if not as_b64:
        try:
            return [e.decode() for e in elements]
        except UnicodeDecodeError:
            pass
    return [{_B64: base64.b64encode(e).decode()} for e in elements]


def _check_size(t: Tensor) -> None:
    size = DATATYPE_SIZES.get(t.datatype)
    if size is None or len(t.data) != element_count(t.shape) * size:
        raise ValueError(f"tensor {t.name!r}: {len(t.data)} bytes do not fit {t.datatype} {t.shape}")


def _numeric(t: Tensor) -> np.ndarray[Any, Any]:
    _check_size(t)
    if t.datatype == "BOOL":
        flags: np.ndarray[Any, Any] = np.frombuffer(t.data, dtype=np.uint8) != 0
        return flags
    if t.datatype in ("FP16", "BF16", "FP32"):
        return _floats(t)
    arr: np.ndarray[Any, Any] = np.frombuffer(t.data, dtype=np.dtype(_INT_DTYPES.get(t.datatype, "<f8")))
    return arr


_INT_DTYPES = {
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
}


def _floats(t: Tensor) -> np.ndarray[Any, Any]:
    """Any numeric tensor as FP64; narrower floats widen exactly."""
    _check_size(t)
    if t.datatype == "BF16":
        # BF16 is the top half of an FP32.
        wide = np.frombuffer(t.data, dtype="<u2").astype("<u4") << 16
        return wide.view("<f4").astype(np.float64)
    if t.datatype == "FP16":
        return np.frombuffer(t.data, dtype="<f2").astype(np.float64)
    if t.datatype == "FP32":
        return np.frombuffer(t.data, dtype="<f4").astype(np.float64)
    if t.datatype == "FP64":
        return np.frombuffer(t.data, dtype="<f8")
    return _numeric(t).astype(np.float64)

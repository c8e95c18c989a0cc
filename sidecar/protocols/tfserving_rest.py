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
- ``parameters`` keys: ``format`` ("row" | "columnar", predict only), ``signature_name`` (when
  sent), ``label`` (from the path, when present), ``context`` (classify/regress: canonical JSON
  text of the context object). Response ``model`` and ``version`` are "": the body carries neither.

TF Serving's JSON dialect allows the tokens NaN, Infinity and -Infinity; they are read and written.

Limits inherited from JSON: a zero dimension hides those after it (``[[], []]`` is shape [2, 0]),
and a lone input or output named ``"b64"`` holding a string reads back as base64 (TF Serving has the
same ambiguity).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson

from ..errors import DecodeError
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
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

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
    return thaw_params(req.parameters).get(FORMAT_PARAM) == ROW


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
# decoding


def decode_request(model: str, version: str, label: str, method: str, body: bytes) -> InferenceRequest:
    """Model, version, label and method come from :func:`match_infer_path`.

    Raises :class:`DecodeError` naming the offending field for any malformed input.
    """
    _check_method(method)
    doc = _load_object(body)
    params: dict[str, Any] = {}
    if SIGNATURE_PARAM in doc:
        if not isinstance(doc[SIGNATURE_PARAM], str):
            raise DecodeError(f"{SIGNATURE_PARAM}: expected a string")
        params[SIGNATURE_PARAM] = doc[SIGNATURE_PARAM]
    if label:
        params[LABEL_PARAM] = label
    if method == "predict":
        inputs, params[FORMAT_PARAM] = _decode_predict_inputs(doc)
    else:
        inputs = (_decode_examples(doc, params),)
    return InferenceRequest(
        protocol=Protocol.TFSERVING_REST,
        model=model,
        version=version,
        method=method,
        inputs=inputs,
        parameters=freeze_params(params),
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


def _decode_predict_inputs(doc: dict[str, Any]) -> tuple[tuple[Tensor, ...], str]:
    if "instances" in doc and "inputs" in doc:
        raise DecodeError("body: expected only one of 'instances' or 'inputs'")
    if "instances" in doc:
        return _decode_rows(doc["instances"], "instances"), ROW
    if "inputs" in doc:
        return _decode_columns(doc["inputs"], "inputs"), COLUMNAR
    raise DecodeError("body: missing 'instances' or 'inputs'")


def _decode_rows(rows: Any, field: str) -> tuple[Tensor, ...]:
    if not isinstance(rows, list) or not rows:
        raise DecodeError(f"{field}: expected a non-empty list")
    if not _is_named(rows[0]):
        for i, row in enumerate(rows):
            if _is_named(row):
                raise DecodeError(f"{field}[{i}]: an object of named inputs among bare values")
        return (_to_tensor("", rows, lambda idx: field + _brackets(idx)),)
    names = list(rows[0])
    if not names:
        raise DecodeError(f"{field}[0]: expected at least one named input")
    for i, row in enumerate(rows):
        if not _is_named(row):
            raise DecodeError(f"{field}[{i}]: expected an object of named inputs like {field}[0]")
        if row.keys() != rows[0].keys():
            raise DecodeError(f"{field}[{i}]: has keys {sorted(row)}, but {field}[0] has {sorted(names)}")
    return tuple(_to_tensor(name, [row[name] for row in rows], _row_where(field, name)) for name in names)


def _row_where(field: str, name: str) -> _Where:
    return lambda idx: f"{field}[{idx[0]}].{name}{_brackets(idx[1:])}" if idx else f"{field}[*].{name}"


def _decode_columns(value: Any, field: str) -> tuple[Tensor, ...]:
    if not _is_named(value):
        return (_to_tensor("", value, lambda idx: field + _brackets(idx)),)
    return tuple(_to_tensor(name, v, _column_where(field, name)) for name, v in value.items())


def _column_where(field: str, name: str) -> _Where:
    return lambda idx: f"{field}.{name}{_brackets(idx)}"


def _brackets(idx: Sequence[int]) -> str:
    return "".join(f"[{i}]" for i in idx)


def _is_b64(value: Any) -> bool:
    # TF Serving's IsValBase64Object: an object whose only key is "b64", holding a string.
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(_B64), str)


def _is_named(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _to_tensor(name: str, value: Any, where: _Where) -> Tensor:
    shape, leaves = _dense(value, where)
    datatype, data = _pack(leaves, shape, where)
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


def _pack(leaves: list[Any], shape: Sequence[int], where: _Where) -> tuple[str, bytes]:
    kinds = set(map(type, leaves))
    if not kinds:
        return "FP64", b""
    if kinds == {bool}:
        return "BOOL", bytes(leaves)
    if kinds == {int}:
        return _pack_ints(leaves, where(()))
    if kinds <= {int, float}:
        return "FP64", np.array(leaves, dtype="<f8").tobytes()
    if kinds == {str}:
        return "BYTES", pack_bytes_elements([x.encode() for x in leaves])
    if kinds <= {str, dict}:
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
    # absl::Base64Unescape, which TF Serving uses, accepts unpadded input too.
    padded = text + "=" * (-len(text) % 4)
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


def _decode_examples(doc: dict[str, Any], params: dict[str, Any]) -> Tensor:
    context_keys: set[str] = set()
    if CONTEXT_PARAM in doc:
        context = doc[CONTEXT_PARAM]
        nonfinite = _check_example(context, CONTEXT_PARAM)
        params[CONTEXT_PARAM] = canonical_json(context, nonfinite).decode()
        context_keys = set(context)
    examples = doc.get(EXAMPLES)
    if not isinstance(examples, list) or not examples:
        raise DecodeError(f"{EXAMPLES}: expected a non-empty list of objects")
    elements = []
    for i, example in enumerate(examples):
        field = f"{EXAMPLES}[{i}]"
        nonfinite = _check_example(example, field)
        clash = context_keys & example.keys()
        if clash:
            raise DecodeError(f"{field}.{min(clash)}: also in context; a feature may appear in only one")
        elements.append(canonical_json(example, nonfinite))
    return Tensor(EXAMPLES, "BYTES", (len(elements),), pack_bytes_elements(elements))


def _check_example(example: Any, field: str) -> bool:
    """Validates a tf.Example in JSON form as TF Serving does; True when it holds NaN or infinities."""
    if not isinstance(example, dict):
        raise DecodeError(f"{field}: expected an object of features")
    nonfinite = False
    for name, value in example.items():
        is_list = isinstance(value, list)
        kind = ""
        for j, v in enumerate(value if is_list else [value]):
            at = f"{field}.{name}[{j}]" if is_list else f"{field}.{name}"
            this = _feature_kind(v, at)
            if kind and this != kind:
                raise DecodeError(f"{at}: a {this} value in a {kind} feature")
            kind = this
            nonfinite = nonfinite or (type(v) is float and not math.isfinite(v))
    return nonfinite


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
    if params.get(FORMAT_PARAM) == ROW:
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

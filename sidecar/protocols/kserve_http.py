"""Triton / KServe v2 HTTP codec: JSON bodies and Triton's binary tensor extension.

Pure functions between wire bytes and the canonical types of :mod:`request`.

Wire facts relied on (Triton ``docs/protocol/extension_binary_data.md`` and ``http_server.cc``):

- A body is a JSON header, optionally followed by raw tensors in the order of the inputs (or
  outputs) whose ``parameters.binary_data_size`` says they travel there. The
  ``Inference-Header-Content-Length`` HTTP header gives the JSON length.
- Triton refuses FP16 and BF16 in JSON, its JSON writer cannot emit NaN or Infinity, and JSON
  strings must be UTF-8. Tensors like these are therefore always encoded in the binary section,
  whatever the caller asked for: that is the only lossless form Triton reads. (Asked for an FP16
  output in JSON, Triton answers 400 "sending FP16 data via JSON is not supported"; an encoder
  cannot answer an error, so it writes binary.)
- FP32 values are written in JSON as the exact double they widen to (Triton does the same), so a
  JSON round trip is bit-exact. FP32 and FP64 values are written with Triton's own digits
  (RapidJSON's ``Writer::Double``, see :mod:`float_text`), not the shortest round-trip text, so a
  re-encoded answer is byte for byte what Triton sends.

Decoding is stricter than Triton in one way: Triton silently truncates out-of-range JSON integers
(300 for a UINT8), here that is a :class:`DecodeError` (the call is then forwarded unmodelled, and
Triton answers it as it always does). Input-level parameters other than
``binary_data_size``, shared-memory tensors and fields the codec does not know raise
:class:`DecodeError`: the front then forwards such a call untouched (the model server answers it)
instead of modelling it. ``safety.check`` is the one refusal of the sidecar's own, on the raw body.
"""

from __future__ import annotations

import collections
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from ..errors import DecodeError
from . import ambiguity, float_text
from .request import (
    DATATYPE_SIZES,
    InferenceRequest,
    InferenceResponse,
    Params,
    Protocol,
    RequestedOutput,
    Tensor,
    element_count,
    freeze_params,
    pack_bytes_elements,
    thaw_params,
    unpack_bytes_elements,
)

# Triton's own route regex (http_server.cc model_regex_): versions are digits only.
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([0-9]+))?/infer")

HEADER_LENGTH = "Inference-Header-Content-Length"

_NUMERIC_DTYPES: dict[str, np.dtype[Any]] = {
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# struct codes for the small-tensor fast path: for a few elements numpy's array set-up
# costs more than the conversion itself. struct rounds and range-checks as numpy does.
_STRUCT_CODES = {
    "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q",
    "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "FP32": "f", "FP64": "d",
}
_SMALL = 64
_BINARY_ONLY = frozenset({"FP16", "BF16"})
_MAX_DIM = 2**63  # Triton's shapes are int64


def match_infer_path(path: str) -> tuple[str, str] | None:
    """(model, version) for ``/v2/models/{m}[/versions/{v}]/infer``; version "" if absent."""
    m = INFER_PATH.fullmatch(path)
    if m is None:
        return None
    return m.group(1), m.group(2) or ""


def infer_path(model: str, version: str) -> str:
    """The path :func:`match_infer_path` parses back into (model, version)."""
    if version:
        return f"/v2/models/{model}/versions/{version}/infer"
    return f"/v2/models/{model}/infer"


def error_body(message: str) -> bytes:
    """Triton's error shape: ``{"error": "..."}``."""
    return orjson.dumps({"error": message})


# ----------------------------------------------------------------------------------------------
# decoding


def decode_request(model: str, version: str, body: bytes, header_length: int | None) -> InferenceRequest:
    """``header_length`` is the Inference-Header-Content-Length header (None: the body is all JSON).

    Raises :class:`DecodeError` naming the offending field for any malformed input, and for any input the
    model server reads differently from the sidecar (see :mod:`ambiguity`): such a call is never modelled.
    """
    doc, section = _split_body(body, header_length)
    unknown = doc.keys() - _REQUEST_KEYS
    if unknown:
        raise DecodeError(f"{sorted(unknown)[0]}: a field the sidecar does not model")
    inputs = _list_of_dicts(doc, "inputs", required=True)
    reading = _Reading(request=True)
    tensors = tuple(_decode_tensor(obj, f"inputs[{i}]", section, reading) for i, obj in enumerate(inputs))
    section.finish()
    outputs_json = _list_of_dicts(doc, "outputs", required=False)
    outputs = tuple(_decode_requested_output(obj, f"outputs[{i}]") for i, obj in enumerate(outputs_json))
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise DecodeError("parameters: expected an object")
    parameters, options = _request_params(params)
    request_id = _optional_str(doc, "id")
    ambiguity.check_text(request_id, "id")
    # Every object of a modelled request is one of these; a key given twice in any of them makes the count of
    # keys in the text larger than the count the parser kept (the server reads the first, the parser the last).
    keys = len(doc) + len(params) + sum(len(o) + len(o.get("parameters", ())) for o in (*inputs, *outputs_json))
    end = len(body) if header_length is None else header_length
    ambiguity.check_unique_keys(body, end, keys)
    floats = {k for k, v in params.items() if type(v) is float}
    if floats:
        ambiguity.check_float_params(body, end, floats)
    if reading.float_zero:
        ambiguity.check_exponents(body, end, "inputs")
    return InferenceRequest(
        protocol=Protocol.KSERVE_HTTP,
        model=model,
        version=version,
        method="infer",
        inputs=tensors,
        outputs=outputs,
        parameters=parameters,
        options=options,
        id=request_id,
    )


def _request_params(params: dict[str, Any]) -> tuple[Params, Params]:
    """(what the model sees, what the server consumes) of a request's ``parameters``, each value checked as
    Triton's HTTP front checks it; DecodeError for any value the server refuses or reads differently."""
    seen: dict[str, Any] = {}
    consumed: dict[str, Any] = {}
    for key, value in params.items():
        ambiguity.check_text(key, "parameters")
        check = _SERVER_PARAMS.get(key)
        if check is not None:
            if not check(value):
                raise DecodeError(f"parameters.{key}: a value the model server refuses")
            consumed[key] = value
        elif type(value) is str:
            ambiguity.check_text(value, f"parameters.{key}")
            seen[key] = value
        elif type(value) is bool or type(value) is float or (type(value) is int and _INT64_MIN <= value <= _INT64_MAX):
            seen[key] = value  # floats only if spelt so the server reads them exactly (decode_request checks)
        else:
            # Integers past int64 the server reads as doubles; objects, arrays and null it refuses.
            raise DecodeError(f"parameters.{key}: a {type(value).__name__} value is not modelled")
        if key.startswith("triton_"):
            raise DecodeError(f"parameters.{key}: the model server refuses keys starting with triton_")
    return freeze_params(seen), freeze_params(consumed)


def _is_uint64(v: Any) -> bool:
    return type(v) is int and 0 <= v <= _UINT64_MAX


def _is_bool(v: Any) -> bool:
    return type(v) is bool


_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
# Request parameters Triton's HTTP front takes for itself (the model never sees them), with its checks.
_SERVER_PARAMS: dict[str, Callable[[Any], bool]] = {
    "priority": _is_uint64,
    "timeout": _is_uint64,
    "binary_data_output": _is_bool,
    "sequence_id": lambda v: _is_uint64(v) or (type(v) is str and "\0" not in v),
    "sequence_start": _is_bool,
    "sequence_end": _is_bool,
}


def decode_response(body: bytes, header_length: int | None) -> InferenceResponse:
    """Raises :class:`DecodeError` for malformed input and for Triton's ``{"error": ...}`` bodies."""
    doc, section = _split_body(body, header_length)
    if "error" in doc and "outputs" not in doc:
        raise DecodeError(f"error: the server answered with an error: {doc['error']!r}")
    outputs = _list_of_dicts(doc, "outputs", required=False)
    tensors = tuple(_decode_tensor(obj, f"outputs[{i}]", section, _Reading(request=False))
                    for i, obj in enumerate(outputs))
    section.finish()
    return InferenceResponse(
        protocol=Protocol.KSERVE_HTTP,
        model=_optional_str(doc, "model_name"),
        version=_optional_str(doc, "model_version"),
        outputs=tensors,
        parameters=_params(doc),
        id=_optional_str(doc, "id"),
    )


# "model_name"/"model_version" in a request body are ignored by Triton (the path decides); Triton's own
# documentation examples carry them.
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs", "model_name", "model_version"})
# Input parameters that describe the wire only: dropped from the canonical tensor.
_WIRE_INPUT_PARAMS = frozenset({"binary_data_size", "content_type"})
class _BinarySection:
    """The raw tensors after the JSON header, consumed in order."""

    def __init__(self, raw: memoryview, has_header: bool) -> None:
        self._raw = raw
        self._pos = 0
        self._has_header = has_header

    def take(self, size: int, field: str) -> bytes:
        end = self._pos + size
        if end > len(self._raw):
            why = "" if self._has_header else f" (no {HEADER_LENGTH}, so the body has no binary section)"
            raise DecodeError(
                f"{field}: {size} bytes run past the end of the binary section "
                f"({len(self._raw) - self._pos} left){why}"
            )
        chunk = bytes(self._raw[self._pos : end])
        self._pos = end
        return chunk

    def finish(self) -> None:
        if self._pos != len(self._raw):
            raise DecodeError(
                f"{HEADER_LENGTH}: {len(self._raw) - self._pos} bytes after the JSON header "
                "are not claimed by any binary_data_size"
            )


def _split_body(body: bytes, header_length: int | None) -> tuple[dict[str, Any], _BinarySection]:
    view = memoryview(body)
    if header_length is None:
        json_part, rest = view, view[len(view) :]
    else:
        if type(header_length) is not int or not 0 <= header_length <= len(body):
            raise DecodeError(
                f"{HEADER_LENGTH}: {header_length!r} is not a length within the {len(body)}-byte body"
            )
        json_part, rest = view[:header_length], view[header_length:]
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"body: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise DecodeError("body: expected a JSON object")
    return doc, _BinarySection(rest, header_length is not None)


class _Reading:
    """What one decode learns on the way: whether it reads a request (held to the server's own reading) or
    an answer of the server's, and whether some FP32 value was a float zero (see ambiguity.check_exponents)."""

    __slots__ = ("float_zero", "request")

    def __init__(self, request: bool) -> None:
        self.request = request
        self.float_zero = False


def _decode_tensor(obj: dict[str, Any], field: str, section: _BinarySection, reading: _Reading) -> Tensor:
    name = _required_str(obj, "name", field)
    ambiguity.check_text(name, f"{field}.name")
    datatype = obj.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPE_SIZES:
        raise DecodeError(f"{field}.datatype: expected one of {', '.join(DATATYPE_SIZES)}, got {datatype!r}")
    shape = _shape(obj.get("shape"), f"{field}.shape")
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise DecodeError(f"{field}.parameters: expected an object")
    unknown = params.keys() - _WIRE_INPUT_PARAMS
    if unknown:
        # Shared-memory inputs (data not in the body) and parameters the codec does not know.
        raise DecodeError(f"{field}.parameters.{sorted(unknown)[0]}: not modelled by the sidecar")
    has_data, has_binary = "data" in obj, "binary_data_size" in params
    if has_data == has_binary:
        raise DecodeError(f"{field}: expected exactly one of 'data' or 'parameters.binary_data_size'")
    count = element_count(shape)
    if has_binary:
        size_field = f"{field}.parameters.binary_data_size"
        size = params["binary_data_size"]
        if type(size) is not int or size < 0:
            raise DecodeError(f"{size_field}: expected a non-negative integer, got {size!r}")
        data = _check_binary(section.take(size, size_field), datatype, count, size_field)
    else:
        data = _json_data_to_bytes(obj["data"], datatype, count, f"{field}.data", reading)
    return Tensor(name=name, datatype=datatype, shape=shape, data=data)


def _decode_requested_output(obj: dict[str, Any], field: str) -> RequestedOutput:
    name = _required_str(obj, "name", field)
    ambiguity.check_text(name, f"{field}.name")
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise DecodeError(f"{field}.parameters: expected an object")
    if any(k.startswith("shared_memory") for k in params):
        raise DecodeError(f"{field}.parameters: shared-memory outputs are not modelled by the sidecar")
    params = dict(params)
    binary = params.pop("binary_data", None)
    if binary is not None and type(binary) is not bool:
        raise DecodeError(f"{field}.parameters.binary_data: expected a boolean, got {binary!r}")
    if "classification" in params and not _is_uint64(params["classification"]):
        raise DecodeError(f"{field}.parameters.classification: a value the model server refuses")
    # The server ignores any other output parameter; they stay in the call's identity all the same.
    return RequestedOutput(name=name, binary=binary, parameters=freeze_params(params))


def _check_binary(raw: bytes, datatype: str, count: int, field: str) -> bytes:
    size = DATATYPE_SIZES[datatype]
    if size is None:
        try:
            n = len(unpack_bytes_elements(raw))
        except ValueError as exc:
            raise DecodeError(f"{field}: malformed BYTES data ({exc})") from None
        if n != count:
            raise DecodeError(f"{field}: holds {n} BYTES elements but the shape needs {count}")
    elif len(raw) != count * size:
        raise DecodeError(f"{field}: {len(raw)} bytes, but the shape needs {count * size} for {datatype}")
    return raw


def _json_data_to_bytes(data: Any, datatype: str, count: int, field: str, reading: _Reading) -> bytes:
    if datatype in _BINARY_ONLY:
        # Triton answers the same: there is no JSON form for 16-bit floats.
        raise DecodeError(f"{field}: {datatype} data cannot be sent as JSON, use binary_data_size")
    if not isinstance(data, list):
        raise DecodeError(f"{field}: expected a list")
    kinds = set(map(type, data))
    flat = data
    if list in kinds:
        flat = _flatten(data)
        kinds = set(map(type, flat))
    if len(flat) != count:
        raise DecodeError(f"{field}: holds {len(flat)} elements but the shape needs {count}")
    if datatype == "BYTES":
        _expect_kinds(kinds, {str}, field, "strings")
        return pack_bytes_elements([s.encode() for s in flat])
    if datatype == "BOOL":
        _expect_kinds(kinds, {bool}, field, "booleans")
        return bytes(flat)
    dtype = _NUMERIC_DTYPES[datatype]
    if dtype.kind == "f":
        _expect_kinds(kinds, {int, float}, field, "numbers")
        strict = reading.request and float in kinds
        if strict and datatype == "FP64":
            raise DecodeError(f"{field}: FP64 numbers with a fraction or exponent are read inexactly by the model "
                              "server's JSON parser (send them in binary); not modelled")
        if len(flat) <= _SMALL:
            packed = _pack_small(flat, datatype, field, "values beyond the FP32 range")
            if strict:
                ambiguity.check_fp32_small(flat, packed, field)
                reading.float_zero = reading.float_zero or ambiguity.has_float_zero(flat)
            return packed
        return _floats_to_bytes(flat, dtype, field, reading if strict else None)
    _expect_kinds(kinds, {int}, field, "integers")
    if len(flat) <= _SMALL:
        info = np.iinfo(dtype)
        return _pack_small(flat, datatype, field, f"values must lie in [{info.min}, {info.max}] for {datatype}")
    return _ints_to_bytes(flat, dtype, datatype, field)


def _pack_small(flat: list[Any], datatype: str, field: str, range_error: str) -> bytes:
    try:
        return struct.pack(f"<{len(flat)}{_STRUCT_CODES[datatype]}", *flat)
    except (struct.error, OverflowError):
        raise DecodeError(f"{field}: {range_error}") from None


def _ints_to_bytes(flat: list[int], dtype: np.dtype[Any], datatype: str, field: str) -> bytes:
    info = np.iinfo(dtype)
    try:
        wide = np.array(flat, dtype=np.uint64 if datatype == "UINT64" else np.int64)
    except OverflowError:
        wide = None
    if wide is None or (wide.size and (wide.min() < info.min or wide.max() > info.max)):
        raise DecodeError(f"{field}: values must lie in [{info.min}, {info.max}] for {datatype}")
    return wide.astype(dtype).tobytes()


def _floats_to_bytes(flat: list[Any], dtype: np.dtype[Any], field: str, reading: _Reading | None) -> bytes:
    wide = np.array(flat, dtype=np.float64)
    if dtype.itemsize == 8:
        return wide.tobytes()
    with np.errstate(over="ignore"):
        narrow = wide.astype(dtype)
    if not np.isfinite(narrow).all():
        raise DecodeError(f"{field}: values beyond the FP32 range")
    if reading is not None:
        ambiguity.check_fp32(wide, narrow, field)
        reading.float_zero = reading.float_zero or ambiguity.has_float_zero(wide)
    return narrow.tobytes()


def _expect_kinds(kinds: set[type], allowed: set[type], field: str, what: str) -> None:
    if not kinds <= allowed:
        bad = ", ".join(sorted(k.__name__ for k in kinds - allowed))
        raise DecodeError(f"{field}: expected {what}, got {bad}")


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major leaves of arbitrarily nested lists; iterative, as JSON nests up to 1024 deep."""
    out: list[Any] = []
    stack: list[Iterator[Any]] = [iter(data)]
    while stack:
        for x in stack[-1]:
            if type(x) is list:
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _shape(value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(d) is int and 0 <= d < _MAX_DIM for d in value):
        raise DecodeError(f"{field}: expected a list of non-negative integers")
    return tuple(value)


def _list_of_dicts(doc: dict[str, Any], key: str, *, required: bool) -> list[dict[str, Any]]:
    if key not in doc:
        if required:
            raise DecodeError(f"{key}: missing")
        return []
    value = doc[key]
    if not isinstance(value, list):
        raise DecodeError(f"{key}: expected a list")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DecodeError(f"{key}[{i}]: expected an object")
    return value


def _params(doc: dict[str, Any]) -> Params:
    value = doc.get("parameters", {})
    if not isinstance(value, dict):
        raise DecodeError("parameters: expected an object")
    return freeze_params(value)


def _required_str(obj: dict[str, Any], key: str, field: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise DecodeError(f"{field}.{key}: expected a string")
    return value


def _optional_str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise DecodeError(f"{key}: expected a string")
    return value


# ----------------------------------------------------------------------------------------------
# encoding


def encode_request(req: InferenceRequest, binary_inputs: bool) -> tuple[bytes, int | None]:
    """(body, header length or None when nothing travels in the binary section)."""
    header: dict[str, Any] = {}
    if req.id:
        header["id"] = req.id
    if req.parameters or req.options:
        header["parameters"] = thaw_params(req.parameters) | thaw_params(req.options)
    header["inputs"], chunks = _encode_tensors(req.inputs, lambda _: binary_inputs, _json_data)
    if req.outputs:
        header["outputs"] = [_encode_requested_output(o) for o in req.outputs]
    return _assemble(header, chunks)


def encode_response(resp: InferenceResponse, binary_outputs: frozenset[str]) -> tuple[bytes, int | None]:
    """Outputs named in ``binary_outputs`` (and those JSON cannot carry) go in the binary section."""
    # Triton's own key order (id first), so a re-encoded answer reads exactly like the server's.
    header: dict[str, Any] = {"id": resp.id} if resp.id else {}
    header["model_name"] = resp.model
    header["model_version"] = resp.version
    if resp.parameters:
        header["parameters"] = thaw_params(resp.parameters)
    for t in resp.outputs:
        if t.datatype in _BINARY_ONLY and t.name not in binary_outputs:
            # Triton answers such a caller 400 ("sending FP16 data via JSON is not supported"); the front
            # then lets the model server answer it.
            raise ValueError(f"output {t.name!r}: Triton does not send {t.datatype} as JSON")
    header["outputs"], chunks = _encode_tensors(resp.outputs, lambda t: t.name in binary_outputs, _answer_json_data)
    return _assemble(header, chunks)


def _encode_requested_output(out: RequestedOutput) -> dict[str, Any]:
    obj: dict[str, Any] = {"name": out.name}
    params = thaw_params(out.parameters)
    if out.binary is not None:
        params["binary_data"] = out.binary
    if params:
        obj["parameters"] = params
    return obj


def _encode_tensors(
    tensors: Sequence[Tensor], wants_binary: Callable[[Tensor], bool], json_data: Callable[[Tensor], Any]
) -> tuple[list[dict[str, Any]], list[bytes] | None]:
    objs: list[dict[str, Any]] = []
    chunks: list[bytes] | None = None
    for t in tensors:
        obj: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        data = None if wants_binary(t) else json_data(t)
        if data is None:
            _check_canonical(t)
            obj["parameters"] = {"binary_data_size": len(t.data)}
            chunks = [] if chunks is None else chunks
            chunks.append(t.data)
        else:
            obj["data"] = data
        objs.append(obj)
    return objs, chunks


def _json_data(t: Tensor) -> npt.NDArray[Any] | list[str] | orjson.Fragment | None:
    """The flat JSON ``data`` for a tensor, or None when only the binary form is lossless."""
    if t.datatype in _BINARY_ONLY:
        return None
    _check_canonical(t)
    if t.datatype == "BYTES":
        try:
            return [b.decode() for b in unpack_bytes_elements(t.data)]
        except UnicodeDecodeError:
            return None
    if t.datatype == "BOOL":
        flags: npt.NDArray[np.bool_] = np.frombuffer(t.data, dtype=np.uint8) != 0
        return flags
    arr = np.frombuffer(t.data, dtype=_NUMERIC_DTYPES[t.datatype])
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            return None
        if arr.dtype.itemsize == 8:
            return None  # the server's JSON parser reads FP64 numbers inexactly: binary is the exact form
        # Triton's digits, not orjson's shortest text: the same doubles, but not the same bytes.
        return orjson.Fragment(float_text.json_array(arr))
    return arr


def _answer_json_data(t: Tensor) -> Any:
    """An output's JSON ``data`` exactly as Triton writes it (RapidJSON): strings byte for byte, escaped as
    RapidJSON escapes (``\\u001F``, uppercase) and invalid UTF-8 left raw; ``NaN``, ``Infinity`` and
    ``-Infinity`` as bare words. Neither is valid JSON, but it is what Triton sends this caller."""
    if t.datatype == "BYTES":
        _check_canonical(t)
        return orjson.Fragment(rapidjson_strings(unpack_bytes_elements(t.data)))
    if t.datatype in ("FP32", "FP64"):
        _check_canonical(t)
        return orjson.Fragment(_FLOAT_TEXTS.get(t.datatype, t.data))
    return _json_data(t)


class _FloatTexts:
    """Recent float tensors' JSON text, keyed by their bytes: the same cached answer is asked for again and
    again, and Triton's digits cost ~0.5 us a float to write (a 384-float embedding: ~0.2 ms). A pure
    function memo, bounded in bytes of text and key, least recently used out first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._texts: collections.OrderedDict[tuple[str, bytes], bytes] = collections.OrderedDict()

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._shrink()

    def get(self, datatype: str, data: bytes) -> bytes:
        key = (datatype, data)
        text = self._texts.get(key)
        if text is not None:
            self._texts.move_to_end(key)
            return text
        text = float_text.json_array(np.frombuffer(data, dtype=_NUMERIC_DTYPES[datatype]), non_finite=True)
        if len(text) + len(data) <= self.max_bytes // 8:
            self._texts[key] = text
            self.used += len(text) + len(data)
            self._shrink()
        return text

    def _shrink(self) -> None:
        while self.used > self.max_bytes:
            (_, old_data), old_text = self._texts.popitem(last=False)
            self.used -= len(old_text) + len(old_data)


_FLOAT_TEXTS = _FloatTexts(64 << 20)


def keep_float_texts(max_bytes: int) -> None:
    """The memory the JSON text of float answers may hold (``cache.text_bytes``), for this process."""
    _FLOAT_TEXTS.resize(max_bytes)


_RAPIDJSON_ESCAPES = {c: (b"\\u%04X" % c) for c in range(0x20)} | {
    0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0C: b"\\f", 0x0D: b"\\r", 0x22: b'\\"', 0x5C: b"\\\\"}
_NEEDS_ESCAPE = re.compile(rb'[\x00-\x1f"\\]')


def rapidjson_strings(elements: Sequence[bytes]) -> bytes:
    """A JSON array of these strings as RapidJSON's ``Writer::String`` writes them (no UTF-8 validation)."""
    def escape(match: re.Match[bytes]) -> bytes:
        return _RAPIDJSON_ESCAPES[match.group()[0]]

    return b"[" + b",".join(b'"' + _NEEDS_ESCAPE.sub(escape, e) + b'"' for e in elements) + b"]"


def _check_canonical(t: Tensor) -> None:
    if t.datatype not in DATATYPE_SIZES:
        raise ValueError(f"tensor {t.name!r}: unknown datatype {t.datatype!r}")
    size = DATATYPE_SIZES[t.datatype]
    if size is not None and len(t.data) != element_count(t.shape) * size:
        raise ValueError(f"tensor {t.name!r}: {len(t.data)} bytes do not fit shape {t.shape} of {t.datatype}")


def _assemble(header: dict[str, Any], chunks: list[bytes] | None) -> tuple[bytes, int | None]:
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if chunks is None:
        return head, None
    return b"".join([head, *chunks]), len(head)

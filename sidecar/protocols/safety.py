"""The one refusal of the sidecar's own on the data ports: a call that would crash the model server.

Triton computes a tensor's element count and byte size in int64 with no overflow check
(``GetElementCount``, ``GetByteSize``): HTTP shapes are read as uint64 and stored as int64 (2^64-1 is
-1), gRPC shapes are int64 as sent. Three things follow, each refused here (``UnsafeInput``):

- **A reservation.** For a JSON-data tensor Triton reserves ``count x size`` bytes before it counts
  the data: a tiny body declaring 2^34 FP32 elements, or a count that wraps negative, aborts it
  (``std::length_error`` / ``bad_alloc``).
- **A shape that wraps.** A count or byte size that overflows int64 can wrap to exactly the size of the
  data sent (``[2^62+2, 1]`` FP32 with 8 bytes is "8 bytes"): Triton accepts the call and the model
  gets a shape that does not match its data (the python backend's stub crashes on it).
- **Negative dimensions** whose product comes out right (``[-2, -2]`` with 16 bytes) pass the same way.

A shape whose count is wrong in a way Triton notices (a plain mismatch, a ``-1``) is left to Triton,
which refuses it with its own words. The HTTP check must hold whatever the codec makes of the body,
because a call the codec cannot model still goes to the model server untouched - and Triton reads
JSON its own way: invalid UTF-8, NaN, a byte-order mark and deep nesting pass; a duplicated key means
its *first* value (RapidJSON's lookup); the Inference-Header-Content-Length is read leniently. So a
cheap scan of the raw bytes finds every bracketed list of integers that is the value of a key reading
``shape`` (however it is spelt: escapes are decoded as Triton decodes them; a key that cannot be read
counts) whose product exceeds both the body's length and ``UNSAFE_DECLARED_BYTES / 4``; only then is the body
read carefully, Triton's way, and every tensor checked. Anything ambiguous with such a shape in it (a
header length that is not a plain decimal, two of them, a body that will not parse even leniently) is
refused: it cannot be proven safe. The gRPC codec calls :func:`check_counted` for each input while it
decodes the message. Pure functions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from ..errors import UnsafeInput

UNSAFE_DECLARED_BYTES = 16 * 1024 * 1024
_MIN_ELEMENTS = UNSAFE_DECLARED_BYTES // 4
_INT64 = 2**63
_UINT64 = 2**64
# A list of integers that is a key's value: "key": [1, 2, ...] (a shape is always one; data lists nested in
# "data", or its rows, are not).
_KEYED_INT_LIST = re.compile(rb'"((?:[^"\\]|\\.)*)"\s*:\s*\[\s*(\d{1,40}(?:\s*,\s*\d{1,40})*)\s*\]')
_SIZES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
          "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}


def suspicious(body: bytes) -> bool:
    """Whether some ``shape`` in ``body`` (a list of integers under a key that reads "shape", escapes decoded as
    Triton decodes them) declares more elements than the body could hold."""
    floor = max(len(body), _MIN_ELEMENTS)
    for match in _KEYED_INT_LIST.finditer(body):
        if not _may_be_shape(match.group(1)):
            continue
        numbers = [int(n) for n in match.group(2).split(b",")]
        if len(numbers) == 1 and numbers[0] <= floor:
            continue
        if math.prod(numbers) > floor:
            return True
    return False


def _may_be_shape(key: bytes) -> bool:
    if b"\\" not in key:
        return key == b"shape"
    try:
        return bool(json.loads(b'"' + key + b'"') == "shape")
    except ValueError:
        return True  # a key that cannot be read is not proven to be another one


def check(body: bytes, header_lengths: list[bytes]) -> None:
    """UnsafeInput when a KServe v2 body could make the model server reserve far more than it holds."""
    if not suspicious(body):
        return
    if len(header_lengths) > 1:
        raise UnsafeInput("Inference-Header-Content-Length given twice in a call that declares a huge shape")
    json_part = body
    if header_lengths:
        text = header_lengths[0].strip()
        if not text.isdigit() or int(text) > len(body):
            raise UnsafeInput("Inference-Header-Content-Length is not a plain length, in a call that declares a "
                              "huge shape")
        json_part = body[: int(text)]
    doc = _lenient(json_part)
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    for i, tensor in enumerate(inputs if isinstance(inputs, list) else ()):
        if isinstance(tensor, dict):
            _check_tensor(tensor, i, len(body))


def _check_tensor(tensor: dict[str, Any], i: int, body_length: int) -> None:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _UINT64 for d in shape):
        return  # not a shape Triton reads (uint64 dimensions): it refuses the call before reserving
    datatype = tensor.get("datatype")
    size = _SIZES.get(datatype, 8) if isinstance(datatype, str) else 8
    dims = [d - _UINT64 if d >= _INT64 else d for d in shape]  # as Triton stores them: int64
    count, nbytes = triton_sizes(dims, size)
    params = tensor.get("parameters")
    params = params if isinstance(params, dict) else {}
    field = f"inputs[{i}].shape"
    if "binary_data_size" in params or "shared_memory_region" in params:
        declared = params.get("binary_data_size")
        if _bogus(dims, size) and (type(declared) is not int or declared == nbytes):
            raise UnsafeInput(f"{field}: {shape} overflows the model server's size arithmetic")
        return
    declared = math.prod(shape)
    if nbytes < 0 or (declared > body_length and declared * size > UNSAFE_DECLARED_BYTES):
        raise UnsafeInput(f"{field}: declares {declared} elements, far more than the {body_length}-byte "
                          "body holds; refused because the model server would reserve memory for them")
    if _bogus(dims, size):
        data = tensor.get("data")
        if not isinstance(data, list) or _json_count(data) == count:
            raise UnsafeInput(f"{field}: {shape} overflows the model server's size arithmetic")


def check_counted(dims: Sequence[int], datatype: str, actual: int, field: str) -> None:
    """A tensor of int64 ``dims`` whose data holds ``actual`` bytes (BYTES: ``actual`` elements): UnsafeInput
    when Triton's wrapping arithmetic would take it for a match though the shape does not fit the data."""
    size = _SIZES.get(datatype, 1)  # BYTES: its count is compared
    if not _bogus(dims, size):
        return
    count, nbytes = triton_sizes(dims, size)
    if (count if datatype == "BYTES" else nbytes) == actual:
        raise UnsafeInput(f"{field}: {list(dims)} overflows the model server's size arithmetic")


def triton_sizes(dims: Sequence[int], size: int) -> tuple[int, int]:
    """(element count, byte size) as Triton computes them: int64 products that wrap."""
    count = 1
    for d in dims:
        count = _wrap(count * d)
    return count, _wrap(count * size)


def _bogus(dims: Sequence[int], size: int) -> bool:
    """A shape Triton's arithmetic gets wrong: a negative dimension, or a byte size past int64."""
    return any(d < 0 for d in dims) or math.prod(dims) * size >= _INT64


def _wrap(n: int) -> int:
    n &= _UINT64 - 1
    return n - _UINT64 if n >= _INT64 else n


def _json_count(data: list[Any]) -> int:
    """Leaves of nested lists (Triton counts elements, whatever the nesting)."""
    count = 0
    stack = [data]
    while stack:
        for x in stack.pop():
            if isinstance(x, list):
                stack.append(x)
            else:
                count += 1
    return count


def _lenient(data: bytes) -> Any:
    """JSON as Triton reads it: first value of a duplicated key, invalid UTF-8 and NaN tolerated."""
    text = data.decode("utf-8", "surrogateescape").lstrip("\ufeff")
    try:
        return json.loads(text, object_pairs_hook=_first_wins)
    except (ValueError, RecursionError):
        raise UnsafeInput("a call that declares a huge shape, in a body the sidecar cannot read") from None


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out

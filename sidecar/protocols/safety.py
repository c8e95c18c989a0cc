"""The one refusal of the sidecar's own on the data port: a call that would abort the model server.

Triton reserves memory for the shape a JSON-data tensor declares before it counts the data: a tiny
body declaring 2^34 FP32 elements aborts it (std::length_error / bad_alloc). The check must hold
whatever the codec makes of the body, because a call the codec cannot model still goes to the model
server untouched - and Triton reads JSON its own way: invalid UTF-8, NaN, a byte-order mark and
deep nesting pass; a duplicated key means its *first* value (RapidJSON's lookup); the
Inference-Header-Content-Length is read leniently.

So: a cheap scan of the raw bytes finds every bracketed list of integers (any key, however it is
spelt) whose product exceeds both the body's length and ``UNSAFE_DECLARED_BYTES / 4``. Only then is
the body read carefully, Triton's way (first value of a duplicated key wins; invalid UTF-8 and NaN
tolerated), and the call refused unless each such shape is proven to belong to a tensor whose data is
not JSON (binary extension or shared memory). Anything ambiguous with such a shape in it - a header
length that is not a plain decimal, two of them, a body that will not parse even leniently - is
refused: it cannot be proven safe. Pure functions.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..errors import UnsafeInput

UNSAFE_DECLARED_BYTES = 16 * 1024 * 1024
_MIN_ELEMENTS = UNSAFE_DECLARED_BYTES // 4
_INT64 = 2**63
_INT_LIST = re.compile(rb"\[\s*(\d{1,40}(?:\s*,\s*\d{1,40})*)\s*\]")
_SIZES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
          "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}


def suspicious(body: bytes) -> bool:
    """Whether some list of integers in ``body`` declares more elements than the body could hold."""
    floor = max(len(body), _MIN_ELEMENTS)
    for match in _INT_LIST.finditer(body):
        numbers = [int(n) for n in match.group(1).split(b",")]
        if len(numbers) == 1 and numbers[0] <= floor:
            continue
        if math.prod(numbers) > floor:
            return True
    return False


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
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _INT64 for d in shape):
        return  # not a shape Triton reads as one (int64 dimensions): it refuses the call before reserving
    count = math.prod(shape)
    params = tensor.get("parameters")
    elsewhere = isinstance(params, dict) and ("binary_data_size" in params or "shared_memory_region" in params)
    datatype = tensor.get("datatype")
    size = _SIZES.get(datatype, 8) if isinstance(datatype, str) else 8
    if not elsewhere and count > body_length and count * size > UNSAFE_DECLARED_BYTES:
        raise UnsafeInput(f"inputs[{i}].shape: declares {count} elements, far more than the {body_length}-byte "
                          "body holds; refused because the model server would reserve memory for them")


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

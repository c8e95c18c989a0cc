"""Hypothesis strategies for canonical tensors, requests and responses.

Shared by the codec tests and meant for reuse by cache-key and batching tests: everything here
builds values of :mod:`sidecar.protocols.request` directly, never wire bytes.

Data conventions the strategies keep (and codecs rely on for lossless JSON):
- BOOL elements are 0 or 1 bytes;
- ``finite=True`` keeps NaN and infinities out of float tensors (JSON cannot carry them);
  ``finite=False`` may draw any bit pattern, NaN payloads included.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sidecar.protocols.request import (
    DATATYPE_SIZES,
    InferenceRequest,
    InferenceResponse,
    Protocol,
    RequestedOutput,
    Tensor,
    element_count,
    freeze_params,
    pack_bytes_elements,
)

DATATYPES: tuple[str, ...] = tuple(DATATYPE_SIZES)
FIXED_SIZE_DATATYPES: tuple[str, ...] = tuple(d for d, s in DATATYPE_SIZES.items() if s is not None)

_NUMPY = {
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


def names(max_size: int = 12) -> st.SearchStrategy[str]:
    """Any Unicode text JSON can carry (Hypothesis leaves out lone surrogates by default), but NUL: Triton
    reads names and ids as C strings, so the codecs do not model a name holding one (tests of their own)."""
    return st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=max_size)


def shapes(
    max_rank: int = 4, max_side: int = 4, min_side: int = 0, min_rank: int = 0
) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.integers(min_side, max_side), min_size=min_rank, max_size=max_rank).map(tuple)


@st.composite
def tensor_data(draw: st.DrawFn, datatype: str, shape: Sequence[int], *, finite: bool = True) -> bytes:
    """Raw little-endian bytes for ``count(shape)`` elements of ``datatype``."""
    count = element_count(tuple(shape))
    if datatype == "BYTES":
        items = draw(st.lists(_bytes_elements(), min_size=count, max_size=count))
        return pack_bytes_elements(items)
    if datatype == "BOOL":
        return bytes(draw(st.lists(st.booleans(), min_size=count, max_size=count)))
    if datatype == "BF16":
        bits = draw(hnp.arrays(np.dtype("<u2"), count))
        if finite:
            # An all-ones exponent is Inf/NaN: clear its top bit.
            bits[(bits & 0x7F80) == 0x7F80] &= 0xBFFF
        return bytes(bits.tobytes())
    dtype = np.dtype(_NUMPY[datatype])
    if dtype.kind == "f" and not finite:
        size = count * dtype.itemsize
        return draw(st.binary(min_size=size, max_size=size) | _float_arrays(dtype, count, finite=False))
    if dtype.kind == "f":
        return draw(_float_arrays(dtype, count, finite=True))
    return bytes(draw(hnp.arrays(dtype, count)).tobytes())


def _float_arrays(dtype: np.dtype[Any], count: int, *, finite: bool) -> st.SearchStrategy[bytes]:
    width: Literal[16, 32, 64] = 16 if dtype.itemsize == 2 else 32 if dtype.itemsize == 4 else 64
    elements = st.floats(width=width, allow_nan=not finite, allow_infinity=not finite)
    return hnp.arrays(dtype, count, elements=elements).map(lambda a: bytes(a.tobytes()))


def _bytes_elements() -> st.SearchStrategy[bytes]:
    return st.binary(max_size=8) | st.text(max_size=8).map(str.encode)


@st.composite
def tensors(
    draw: st.DrawFn,
    *,
    name: st.SearchStrategy[str] | None = None,
    datatypes: Sequence[str] = DATATYPES,
    shape: st.SearchStrategy[tuple[int, ...]] | None = None,
    finite: bool = True,
) -> Tensor:
    datatype = draw(st.sampled_from(list(datatypes)))
    dims = draw(shape if shape is not None else shapes())
    data = draw(tensor_data(datatype, dims, finite=finite))
    return Tensor(name=draw(name if name is not None else names()), datatype=datatype, shape=dims, data=data)


def _tensor_name(t: Tensor) -> str:
    return t.name


def json_scalars() -> st.SearchStrategy[Any]:
    return (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8)
    )


def param_dicts(
    max_size: int = 4, exclude: frozenset[str] = frozenset()
) -> st.SearchStrategy[dict[str, Any]]:
    keys = names(8).filter(lambda k: k not in exclude)
    return st.dictionaries(keys, json_scalars(), max_size=max_size)


# Request parameters the server takes for itself (InferenceRequest.options) or refuses as a model's own.
SERVER_PARAMS = frozenset({"priority", "timeout", "binary_data_output", "sequence_id", "sequence_start",
                           "sequence_end"})


def model_param_dicts(max_size: int = 4) -> st.SearchStrategy[dict[str, Any]]:
    """Request parameters a model sees, of the kinds both Triton fronts read exactly as the codecs do:
    strings, booleans and int64 integers, under keys the server leaves to the model."""
    keys = names(8).filter(lambda k: k not in SERVER_PARAMS and not k.startswith("triton_"))
    values = st.booleans() | st.integers(-(2**63), 2**63 - 1) | names(8)
    return st.dictionaries(keys, values, max_size=max_size)


def option_dicts() -> st.SearchStrategy[dict[str, Any]]:
    """Scheduling options both fronts accept (uint64 priority, int64-range timeout)."""
    return st.fixed_dictionaries({}, optional={"priority": st.integers(0, 2**63 - 1),
                                               "timeout": st.integers(0, 2**63 - 1)})


@st.composite
def requested_outputs(draw: st.DrawFn) -> RequestedOutput:
    return RequestedOutput(
        name=draw(names()),
        binary=draw(st.none() | st.booleans()),
        parameters=freeze_params(draw(param_dicts(3, exclude=frozenset({"binary_data"})))),
    )


@st.composite
def inference_requests(
    draw: st.DrawFn,
    protocol: Protocol = Protocol.KSERVE_HTTP,
    *,
    inputs: st.SearchStrategy[Tensor] | None = None,
    max_inputs: int = 4,
    model: str | None = None,
    version: str | None = None,
    unique_names: bool = False,
) -> InferenceRequest:
    unique_by = _tensor_name if unique_names else None
    return InferenceRequest(
        protocol=protocol,
        model=model if model is not None else draw(names()),
        version=version if version is not None else draw(st.sampled_from(["", "1", "17"])),
        method="infer",
        inputs=tuple(
            draw(
                st.lists(
                    inputs if inputs is not None else tensors(), max_size=max_inputs, unique_by=unique_by
                )
            )
        ),
        outputs=tuple(draw(st.lists(requested_outputs(), max_size=3))),
        parameters=freeze_params(draw(model_param_dicts())),
        options=freeze_params(draw(option_dicts())),
        id=draw(names()),
    )


@st.composite
def inference_responses(
    draw: st.DrawFn,
    protocol: Protocol = Protocol.KSERVE_HTTP,
    *,
    outputs: st.SearchStrategy[Tensor] | None = None,
    max_outputs: int = 4,
    unique_names: bool = False,
) -> InferenceResponse:
    unique_by = _tensor_name if unique_names else None
    return InferenceResponse(
        protocol=protocol,
        model=draw(names()),
        version=draw(st.sampled_from(["", "1", "17"])),
        outputs=tuple(
            draw(
                st.lists(
                    outputs if outputs is not None else tensors(), max_size=max_outputs, unique_by=unique_by
                )
            )
        ),
        parameters=freeze_params(draw(param_dicts())),
        id=draw(names()),
    )


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Arbitrary JSON documents, for fuzzing decoders."""
    return st.recursive(
        json_scalars(),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(names(6), children, max_size=4),
        max_leaves=max_leaves,
    )


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` (a parsed JSON document, left untouched) with one member dropped or replaced by
    arbitrary JSON: malformed input that still gets deep into a decoder."""
    doc = copy.deepcopy(doc)
    containers: list[Any] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict) and node:
            containers.append(node)
            stack.extend(node.values())
        elif isinstance(node, list) and node:
            containers.append(node)
            stack.extend(node)
    if not containers:
        return draw(json_values(6))
    target = draw(st.sampled_from(containers))
    key = draw(st.sampled_from(list(target) if isinstance(target, dict) else list(range(len(target)))))
    if isinstance(target, dict) and draw(st.booleans()):
        del target[key]
    else:
        target[key] = draw(json_values(6))
    return doc

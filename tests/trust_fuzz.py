"""Hypothesis strategies for the stateful differential fuzz: calls spelt every way a parser may differ.

Each call is raw (``trust_calls.HttpCall`` / ``GrpcCall``) and drawn from a small universe of meanings,
so that calls of different callers collide in the cache and in batches, while their spellings vary over
what Triton reads its own way: duplicated keys at every level, number forms (exponents, long digit
strings, values next to an FP32 rounding boundary, FP64 fractions), escapes in names, content
encodings, parameters of every type (valid and refused), forwarded headers in every case, the
restriction key present, absent, wrong or given twice, and gRPC metadata, contents and deadlines.
"""

from __future__ import annotations

import json
import struct
import zlib
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from tests.trust_calls import API_KEY, GRPC_API_KEY, GrpcCall, HttpCall, grpc_infer

_VALUES = [1.5, 2.5, 0.1, -3.0, 7.0]
# Spellings Triton's parser reads otherwise (found against the real server): FP32 next to a rounding
# boundary, FP64 with 17 digits.
_FP32_MISREAD = ["1.456185996532440118933493522490607574582", "1.010024845600128282629981413265340961516",
                 "0.5573540031909942960020032387546962127090"]
_FP64_MISREAD = ["72494927031935834e-7", "71179664014601934e-19", "94018706989938357e-19"]


def _spell(value: float, form: str) -> str:
    if form == "repr":
        return repr(value)
    if form == "exp":
        return f"{value * 10:.6g}e-1"
    if form == "long":
        return format(Decimal(value), ".30f")
    if form == "int" and value == int(value):
        return str(int(value))
    return repr(value)


@st.composite
def fp32_data(draw: st.DrawFn) -> tuple[str, int]:
    """(JSON text of a row of FP32 values, element count)."""
    n = draw(st.integers(1, 2))
    items = []
    for _ in range(n):
        if draw(st.integers(0, 9)) == 0:
            items.append(draw(st.sampled_from(_FP32_MISREAD)))
        else:
            items.append(_spell(draw(st.sampled_from(_VALUES)), draw(st.sampled_from(["repr", "exp", "long", "int"]))))
    return ",".join(items), n


def _tensor(name: str, datatype: str, shape: list[int], data: str, dup_data: str | None = None) -> str:
    text = f'{{"name":{name},"datatype":"{datatype}","shape":{json.dumps(shape)},"data":[{data}]'
    if dup_data is not None:
        text += f',"data":[{dup_data}]'
    return text + "}"


_PARAM_VALUES = ['"a"', '"b"', "1", "2", "true", "0.5", "0.3000000000000000166533453693773481063544750213623046875",
                 "null", '{"q":1}', '"\\u0061"']
_OPTIONS = ['"priority":1', '"priority":"high"', '"priority":-1', '"timeout":100000000', '"timeout":"5"',
            '"binary_data_output":true', '"binary_data_output":"true"', '"triton_x":1']


@st.composite
def http_calls(draw: st.DrawFn) -> HttpCall:
    data, n = draw(fp32_data())
    name = draw(st.sampled_from(['"INPUT0"', '"INPUT0"', '"INPUT\\u0030"']))
    dup = None
    if draw(st.integers(0, 5)) == 0:
        dup, n2 = draw(fp32_data())
        if n2 != n:
            dup = None
    inputs = [_tensor(name, "FP32", [1, n], data, dup)]
    if draw(st.booleans()):
        fp64 = draw(st.sampled_from(["1", "2", "0.5", *_FP64_MISREAD]))
        inputs.append(_tensor('"INPUT1"', "FP64", [1, 1], fp64))
    members = ['"inputs":[' + ",".join(inputs) + "]"]
    if draw(st.integers(0, 7)) == 0:  # a second "inputs": Triton reads the first
        other, m = draw(fp32_data())
        members.append(f'"inputs":[{_tensor(name, "FP32", [1, m], other)}]')
    params = []
    if draw(st.booleans()):
        params.append(f'"p":{draw(st.sampled_from(_PARAM_VALUES))}')
        if draw(st.integers(0, 4)) == 0:
            params.append(f'"p":{draw(st.sampled_from(_PARAM_VALUES))}')
    if draw(st.integers(0, 3)) == 0:
        params.append(draw(st.sampled_from(_OPTIONS)))
    if params:
        members.insert(draw(st.integers(0, len(members))), '"parameters":{' + ",".join(params) + "}")
    outputs = draw(st.sampled_from([None, '[{"name":"OUTPUT0"}]', '[{"name":"META"},{"name":"OUTPUT0"}]',
                                    '[{"name":"OUTPUT0","parameters":{"binary_data":true}}]',
                                    '[{"name":"OUTPUT0","parameters":{"binary_data":"yes"}}]']))
    if outputs:
        members.append(f'"outputs":{outputs}')
    if draw(st.integers(0, 5)) == 0:
        members.insert(0, f'"id":"{draw(st.sampled_from(["x", "y"]))}"')
    body = ("{" + ",".join(members) + "}").encode()
    headers: list[tuple[str, str]] = []
    encoding = draw(st.sampled_from([None, None, None, "gzip", "deflate", "GZIP", "x-gzip", "twice"]))
    if encoding == "twice":
        body = zlib.compress(body)
        headers += [("Content-Encoding", "deflate"), ("Content-Encoding", "identity")]
    elif encoding is not None:
        body = zlib.compress(body) if encoding == "deflate" else _gzip(body)
        headers.append(("Content-Encoding", encoding))
    tenant = draw(st.sampled_from([None, None, ("x-tenant-id", "a"), ("x-tenant-id", "b"), ("X-Tenant-Id", "a")]))
    if tenant:
        headers.append(tenant)
    key = draw(st.sampled_from(["right", "right", "right", "absent", "wrong", "wrong-first"]))
    if key == "right":
        headers.append(API_KEY)
    elif key == "wrong":
        headers.append((API_KEY[0], "guess"))
    elif key == "wrong-first":
        headers += [(API_KEY[0], "guess"), API_KEY]
    return HttpCall("/v2/models/reflect/infer", body, tuple(headers))


def _gzip(body: bytes) -> bytes:
    import gzip

    return gzip.compress(body, mtime=0)


@st.composite
def grpc_calls(draw: st.DrawFn) -> GrpcCall:
    n = draw(st.integers(1, 2))
    values = [draw(st.sampled_from(_VALUES)) for _ in range(n)]
    params: dict[str, tuple[str, Any]] = {}
    if draw(st.booleans()):
        params["p"] = draw(st.sampled_from([("string_param", "a"), ("int64_param", 1), ("bool_param", True),
                                            ("double_param", 0.5), ("uint64_param", 1)]))
    # At most one refused parameter per call: Triton walks a protobuf map in no fixed order, so with two it
    # names either one (its own answers to the same bytes differ).
    if draw(st.integers(0, 3)) == 0 and params.get("p", ("",))[0] != "uint64_param":
        key, value = draw(st.sampled_from([("priority", ("int64_param", 1)), ("priority", ("int64_param", -1)),
                                           ("timeout", ("uint64_param", 5)),
                                           ("binary_data_output", ("bool_param", True))]))
        params[key] = value
    metadata = []
    tenant = draw(st.sampled_from([None, ("x-tenant-id", "a"), ("x-tenant-id", "b")]))
    if tenant:
        metadata.append(tenant)
    keyed = draw(st.sampled_from([True, True, True, False]))
    if not keyed and draw(st.booleans()):
        metadata.append((GRPC_API_KEY[0], "guess"))
    outputs = draw(st.sampled_from([(), ("OUTPUT0",), ("META", "OUTPUT0")]))
    inputs = [("INPUT0", "FP32", [1, n], struct.pack(f"<{n}f", *values))]
    if draw(st.booleans()):
        inputs.append(("INPUT1", "FP64", [1, 1], struct.pack("<d", float(draw(st.sampled_from(_FP64_MISREAD))))))
    return grpc_infer("reflect", inputs, params, outputs, metadata, key=keyed,
                      rid=draw(st.sampled_from(["", "x", "y"])))


def calls() -> st.SearchStrategy[HttpCall | GrpcCall]:
    return st.one_of(http_calls(), http_calls(), grpc_calls())

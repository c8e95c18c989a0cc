"""The hand-written protobuf wire helpers against Google's protobuf runtime (its own varint encoder and a
real message parsed from the bytes)."""

from __future__ import annotations

from google.protobuf import struct_pb2, wrappers_pb2
from google.protobuf.internal import encoder
from hypothesis import given
from hypothesis import strategies as st

from sidecar.protocols.protowire import double_field, length_field, varint


@given(st.integers(0, 2**64 - 1))
def test_varint_is_protobufs_own(n: int) -> None:
    assert varint(n) == encoder._VarintBytes(n)


@given(st.text(max_size=300), st.floats(allow_nan=False))
def test_fields_parse_as_the_runtime_reads_them(text: str, number: float) -> None:
    # StringValue.value is field 1 (string); DoubleValue.value is field 1 (double).
    assert wrappers_pb2.StringValue.FromString(length_field(1, text.encode())).value == text
    assert wrappers_pb2.DoubleValue.FromString(double_field(1, number)).value == number
    # A nested message: Struct.fields is a map (field 1) of entries {key: 1, value: Value{number_value: 2}}.
    entry = length_field(1, text.encode()) + length_field(2, double_field(2, number))
    fields = struct_pb2.Struct.FromString(length_field(1, entry)).fields
    assert {k: v.number_value for k, v in fields.items()} == {text: number}

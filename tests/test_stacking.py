"""Stacking recorded rows into sweep requests (property tests)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.protocols.request import DATATYPE_SIZES, InferenceRequest, Protocol, Tensor
from sidecar.protocols.rows import row_signature, stack, tensor_rows
from tests.strategies import tensor_data


@st.composite
def batched_requests(draw: st.DrawFn) -> list[InferenceRequest]:
    inner = draw(st.lists(st.integers(0, 3), max_size=2))
    datatypes = draw(st.lists(st.sampled_from(sorted(DATATYPE_SIZES)), min_size=1, max_size=3))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        b = draw(st.integers(1, 4))
        inputs = tuple(
            Tensor(f"in{i}", dt, (b, *inner), draw(tensor_data(dt, (b, *inner)))) for i, dt in enumerate(datatypes)
        )
        out.append(InferenceRequest(Protocol.KSERVE_HTTP, "m", inputs=inputs))
    return out


@given(batched_requests(), st.integers(1, 20))
def test_stack_takes_rows_cyclically(reqs: list[InferenceRequest], batch: int) -> None:
    stacked = stack(reqs, batch)
    assert row_signature(stacked) == row_signature(reqs[0])
    for t in stacked.inputs:
        assert t.shape[0] == batch
        source = [row for r in reqs for row in tensor_rows(r.input(t.name))]
        assert tensor_rows(t) == [source[i % len(source)] for i in range(batch)]


def test_stack_refuses_mismatched_requests() -> None:
    a = InferenceRequest(Protocol.KSERVE_HTTP, "m", inputs=(Tensor("x", "FP32", (1, 2), bytes(8)),))
    b = InferenceRequest(Protocol.KSERVE_HTTP, "m", inputs=(Tensor("x", "FP32", (1, 3), bytes(12)),))
    with pytest.raises(ValueError):
        stack([a, b], 4)
    with pytest.raises(ValueError):
        stack([InferenceRequest(Protocol.KSERVE_HTTP, "m", inputs=(Tensor("x", "FP32", (), bytes(4)),))], 2)

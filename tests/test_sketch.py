"""Space-Saving: the paper's guarantees as properties, plus the recorder-facing API."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.warmup.sketch import SpaceSaving

# Small alphabets make collisions (and so evictions) frequent; skewed weights make heavy hitters.
keys = st.integers(min_value=0, max_value=30)
streams = st.lists(st.tuples(keys, st.integers(min_value=1, max_value=5)), max_size=300)
capacities = st.integers(min_value=1, max_value=12)


def run(capacity: int, stream: list[tuple[int, int]]) -> tuple[SpaceSaving[int], Counter[int]]:
    sketch: SpaceSaving[int] = SpaceSaving(capacity)
    truth: Counter[int] = Counter()
    for key, count in stream:
        sketch.offer(key, count)
        truth[key] += count
    return sketch, truth


@settings(max_examples=300)
@given(capacities, streams)
def test_heavy_hitters_are_present(capacity: int, stream: list[tuple[int, int]]) -> None:
    sketch, truth = run(capacity, stream)
    total = sum(truth.values())
    for key, true in truth.items():
        if true > total / capacity:
            assert key in sketch, (key, true, total)


@settings(max_examples=300)
@given(capacities, streams)
def test_counts_bound_the_truth(capacity: int, stream: list[tuple[int, int]]) -> None:
    sketch, truth = run(capacity, stream)
    for key, count, error in sketch.items():
        assert 0 <= error <= count
        assert count - error <= truth[key] <= count


@settings(max_examples=300)
@given(capacities, streams)
def test_capacity_and_total(capacity: int, stream: list[tuple[int, int]]) -> None:
    sketch: SpaceSaving[int] = SpaceSaving(capacity)
    for key, count in stream:
        sketch.offer(key, count)
        assert len(sketch) <= capacity
        assert len(sketch._heap) == len(sketch)  # one heap entry per key, never more
    assert sketch.total == sum(count for _, count in stream)
    assert sum(count for _, count, _ in sketch.items()) == sketch.total


@settings(max_examples=200)
@given(capacities, streams)
def test_absent_keys_are_below_the_smallest_counter(capacity: int, stream: list[tuple[int, int]]) -> None:
    sketch, truth = run(capacity, stream)
    present = sketch.items()
    floor = min((count for _, count, _ in present), default=0)
    for key, true in truth.items():
        if key not in sketch:
            assert true <= floor


@given(capacities, streams)
def test_offer_reports_the_evicted_key(capacity: int, stream: list[tuple[int, int]]) -> None:
    sketch: SpaceSaving[int] = SpaceSaving(capacity)
    for key, count in stream:
        before = {k for k, _, _ in sketch.items()}
        evicted = sketch.offer(key, count)
        after = {k for k, _, _ in sketch.items()}
        if evicted is None:
            assert before <= after
        else:
            assert evicted in before and evicted not in after and key in after


def test_top_orders_by_count_and_reports_error() -> None:
    sketch: SpaceSaving[str] = SpaceSaving(2)
    sketch.offer("a", 5)
    sketch.offer("b", 2)
    assert sketch.offer("c") == "b"  # c inherits b's 2 as error
    assert sketch.top(5) == [("a", 5, 0), ("c", 3, 2)]
    assert sketch.top(1) == [("a", 5, 0)]
    assert sketch.top(0) == []


def test_lazy_heap_finds_the_true_minimum() -> None:
    sketch: SpaceSaving[str] = SpaceSaving(2)
    sketch.offer("a")
    sketch.offer("b", 2)
    sketch.offer("a", 5)  # a's heap entry (1) is now stale: b (2) is the real minimum
    assert sketch.offer("c") == "b"
    assert dict((k, (c, e)) for k, c, e in sketch.items()) == {"a": (6, 0), "c": (3, 2)}


def test_drain_returns_everything_and_resets() -> None:
    sketch: SpaceSaving[tuple[str, str]] = SpaceSaving(3)
    for key in [("m", "x"), ("m", "y"), ("m", "x")]:
        sketch.offer(key)
    assert sketch.drain() == [(("m", "x"), 2, 0), (("m", "y"), 1, 0)]
    assert len(sketch) == 0 and sketch.total == 0 and sketch.items() == []
    sketch.offer(("m", "z"))
    assert sketch.items() == [(("m", "z"), 1, 0)]
    sketch.clear()
    assert len(sketch) == 0 and "z" not in sketch


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="capacity"):
        SpaceSaving(0)
    with pytest.raises(ValueError, match="count"):
        SpaceSaving[str](1).offer("a", 0)

"""Hop-by-hop header rules (RFC 9110 7.6.1)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.headers import HOP_BY_HOP, end_to_end


def test_drops_hop_by_hop_and_connection_named_headers() -> None:
    headers = [
        ("Content-Type", "application/json"),
        ("Connection", "keep-alive, X-Private"),
        ("Keep-Alive", "timeout=5"),
        ("x-private", "secret"),
        ("Transfer-Encoding", "chunked"),
        ("Inference-Header-Content-Length", "12"),
        ("Expect", "100-continue"),
    ]
    assert end_to_end(headers) == [("Content-Type", "application/json"), ("Inference-Header-Content-Length", "12")]


names = st.sampled_from(["Content-Type", "X-A", "x-b", "Connection", "TE", "Host", "Content-Length", "X-C"])


@given(st.lists(st.tuples(names, st.sampled_from(["1", "x-a", "X-C, x-b", "close"]))))
def test_end_to_end_keeps_order_and_only_end_to_end_headers(headers: list[tuple[str, str]]) -> None:
    named = {t.strip().lower() for k, v in headers if k.lower() == "connection" for t in v.split(",")}
    expected = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP | {"connection"} | named]
    assert end_to_end(headers) == expected

"""Hop-by-hop header rules (RFC 9110 7.6.1)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.headers import HOP_BY_HOP, end_to_end


def test_drops_hop_by_hop_and_connection_named_headers() -> None:
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Connection", b"keep-alive, X-Private"),
        (b"Keep-Alive", b"timeout=5"),
        (b"x-private", b"secret"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Inference-Header-Content-Length", b"12"),
        (b"Expect", b"100-continue"),
    ]
    assert end_to_end(headers) == [(b"Content-Type", b"application/json"),
                                   (b"Inference-Header-Content-Length", b"12")]


names = st.sampled_from([b"Content-Type", b"X-A", b"x-b", b"Connection", b"TE", b"Host", b"Content-Length", b"X-C"])


@given(st.lists(st.tuples(names, st.sampled_from([b"1", b"x-a", b"X-C, x-b", b"close"]))))
def test_end_to_end_keeps_order_and_only_end_to_end_headers(headers: list[tuple[bytes, bytes]]) -> None:
    named = {t.strip().lower() for k, v in headers if k.lower() == b"connection" for t in v.split(b",")}
    expected = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP | {b"connection"} | named]
    assert end_to_end(headers) == expected

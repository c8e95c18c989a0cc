"""The decode memo: identical small request bytes share one decoded request, anything else never does.

What it shares feeds cache identities and encoded answers, so a wrong share would hand a caller an
answer meant for different bytes: property tests over random requests, encodings and header lengths.
"""

from __future__ import annotations

import gzip

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.front import decoding
from sidecar.front.decoding import RequestDecoder
from sidecar.protocols import dispatch, kserve_http
from sidecar.protocols.request import InferenceRequest, Protocol
from tests.strategies import inference_requests

ROUTE = dispatch.InferenceRoute(Protocol.KSERVE_HTTP, "m", "")


def wire(request: InferenceRequest, binary: bool) -> tuple[bytes, list[bytes]]:
    body, length = kserve_http.encode_request(request, binary)
    return body, [] if length is None else [str(length).encode()]


def route_of(request: InferenceRequest) -> dispatch.InferenceRoute:
    return dispatch.InferenceRoute(Protocol.KSERVE_HTTP, request.model, request.version)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(inference_requests(model="m", version=""), st.booleans(), st.booleans()),
                min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_a_memo_is_shared_exactly_by_identical_bytes(calls: list[tuple[InferenceRequest, bool, bool]],
                                                     rng: object) -> None:
    decoder = RequestDecoder(1 << 20, 0, 1 << 24)
    seen: dict[tuple[bytes, tuple[bytes, ...], tuple[bytes, ...]], object] = {}
    for request, binary, compressed in calls * 2:  # every call twice: the second must reuse
        body, lengths = wire(request, binary)
        encoding = [b"gzip"] if compressed else []
        sent = gzip.compress(body, mtime=0) if compressed else body
        memo = decoder.remembered(ROUTE, sent, lengths, encoding)
        # Always what a fresh decode gives ...
        assert memo.request == dispatch.decode_wire(ROUTE, sent, lengths, encoding, 1 << 24)
        key = (sent, tuple(lengths), tuple(encoding))
        if len(sent) <= decoding._MEMO_BODY:
            # ... the same object for the same bytes, never for other bytes.
            assert seen.setdefault(key, memo) is memo
        others = [m for k, m in seen.items() if k != key]
        assert all(m is not memo for m in others)


def test_the_memo_is_bounded_in_entries_and_body_size() -> None:
    decoder = RequestDecoder(1 << 20, 0, 1 << 24)
    template = b'{"inputs":[{"name":"I","shape":[1,1],"datatype":"FP32","data":[%d]}]}'
    for n in range(decoding._MEMO_ENTRIES + 50):
        decoder.remembered(ROUTE, template % n, [], [])
    assert len(decoder._memo) == decoding._MEMO_ENTRIES
    big = b'{"inputs":[{"name":"I","shape":[1,%d],"datatype":"FP32","data":[%s]}]}'
    count = decoding._MEMO_BODY // 2
    body = big % (count, b",".join([b"1"] * count))
    assert len(body) > decoding._MEMO_BODY
    first, second = decoder.remembered(ROUTE, body, [], []), decoder.remembered(ROUTE, body, [], [])
    assert first is not second and first.request == second.request


def test_the_route_is_part_of_what_is_shared() -> None:
    decoder = RequestDecoder(1 << 20, 0, 1 << 24)
    body = b'{"inputs":[{"name":"I","shape":[1,1],"datatype":"FP32","data":[1]}]}'
    a = decoder.remembered(ROUTE, body, [], [])
    b = decoder.remembered(dispatch.InferenceRoute(Protocol.KSERVE_HTTP, "other", ""), body, [], [])
    c = decoder.remembered(dispatch.InferenceRoute(Protocol.KSERVE_HTTP, "m", "2"), body, [], [])
    assert (a.request.model, b.request.model, c.request.version) == ("m", "other", "2")
    assert len({id(a), id(b), id(c)}) == 3

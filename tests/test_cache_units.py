"""The response cache in-process: keys, entries, the W-TinyLFU tier, the breaker, and single-flight.

Property tests: equal meanings give equal keys and different meanings different keys; entries round
trip exactly and anything else reads as a miss; the tier never exceeds its bytes; every caller of
the cache stage gets its own answer under random concurrency, cancellation and upstream faults.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.cache import entry as entries
from sidecar.cache.entry import Entry
from sidecar.cache.generation import Generations
from sidecar.cache.memory import MemoryTier
from sidecar.calls import Call, HttpAnswer, HttpWire, Reply
from sidecar.config import CacheConfig
from sidecar.errors import UpstreamUnavailable
from sidecar.identity import cache_key, is_stateful
from sidecar.metrics import Metrics
from sidecar.pipeline.cache import CacheStage
from sidecar.protocols import kserve_http
from sidecar.protocols.request import InferenceRequest, InferenceResponse, Protocol, Tensor, freeze_params
from sidecar.redis.breaker import Breaker
from tests.strategies import inference_requests, inference_responses

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- keys ----------------------------------------------------------------------------------------------


@SETTINGS
@given(inference_requests(), st.booleans(), st.text(max_size=8))
def test_equal_meanings_give_equal_keys(req: InferenceRequest, binary: bool, other_id: str) -> None:
    """JSON or binary, another id, scheduling hints: the same call, the same key."""
    body, header_length = kserve_http.encode_request(req, binary)
    decoded = kserve_http.decode_request(req.model, req.version, body, header_length)
    hinted = dataclasses.replace(decoded, id=other_id, options=freeze_params({"priority": 3, "timeout": 1000}))
    assert cache_key(hinted, "g") == cache_key(req, "g")


@SETTINGS
@given(inference_requests(), st.data())
def test_different_meanings_give_different_keys(req: InferenceRequest, data: st.DataObject) -> None:
    key = cache_key(req, "g", b"tenant-a")
    assert cache_key(dataclasses.replace(req, model=req.model + "x"), "g", b"tenant-a") != key
    assert cache_key(dataclasses.replace(req, version=req.version + "1"), "g", b"tenant-a") != key
    assert cache_key(req, "g2", b"tenant-a") != key  # another generation of the model
    assert cache_key(req, "g", b"tenant-b") != key  # another tenant
    assert cache_key(dataclasses.replace(req, parameters=(*req.parameters, ("zz_extra", "1"))), "g",
                     b"tenant-a") != key
    if req.inputs:
        i = data.draw(st.integers(0, len(req.inputs) - 1))
        t = req.inputs[i]
        changed = dataclasses.replace(t, data=t.data + b"\x00") if data.draw(st.booleans()) else \
            dataclasses.replace(t, name=t.name + "'")
        inputs = (*req.inputs[:i], changed, *req.inputs[i + 1:])
        assert cache_key(dataclasses.replace(req, inputs=inputs), "g", b"tenant-a") != key


def test_sequence_calls_are_stateful() -> None:
    req = InferenceRequest(Protocol.KSERVE_HTTP, "m", options=freeze_params({"sequence_id": 7}))
    assert is_stateful(req) and not is_stateful(InferenceRequest(Protocol.KSERVE_HTTP, "m"))


# -- entries -------------------------------------------------------------------------------------------


@SETTINGS
@given(inference_responses(), st.floats(0, 2e9))
def test_entries_round_trip_exactly(response: InferenceResponse, stored_at: float) -> None:
    decoded, when = entries.decode(entries.encode(response, stored_at))
    assert decoded == response and when == stored_at


@SETTINGS
@given(inference_responses(), st.data())
def test_a_damaged_entry_reads_as_a_miss(response: InferenceResponse, data: st.DataObject) -> None:
    raw = entries.encode(response, 1.0)
    cut = data.draw(st.integers(0, len(raw) - 1))
    for damaged in (raw[:cut], raw + b"x"):
        with pytest.raises(ValueError):
            entries.decode(damaged)


# -- the in-process tier -------------------------------------------------------------------------------


def digest(i: int) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=32).digest()


RESPONSE = InferenceResponse(Protocol.KSERVE_HTTP, "m")


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 900), st.booleans()), max_size=300))
def test_the_tier_never_holds_more_than_its_bytes(ops: list[tuple[int, int, bool]]) -> None:
    tier = MemoryTier(4000)
    for i, size, read in ops:
        if read:
            tier.get(digest(i))
        else:
            tier.put(digest(i), "ab"[i % 2], Entry(RESPONSE, 0.0, 1e18, size))
        assert tier.used <= tier.max_bytes
        counted = tier.accounted()
        assert counted == tier.entries_by_model()
        assert tier.used == sum(b for _, b in counted.values())


def test_tinylfu_keeps_frequent_answers_better_than_lru_on_a_zipf_trace() -> None:
    rng = np.random.default_rng(7)
    n = 5000
    weights = np.arange(1, n + 1) ** -1.1
    trace = rng.permutation(n)[rng.choice(n, size=60_000, p=weights / weights.sum())]
    capacity = 300
    tier = MemoryTier(capacity * 1000)
    lru: collections.OrderedDict[int, None] = collections.OrderedDict()
    hits_tier = hits_lru = 0
    for i in trace:
        key = digest(int(i))
        if tier.get(key) is not None:
            hits_tier += 1
        else:
            tier.put(key, "m", Entry(RESPONSE, 0.0, 1e18, 1000))
        if i in lru:
            lru.move_to_end(i)
            hits_lru += 1
        else:
            lru[i] = None
            if len(lru) > capacity:
                lru.popitem(last=False)
    assert hits_tier > hits_lru * 1.05, (hits_tier, hits_lru)


def test_expired_entries_are_misses_unless_stale_is_allowed() -> None:
    now = [100.0]
    tier = MemoryTier(10_000, clock=lambda: now[0])
    tier.put(digest(1), "m", Entry(RESPONSE, 90.0, 110.0, 100))
    assert tier.get(digest(1)) is not None
    now[0] = 115.0
    assert tier.get(digest(1)) is None
    assert tier.get(digest(1), stale_for=10) is not None
    now[0] = 125.0
    assert tier.get(digest(1), stale_for=10) is None


def test_flush_forgets_one_model_or_all() -> None:
    tier = MemoryTier(10_000)
    for i, model in enumerate(["a", "a", "b"]):
        tier.put(digest(i), model, Entry(RESPONSE, 0.0, 1e18, 100))
    assert tier.flush("a") == 2 and len(tier) == 1
    assert tier.flush() == 1 and tier.used == 0


def test_generations_change_with_versions_and_reloads() -> None:
    g = Generations()
    first = g.key("m")
    assert g.observe({("m", "1")}) == {"m"} and g.key("m") != first
    second = g.key("m")
    assert g.observe({("m", "1")}) == set() and g.key("m") == second
    g.bump("m")
    assert g.key("m") != second
    third = g.key("m")
    g.bump_all()
    assert g.key("m") != third


def test_the_breaker_opens_probes_and_closes() -> None:
    now = [0.0]
    breaker = Breaker(failures=3, cooldown=2.0, clock=lambda: now[0])
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 2.5
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure()
    assert breaker.state == "open" and breaker.cooldown == 4.0
    now[0] = 7.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


# -- the stage: single-flight --------------------------------------------------------------------------


def request_for(value: int) -> InferenceRequest:
    data = np.array([value], dtype="<f4").tobytes()
    return InferenceRequest(Protocol.KSERVE_HTTP, "m", inputs=(Tensor("X", "FP32", (1,), data),))


def make_call(value: int, request_id: str = "rid") -> Call:
    loop = asyncio.get_running_loop()
    return Call(request_for(value), request_id, loop.time() + 10, HttpWire(b"/v2/models/m/infer", (), b"{}"))


def answer_for(call: Call) -> Reply:
    value = call.request.inputs[0].data
    response = InferenceResponse(Protocol.KSERVE_HTTP, "m", "1", (Tensor("Y", "FP32", (1,), value),))
    return Reply(200, wire=HttpAnswer(200, b"OK", (), value), for_call=call, response=response)


def stage(**cfg: object) -> CacheStage:
    config = dataclasses.replace(CacheConfig(), models=("*",), **cfg)  # type: ignore[arg-type]
    return CacheStage(config, MemoryTier(1 << 20), None, Generations(), Metrics())


async def test_identical_concurrent_calls_cost_one_upstream_call() -> None:
    cache = stage()
    calls = 0
    release = asyncio.Event()

    async def upstream(call: Call) -> Reply:
        nonlocal calls
        calls += 1
        await release.wait()
        return answer_for(call)

    waiting = [asyncio.create_task(cache(make_call(5, f"r{i}"), upstream)) for i in range(100)]
    await asyncio.sleep(0)
    release.set()
    replies = await asyncio.gather(*waiting)
    assert calls == 1
    assert sorted(r.cache for r in replies) == ["coalesced"] * 99 + ["miss"]
    assert all(r.response().outputs[0].data == request_for(5).inputs[0].data for r in replies)
    again = await cache(make_call(5), upstream)
    assert again.cache == "hit" and calls == 1


async def test_a_cancelled_leader_leaves_the_others_served() -> None:
    cache = stage()
    release = asyncio.Event()

    async def upstream(call: Call) -> Reply:
        await release.wait()
        return answer_for(call)

    leader = asyncio.create_task(cache(make_call(1, "leader"), upstream))
    await asyncio.sleep(0)
    followers = [asyncio.create_task(cache(make_call(1, f"f{i}"), upstream)) for i in range(3)]
    await asyncio.sleep(0)
    leader.cancel()
    release.set()
    replies = await asyncio.gather(*followers)
    assert all(r.ok and r.cache == "coalesced" for r in replies)
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_when_every_caller_leaves_the_upstream_call_is_cancelled_and_nothing_hangs() -> None:
    cache = stage()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(call: Call) -> Reply:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    callers = [asyncio.create_task(cache(make_call(2), stuck)) for _ in range(3)]
    await started.wait()
    for c in callers:
        c.cancel()
    async with asyncio.timeout(2):
        await cancelled.wait()
    assert not cache.flights

    async def quick(call: Call) -> Reply:
        return answer_for(call)

    async with asyncio.timeout(2):  # the next caller starts afresh, it does not join the cancelled call
        assert (await cache(make_call(2), quick)).cache == "miss"


async def test_errors_are_shared_but_never_cached() -> None:
    cache = stage()
    calls = 0

    async def failing(call: Call) -> Reply:
        nonlocal calls
        calls += 1
        return Reply(400, wire=HttpAnswer(400, b"Bad", (), b'{"error":"no"}'), for_call=call)

    assert (await cache(make_call(3), failing)).status == 400
    assert (await cache(make_call(3), failing)).status == 400
    assert calls == 2


async def test_stale_if_error_serves_an_expired_answer_marked_stale() -> None:
    cache = stage(ttl=1.0, stale_if_error=60.0)
    now = [1000.0]
    cache.clock = cache.memory.clock = lambda: now[0]

    async def ok(call: Call) -> Reply:
        return answer_for(call)

    async def down(call: Call) -> Reply:
        raise UpstreamUnavailable("gone")

    await cache(make_call(4), ok)
    now[0] += 5
    reply = await cache(make_call(4), down)
    assert reply.cache == "stale" and reply.response().outputs[0].data == request_for(4).inputs[0].data
    with pytest.raises(UpstreamUnavailable):
        await cache(make_call(9), down)


async def test_no_store_credentials_and_sequences_bypass() -> None:
    cache = stage()
    calls = 0

    async def upstream(call: Call) -> Reply:
        nonlocal calls
        calls += 1
        return answer_for(call)

    for tweak in ({"no_store": True}, {"private": True}):
        for _ in range(2):
            call = make_call(6)
            for k, v in tweak.items():
                setattr(call, k, v)
            assert (await cache(call, upstream)).cache == "bypass"
    sequence = make_call(6)
    sequence.request = dataclasses.replace(sequence.request, options=freeze_params({"sequence_id": 1}))
    assert (await cache(sequence, upstream)).cache == "bypass"
    assert calls == 5
    scoped = make_call(6)
    scoped.private, scoped.scope = True, b"tenant"
    assert (await cache(scoped, upstream)).cache == "miss"


async def test_every_caller_gets_its_own_answer_under_random_concurrency() -> None:
    """Many callers, few distinct calls, random upstream delays and faults, random cancellations."""
    cache = stage()
    rng = random.Random(11)

    async def upstream(call: Call) -> Reply:
        await asyncio.sleep(rng.random() * 0.003)
        if rng.random() < 0.1:
            raise UpstreamUnavailable("fault")
        return answer_for(call)

    async def one(i: int) -> tuple[int, Reply | BaseException]:
        value = rng.randrange(8)
        task = asyncio.create_task(cache(make_call(value, f"r{i}"), upstream))
        if rng.random() < 0.2:
            await asyncio.sleep(rng.random() * 0.002)
            task.cancel()
        try:
            return value, await task
        except (asyncio.CancelledError, UpstreamUnavailable) as e:
            return value, e

    for _ in range(5):
        cache.memory.flush()
        results = await asyncio.gather(*(one(i) for i in range(200)))
        for value, outcome in results:
            if isinstance(outcome, Reply):
                assert outcome.response().outputs[0].data == request_for(value).inputs[0].data
        assert not cache.flights


# -- found by the end-to-end tests (tests/test_cache.py) -------------------------------------------------


def test_tfserving_row_and_columnar_forms_share_a_key_but_kserve_parameters_do_not() -> None:
    from sidecar.protocols import tfserving_rest

    row = tfserving_rest.decode_request("m", "", "", "predict", b'{"instances": [[1.0, 2.0]]}')
    columns = tfserving_rest.decode_request("m", "", "", "predict", b'{"inputs": [[1.0, 2.0]]}')
    assert row.options != columns.options  # a wire form, which the server consumes
    assert cache_key(row, "g") == cache_key(columns, "g")
    # A KServe call's parameters reach the model, whatever their name.
    kserve = request_for(1)
    with_format = dataclasses.replace(kserve, parameters=freeze_params({"format": "row"}))
    assert cache_key(with_format, "g") != cache_key(kserve, "g")


async def test_an_epoch_moved_by_another_replica_empties_this_replicas_memory() -> None:
    class Shared:
        """Only what the stage reads of the Redis tier here: the epochs, and misses."""

        def __init__(self) -> None:
            self.epochs: dict[str, int] = {}
            self.fleet_epoch = 0

        def epoch(self, model: str) -> tuple[int, int]:
            return self.fleet_epoch, self.epochs.get(model, 0)

        def key(self, model: str, versions: str, digest: bytes) -> bytes:
            return b"%d:%d:" % self.epoch(model) + digest

        async def get(self, key: bytes, patient: bool = False) -> bytes | None:
            return None

        def put(self, key: bytes, data: bytes, ttl: float) -> None:
            pass

    shared = Shared()
    cache = CacheStage(dataclasses.replace(CacheConfig(), models=("*",)), MemoryTier(1 << 20),
                       shared, Generations(), Metrics())  # type: ignore[arg-type]

    async def upstream(call: Call) -> Reply:
        return answer_for(call)

    assert (await cache(make_call(7), upstream)).cache == "miss"
    assert (await cache(make_call(7), upstream)).cache == "hit"
    shared.epochs["m"] = 1  # what the epoch refresh reads after a flush elsewhere
    assert (await cache(make_call(7), upstream)).cache == "miss"
    assert (await cache(make_call(7), upstream)).cache == "hit"
    shared.fleet_epoch = 1  # ... and after a flush of every model elsewhere
    assert (await cache(make_call(7), upstream)).cache == "miss"
    assert (await cache(make_call(7), upstream)).cache == "hit"


async def test_an_error_in_one_tfserving_form_is_not_shared_with_the_other_form() -> None:
    from sidecar.protocols import tfserving_rest

    cache = stage()
    release = asyncio.Event()
    asked: list[str] = []

    def tf_call(body: bytes) -> Call:
        req = tfserving_rest.decode_request("m", "", "", "predict", body)
        loop = asyncio.get_running_loop()
        return Call(req, "rid", loop.time() + 10, HttpWire(b"/v1/models/m:predict", (), body))

    async def upstream(call: Call) -> Reply:
        asked.append("row" if tfserving_rest.row_format(call.request) else "columnar")
        await release.wait()
        if tfserving_rest.row_format(call.request):
            return Reply(400, wire=HttpAnswer(400, b"Bad", (), b'{"error":"rows"}'), for_call=call)
        response = InferenceResponse(Protocol.TFSERVING_REST, "", outputs=call.request.inputs)
        return Reply(200, wire=HttpAnswer(200, b"OK", (), b"{}"), for_call=call, response=response)

    row = asyncio.create_task(cache(tf_call(b'{"instances": [[1.0]]}'), upstream))
    await asyncio.sleep(0)
    columns = asyncio.create_task(cache(tf_call(b'{"inputs": [[1.0]]}'), upstream))
    await asyncio.sleep(0)
    release.set()
    assert (await row).status == 400
    assert (await columns).status == 200 and asked == ["row", "columnar"]


@SETTINGS
@given(inference_responses(), st.floats(0, 1e9), st.integers(1, 10_000))
def test_the_tier_gives_back_what_it_was_given(response: InferenceResponse, stored_at: float, size: int) -> None:
    tier = MemoryTier(1 << 20)
    entry = Entry(response, stored_at, stored_at + 1e12, size)
    tier.put(digest(1), "m", entry)
    assert tier.get(digest(1)) == entry
    assert tier.get(digest(1)) == entry  # the second read comes from the objects kept for recent reads


def test_answers_held_are_invisible_to_the_garbage_collector() -> None:
    """A full collection walks every object it tracks: a large tier must not add to that walk."""
    import gc

    tier = MemoryTier(1 << 26)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(20_000):
        response = InferenceResponse(Protocol.KSERVE_HTTP, "m", "1", (Tensor("Y", "FP32", (1, 1), i.to_bytes(4)),),
                                     (("k", "v"),))
        tier.put(digest(i), "m", Entry(response, 0.0, 1e18, 300))
    for _ in range(3):  # each pass stops tracking the tuples whose contents the previous pass untracked
        gc.collect()
    assert len(tier) == 20_000
    assert len(gc.get_objects()) - before < 1_000  # not several objects per answer
    del tier


async def test_a_probe_whose_caller_leaves_does_not_leave_the_breaker_open_for_good() -> None:
    """The half-open breaker's one probe read is cancelled (its client disconnected): a later read probes."""
    from sidecar.cache.redis import RedisTier
    from sidecar.redis.client import RedisClient

    accepted: list[asyncio.StreamWriter] = []
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # a Redis that accepts and never answers
        connected.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    now = [100.0]
    breaker = Breaker(failures=1, cooldown=1.0, clock=lambda: now[0])
    client = RedisClient(f"redis://127.0.0.1:{port}/0", breaker)
    tier = RedisTier(client, "t", timeout=0.5)
    try:
        breaker.failure()
        assert breaker.state == "open"
        now[0] += 2  # the cooldown is over: the next read is the probe
        probe = asyncio.create_task(tier.get(b"k"))
        async with asyncio.timeout(5):
            await connected.wait()
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert breaker.allow()  # another probe may go
    finally:
        await tier.close()
        await client.close()
        server.close()
        for writer in accepted:
            writer.close()


async def test_a_follower_with_an_earlier_deadline_times_out_alone() -> None:
    from sidecar.errors import UpstreamTimeout

    cache = stage()
    release = asyncio.Event()

    async def upstream(call: Call) -> Reply:
        await release.wait()
        return answer_for(call)

    leader = asyncio.create_task(cache(make_call(8, "leader"), upstream))
    await asyncio.sleep(0)
    hasty = make_call(8, "hasty")
    hasty.deadline = asyncio.get_running_loop().time() + 0.05
    with pytest.raises(UpstreamTimeout):
        await cache(hasty, upstream)
    release.set()
    assert (await leader).cache == "miss"

"""The parts the data-plane workers stand on, in-process: the pod's one answer tier (LMDB, across real
processes), the CPU count behind ``workers: auto``, the pod-wide load view the batcher reads, the merging of
the workers' metrics and reports, the bounded outbox of observations, and cache generations that every
worker (a new one included) computes alike."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidecar import cpus
from sidecar.cache.entry import Entry, response_size
from sidecar.cache.generation import Generations
from sidecar.cache.podtier import PodTier, make_dir, remove_dir, remove_stale
from sidecar.calls import Call, GrpcWire, HttpAnswer, HttpWire, Memo, Reply
from sidecar.metrics import lasting, merge_families
from sidecar.planes import Demand
from sidecar.podload import PodLoad
from sidecar.protocols.request import InferenceResponse, Protocol, Tensor
from sidecar.workers.merge import merge_demand, merge_reports
from sidecar.workers.worker import OUTBOX_ITEMS, Outbox, worker_config
from tests.test_batcher_units import Upstream, batcher, call, identity, own_rows, request, until

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])


def answer(key: bytes, model: str = "m", floats: int = 4) -> Entry:
    """An answer that names its key: a wrong answer for a key is visible in its bytes."""
    data = (key * (floats * 4 // len(key) + 1))[: floats * 4]
    response = InferenceResponse(Protocol.KSERVE_HTTP, model, "1", (Tensor("Y", "FP32", (floats,), data),))
    now = time.time()
    return Entry(response, now, now + 60, response_size(response))


def answers_key(entry: Entry, key: bytes) -> bool:
    data = entry.response.outputs[0].data
    return data == (key * (len(data) // len(key) + 1))[: len(data)]


@pytest.fixture()
def tier_dir() -> Any:
    path = make_dir(1 << 20)
    yield path
    remove_dir(path)


# -- the pod's one answer tier ----------------------------------------------------------------------------

operations = st.lists(st.tuples(st.sampled_from(["put", "get", "remove", "flush", "flush_all", "touch"]),
                                st.integers(0, 40), st.sampled_from(["a", "b", "c"]), st.integers(1, 80)),
                      max_size=120)


@SETTINGS
@given(ops=operations)
def test_the_pod_tier_keeps_its_budget_and_its_books_and_never_answers_for_another_key(ops: list[Any]) -> None:
    path = make_dir(1 << 20)
    tier = PodTier(path, 8_000)
    stored: dict[bytes, str] = {}
    try:
        for op, n, model, floats in ops:
            key = n.to_bytes(2, "big") * 16
            if op == "put":
                if tier.put(key, model, answer(key, model, floats)):
                    stored[key] = model
            elif op == "get":
                found = tier.get(key)
                assert found is None or answers_key(found, key)
            elif op == "remove":
                tier.remove(key)
            elif op == "flush":
                tier.flush(model)
                assert not any(tier.get(k) for k, m in stored.items() if m == model)
            elif op == "flush_all":
                tier.flush()
                assert len(tier) == 0 and tier.used == 0
            else:
                tier.touch()
            assert tier.used <= tier.max_bytes
            assert tier.entries_by_model() == tier.accounted()
            assert sum(n for n, _ in tier.accounted().values()) == len(tier)
            assert sum(b for _, b in tier.accounted().values()) == tier.used
    finally:
        tier.close()
        remove_dir(path)


def test_eviction_keeps_what_was_hit_and_counts_pod_wide(tier_dir: str) -> None:
    tier = PodTier(tier_dir, 4 * answer(b"k" * 32).size)
    keys = [bytes([i]) * 32 for i in range(4)]
    for key in keys:
        assert tier.put(key, "m", answer(key))
    for _ in range(3):
        assert tier.get(keys[0]) is not None  # popular, and recently used
    tier.touch()
    newcomer = b"n" * 32
    for _ in range(2):
        tier.get(newcomer)  # asked for (a miss) before it is stored: as popular as the others
    assert tier.put(newcomer, "m", answer(newcomer))
    assert tier.get(keys[0]) is not None and tier.get(keys[1]) is None  # the least recently used went
    assert tier.evictions == 1 and len(tier) == 4


def _writer(path: str, keys: list[bytes], rounds: int) -> None:
    tier = PodTier(path, 200_000)
    for _ in range(rounds):
        for key in keys:
            tier.put(key, "m", answer(key))
            found = tier.get(key[::-1])
            assert found is None or answers_key(found, key[::-1])
    tier.close()


def test_processes_share_answers_and_never_cross_them(tier_dir: str) -> None:
    keys = [os.urandom(32) for _ in range(300)]
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(tier_dir, keys[i::2], 5)) for i in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    tier = PodTier(tier_dir, 200_000)
    found = [tier.get(key) for key in keys]
    assert all(f is not None and answers_key(f, k) for f, k in zip(found, keys, strict=True))
    assert tier.used <= 200_000 and tier.entries_by_model() == tier.accounted()
    tier.close()


def test_tiers_of_control_processes_that_are_gone_are_removed(tmp_path: Path) -> None:
    dead_pid = subprocess.Popen(["true"])  # a pid that has exited
    dead_pid.wait()
    names = {"dead": f"warm-sidecar-cache-{dead_pid.pid}-x1", "mine": f"warm-sidecar-cache-{os.getpid()}-x2",
             "alive": f"warm-sidecar-cache-{os.getppid()}-x3", "other": "something-else"}
    for name in names.values():
        (tmp_path / name).mkdir()
    remove_stale(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["alive"], names["other"]])


# -- workers: auto ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: 2 workers, each busy part of the time
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),  # no quota: the affinity
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_auto_is_the_cgroup_quota_within_the_affinity(tmp_path: Path, files: dict[str, str],
                                                      expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    want = affinity if expected is None else max(1, min(expected, affinity))
    assert cpus.workers("auto", tmp_path) == want
    assert cpus.workers("3", tmp_path) == 3


# -- the pod-wide load view -------------------------------------------------------------------------------


def test_each_worker_writes_its_row_and_reads_the_others(tmp_path: Path) -> None:
    path = str(tmp_path / "load")
    first, second = PodLoad(path, 2, 0), PodLoad(path, 2, 1)
    first.set("m", 3)
    second.set("m", 2)
    second.set("n", 1)
    assert first.others("m") == 2 and second.others("m") == 3 and first.others("n") == 1
    first.clear(1)  # worker 1 died
    assert first.others("m") == 0 and first.others("n") == 0 and second.others("m") == 3


def test_a_free_place_goes_to_the_worker_whose_call_waited_longest(tmp_path: Path) -> None:
    path = str(tmp_path / "load")
    first, second = PodLoad(path, 2, 0), PodLoad(path, 2, 1)
    assert first.claim("m", 0, 1)  # free: taken
    assert not second.claim("m", 0, 1)  # one place, taken by the other worker
    second.waiting("m", time.monotonic() - 1)  # second's oldest call waits since a second ago
    first.waiting("m", time.monotonic())
    first.set("m", 0)  # first's call came back
    assert not first.claim("m", 0, 1)  # the place goes to the longer wait, not to whoever asks first
    assert second.claim("m", 0, 1)
    second.set("m", 0)
    second.waiting("m", None)
    assert first.claim("m", 0, 2) and first.claim("m", 1, 2) and not second.claim("m", 0, 2)


class OthersBusy:
    """The other workers' side of the load view: ``busy`` calls in flight there."""

    def __init__(self, busy: int) -> None:
        self.busy = busy

    def set(self, model: str, in_flight: int) -> None:
        pass

    def waiting(self, model: str, since: float | None) -> None:
        pass

    def others(self, model: str) -> int:
        return self.busy

    def claim(self, model: str, in_flight: int, limit: int) -> bool:
        return self.busy + in_flight < limit


async def test_a_model_busy_in_other_workers_gathers_calls_here_and_they_leave_when_it_frees() -> None:
    stage, upstream = batcher(), Upstream()
    stage.pod_load = OthersBusy(1)  # type: ignore[assignment]  # the other worker has the model's one slot
    tasks = [asyncio.create_task(stage(call(float(i)), upstream)) for i in range(4)]
    await asyncio.sleep(0.01)
    assert upstream.calls == []  # busy pod-wide: nothing goes alone, all four wait
    stage.pod_load.busy = 0  # type: ignore[union-attr]  # the other worker's call came back
    replies = await asyncio.gather(*tasks)
    assert len(upstream.calls) == 1 and (upstream.calls[0].wire is None)  # they left together, long before
    assert all(own_rows(r, float(i)) for i, r in enumerate(replies))      # max_delay's 50 ms, each its own rows


class OnePlace:
    """A model server that runs one call at a time (an identity model); counts the most ever at once."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self.calls: list[Call] = []

    async def __call__(self, call: Call) -> Reply:
        self.calls.append(call)
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(0.01)
        finally:
            self.now -= 1
        return Reply(200, wire=HttpAnswer(200, b"OK", (), b""), for_call=call, response=identity(call.request))


async def test_two_workers_batchers_take_turns_at_the_models_one_place(tmp_path: Path) -> None:
    path = str(tmp_path / "load")
    workers = [batcher(max_delay=1.0), batcher(max_delay=1.0)]
    for i, stage in enumerate(workers):
        stage.pod_load = PodLoad(path, 2, i)
    upstream = OnePlace()
    rng = random.Random(7)

    async def caller(i: int) -> Reply:
        await asyncio.sleep(rng.random() * 0.1)
        return await workers[i % 2](call(float(i)), upstream)

    replies = await asyncio.gather(*(caller(i) for i in range(60)))
    assert all(own_rows(r, float(i)) for i, r in enumerate(replies))
    assert upstream.peak == 1  # never two calls at once: the place is the pod's, not each worker's
    assert len(upstream.calls) < 30  # they gathered into batches while the other worker's ran


# -- merging the workers' metrics and reports ---------------------------------------------------------------


def families(requests: float, in_flight: float, state: float, evictions: float) -> list[Metric]:
    counter = CounterMetricFamily("sidecar_requests", "r", labels=["route"])
    counter.add_metric(["infer"], requests)
    flight = GaugeMetricFamily("sidecar_in_flight_requests", "f")
    flight.add_metric([], in_flight)
    gauge = GaugeMetricFamily("sidecar_warm_capacity", "w")
    gauge.add_metric([], state)
    evicted = CounterMetricFamily("sidecar_cache_evictions", "e")
    evicted.add_metric([], evictions)
    return [counter, flight, gauge, evicted]


def values(merged: list[Metric]) -> dict[str, float]:
    return {s.name: s.value for f in merged for s in f.samples}


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 100), st.sampled_from([0.0, 0.5, 1.0])),
                min_size=1, max_size=8), st.integers(0, 1000))
def test_counters_add_up_in_flight_adds_up_and_shared_facts_show_once(workers: list[tuple[int, int, float]],
                                                                      evictions: int) -> None:
    merged = values(merge_families([families(r, f, s, evictions) for r, f, s in workers]))
    assert merged["sidecar_requests_total"] == sum(r for r, _, _ in workers)
    assert merged["sidecar_in_flight_requests"] == sum(f for _, f, _ in workers)
    assert merged["sidecar_warm_capacity"] == max(s for _, _, s in workers)
    assert merged["sidecar_cache_evictions_total"] == evictions  # the pod's tier: the same in every worker


def test_a_dead_workers_counters_outlive_it_and_its_gauges_do_not() -> None:
    kept = lasting(families(7, 3, 1.0, 5))
    assert [f.name for f in kept] == ["sidecar_requests"]
    assert values(merge_families([kept, families(2, 1, 1.0, 5)]))["sidecar_requests_total"] == 9


def test_reports_add_counts_and_show_the_pod_tier_once() -> None:
    one = {"cache": {"entries": 5, "bytes": 500, "models": {"m": {"hits": 3, "misses": 1, "redis_hits": 0,
                                                                  "coalesced": 0, "entries": 5, "hit_ratio": 0.75}}},
           "batch": {"m": {"in_flight": 1, "max_batch": 8, "stopped": False, "latency_ms": {"1": 2.0}}}}
    two = {"cache": {"entries": 5, "bytes": 500, "models": {"m": {"hits": 0, "misses": 1, "redis_hits": 0,
                                                                  "coalesced": 0, "entries": 5, "hit_ratio": 0.0}}},
           "batch": {"m": {"in_flight": 2, "max_batch": 8, "stopped": True, "latency_ms": {"1": 3.0}}}}
    merged = merge_reports([one, two])
    assert merged["cache"]["entries"] == 5 and merged["cache"]["models"]["m"]["hits"] == 3
    assert merged["cache"]["models"]["m"]["hit_ratio"] == 0.6
    assert merged["batch"]["m"] == {"in_flight": 3, "max_batch": 8, "stopped": True, "latency_ms": {"1": 2.0}}
    assert merge_demand([Demand({"m": 2.0}, {"m": 1.0}), Demand({"m": 3.0, "n": 1.0}, {})]) == Demand(
        {"m": 5.0, "n": 1.0}, {"m": 1.0})


def test_limits_are_shared_out_among_the_workers() -> None:
    from sidecar.config import Config, LimitsConfig

    cfg = Config(limits=LimitsConfig(max_connections=1000, max_inflight_bytes=1 << 30))
    share = worker_config(cfg, 4).limits
    assert share.max_connections == 250 and share.max_inflight_bytes == 1 << 28


# -- the outbox -------------------------------------------------------------------------------------------


class Channel:
    def __init__(self, pending: int = 0) -> None:
        self.pending = pending
        self.sent: list[tuple[Any, ...]] = []

    def send(self, *message: Any) -> None:
        self.sent.append(message)


async def test_observations_go_up_in_batches_without_payload_bytes_or_front_memos() -> None:
    channel = Channel()
    outbox = Outbox(channel, max_payload_bytes=1 << 20)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    req = request(np.ones((1, 2)))
    seen = Call(req, "r1", loop.time() + 5, HttpWire(b"/v2/models/m/infer", ((b"authorization", b"x"),), b"{}"))
    outbox.seen(seen)
    outbox.batched("m", "s", 4)
    outbox.upstream_failed()
    await until(lambda: channel.sent)
    assert len(channel.sent) == 1
    kind, items, dropped = channel.sent[0]
    assert kind == "obs" and dropped == 0 and [k for k, _, _ in items] == ["seen", "batched", "upstream_failed"]
    sent_call = items[0][1][0]
    assert sent_call.wire is None and sent_call.memo is None and sent_call.request is req


async def test_repeats_within_a_batch_go_up_once_with_their_count() -> None:
    channel = Channel()
    outbox = Outbox(channel, max_payload_bytes=1 << 20)  # type: ignore[arg-type]
    req = request(np.ones((1, 2)))
    memo = Memo(req)
    for i in range(5):  # byte-identical calls share the front's memo
        outbox.seen(Call(req, f"r{i}", 0.0, HttpWire(b"/v2/models/m/infer", (), b"{}"), memo=memo))
    outbox.seen(Call(req, "other-tenant", 0.0, HttpWire(b"/", (), b"{}"), memo=memo, private=True, scope=b"t"))
    outbox.seen(Call(req, "no-memo", 0.0, HttpWire(b"/", (), b"{}")))
    for _ in range(7):
        outbox.touched("m")
    await until(lambda: channel.sent)
    (_, items, _), = channel.sent
    assert [(k, n) for k, _, n in items] == [("seen", 5), ("seen", 1), ("seen", 1), ("touched", 7)]


async def test_a_large_call_goes_up_as_its_key_alone_and_is_never_kept() -> None:
    channel = Channel()
    outbox = Outbox(channel, max_payload_bytes=16)  # type: ignore[arg-type]
    req = request(np.ones((1, 64)))
    outbox.seen(Call(req, "r1", 0.0, GrpcWire("/m", b"x" * 300, ())))
    await until(lambda: channel.sent)
    sent_call = channel.sent[0][1][0][1][0]
    assert all(t.data == b"" for t in sent_call.request.inputs) and not sent_call.shareable
    assert sent_call.memo.record_key and sent_call.memo.request is sent_call.request


async def test_an_outbox_the_control_process_does_not_read_drops_and_counts() -> None:
    outbox = Outbox(Channel(pending=1 << 30), max_payload_bytes=1 << 20)  # type: ignore[arg-type]
    for i in range(10):
        outbox.touched(f"m{i}")
    assert outbox.dropped == 10 and not outbox.items
    full = Outbox(Channel(), max_payload_bytes=1 << 20)  # type: ignore[arg-type]
    for i in range(OUTBOX_ITEMS + 5):
        full.touched(f"m{i}")
    assert full.dropped == 5 and len(full.items) == OUTBOX_ITEMS


# -- generations every worker computes alike --------------------------------------------------------------


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.dictionaries(st.sampled_from("mn"),
                                                                                 st.integers(0, 5))),
                min_size=1, max_size=10))
def test_a_new_worker_computes_the_keys_the_others_do(history: list[tuple[int, int, dict[str, int]]]) -> None:
    veteran, newcomer = Generations(), Generations()
    keys = set()
    for restarts, flush_all, flushes in history:
        veteran.follow(restarts, flush_all, flushes)
        keys.add(veteran.key("m"))
    restarts, flush_all, flushes = history[-1]
    newcomer.follow(restarts, flush_all, flushes)
    assert newcomer.key("m") == veteran.key("m") and newcomer.key("n") == veteran.key("n")
    if len({(r, a, f.get("m", 0)) for r, a, f in history}) > 1:
        assert len(keys) > 1  # a flush moved the key


def test_a_flush_names_what_it_made_unreachable() -> None:
    g = Generations()
    assert g.follow(0, 0, {}) == set()
    assert g.follow(0, 0, {"m": 1}) == {"m"}
    assert g.follow(1, 0, {"m": 1}) == {"*"}
    g.follow_fleet("m", (0, 1))
    assert g.key("m") != Generations().key("m")

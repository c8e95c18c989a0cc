"""The traffic store, against both backends: an SQLite file and a real redis-server.

Time is an injected clock, so decay and payload expiry are tested without sleeping.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.redis.client import RedisClients
from sidecar.redis.urls import redact as redact_url
from sidecar.warmup.store import RESCALE_AFTER, Sample, StoreLimits, TrafficStore, open_store
from tests.servers import RedisServer

HALF_LIFE = 100.0
T0 = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis-store")) as server:
        yield server


Opener = Callable[..., TrafficStore]


@pytest.fixture(params=["sqlite", "redis"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens stores sharing one backing (one file, one Redis namespace), like replicas of one fleet."""
    location = request.getfixturevalue("redis").url if request.param == "redis" else str(tmp_path / "t.db")
    namespace = f"test-{uuid.uuid4().hex[:8]}"  # tests sharing the module's Redis never see each other
    opened: list[TrafficStore] = []

    def open_(clock: Clock, **limits: float) -> TrafficStore:
        base = StoreLimits(half_life=HALF_LIFE, payload_ttl=1000.0, namespace=namespace)
        store = open_store(location, dataclasses.replace(base, **limits), clock=clock)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()


def sample(key: str, count: int = 1, *, model: str = "m", batch: int = 1, payload: bytes | None = None) -> Sample:
    shape = f"INPUT0:FP32[{batch},4]"
    return Sample(model, key, shape, batch, count, payload if payload is not None else f"body-{key}".encode())


async def weights(store: TrafficStore, model: str = "m") -> dict[str, float]:
    return {r.key: round(r.weight, 6) for r in await store.top(model, 100)}


async def test_replicas_merge_counts_and_rank_by_weight(opener: Opener) -> None:
    clock = Clock()
    one, two = opener(clock), opener(clock)
    await one.add([sample("a", 3), sample("b", 1)])
    await two.add([sample("b", 5), sample("c", 1, model="other")])
    top = await one.top("m", 10)
    assert [(r.key, r.weight, r.payload) for r in top] == [("b", 6.0, b"body-b"), ("a", 3.0, b"body-a")]
    assert await two.models() == [("m", 9.0), ("other", 1.0)]


async def test_weights_halve_every_half_life(opener: Opener) -> None:
    clock = Clock()
    store = opener(clock, payload_ttl=1e9)
    await store.add([sample("old", 8)])
    clock.now += HALF_LIFE
    await store.add([sample("new", 5)])
    assert await weights(store) == {"new": 5.0, "old": 4.0}
    clock.now += 2 * HALF_LIFE
    assert await weights(store) == {"new": 1.25, "old": 1.0}
    # Long after (past the rescale point), sums and ranking still hold.
    clock.now += (RESCALE_AFTER + 8) * HALF_LIFE
    await store.add([sample("old", 1)])
    assert list(await weights(store)) == ["old", "new"]
    assert (await weights(store))["old"] == pytest.approx(1.0, rel=1e-6)


async def test_shape_histogram_counts_every_batch_size(opener: Opener) -> None:
    store = opener(Clock())
    await store.add([sample("a", 4, batch=1), sample("b", 2, batch=8), sample("c", 1, batch=8)])
    assert await store.shapes("m") == [("INPUT0:FP32[1,4]", 1, 4.0), ("INPUT0:FP32[8,4]", 8, 3.0)]


async def test_payload_over_the_entry_limit_is_not_kept_but_counts(opener: Opener) -> None:
    store = opener(Clock(), max_payload_bytes=10)
    await store.add([sample("big", 5, payload=b"x" * 11), sample("small", 1, payload=b"x" * 10)])
    assert await weights(store) == {"small": 1.0}  # top() holds only what can be replayed
    assert await store.models() == [("m", 6.0)]


async def test_total_budget_drops_the_lightest_payloads(opener: Opener) -> None:
    store = opener(Clock(), max_total_bytes=250)
    await store.add([sample(k, n, payload=bytes(100)) for k, n in (("a", 3), ("b", 1), ("c", 2))])
    assert await weights(store) == {"a": 3.0, "c": 2.0}


async def test_capacity_keeps_the_heaviest_entries(opener: Opener) -> None:
    store = opener(Clock(), capacity=3)
    await store.add([sample(k, n) for k, n in (("a", 5), ("b", 1), ("c", 4), ("d", 2), ("e", 3))])
    assert list(await weights(store)) == ["a", "c", "e"]


async def test_payloads_expire_when_not_seen_for_the_ttl(opener: Opener) -> None:
    clock = Clock()
    store = opener(clock, payload_ttl=50.0)
    await store.add([sample("a", 2), sample("b", 1)])
    clock.now += 40
    await store.add([sample("b", 1, payload=b"")])  # seen again: b's payload lives on
    clock.now += 20
    assert list(await weights(store)) == ["b"]
    await store.add([sample("a", 1)])  # the recorder resends a payload it saw expire
    assert set(await weights(store)) == {"a", "b"}


async def test_redis_down_means_no_memory_never_an_error(redis: RedisServer) -> None:
    # The sidecar's Redis client layer, its breaker's cooldown at 0: once Redis is back the next call probes it.
    clients = RedisClients(failures=3, cooldown=0.0)
    store = open_store(redis.url, StoreLimits(namespace=f"down-{uuid.uuid4().hex[:8]}"), redis=clients)
    try:
        await store.add([sample("a", 1)])
        assert await weights(store) == {"a": 1.0}
        redis.kill()
        await store.add([sample("b", 1)])  # neither raises nor hangs
        assert store.dropped == 1
        assert await store.top("m", 10) == [] and await store.models() == [] and await store.shapes("m") == []
        redis.start()  # persistence is off: it comes back empty, and the store uses it again
        await store.add([sample("c", 1)])
        assert await weights(store) == {"c": 1.0}
    finally:
        await store.close()
        await clients.close()
        if not redis.running:
            redis.start()


def aside(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith("traffic.db.corrupt-")]


async def test_an_unreadable_sqlite_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "traffic.db"
    path.write_bytes(b"this is not a database" * 100)
    store = open_store(str(path), StoreLimits())
    try:
        await store.add([sample("a", 1)])
        assert await weights(store) == {"a": 1.0}
        assert len(aside(tmp_path)) == 1
    finally:
        await store.close()
    with pytest.raises(ConfigError, match="cannot open SQLite file"):
        open_store(str(tmp_path / "traffic.db" / "nested"), StoreLimits())


def test_store_urls_never_show_credentials() -> None:
    assert redact_url("redis://user:s3cret@redis.example:6380/2?password=x") == "redis://redis.example:6380/2"
    assert redact_url("unix:///run/redis.sock?password=x") == "unix:///run/redis.sock"
    assert "s3cret" not in open_store("rediss://:s3cret@h:1/0", StoreLimits()).describe()


def disk_usage(path: Path) -> int:
    """The database file and its write-ahead log and index."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


async def test_sqlite_keeps_to_its_byte_budget_on_disk(tmp_path: Path) -> None:
    """Data file plus write-ahead log stay near the payload budget, however much passes through."""
    budget = 16 * 1024 * 1024
    path = tmp_path / "t.db"
    clock = Clock()
    store = open_store(str(path), StoreLimits(max_total_bytes=budget, max_payload_bytes=1 << 20, capacity=400,
                                              half_life=HALF_LIFE, payload_ttl=1000.0), clock=clock)
    try:
        for round_ in range(6):  # 6 x 40 MiB of distinct payloads through a 16 MiB budget
            clock.now += 1
            await store.add([sample(f"r{round_}-{i}", 1 + i % 3, payload=bytes([i % 251]) * (1 << 20))
                             for i in range(40)])
        on_disk = disk_usage(path)
        assert on_disk <= budget * 1.25 + 4 * 1024 * 1024, on_disk
        assert len(await store.top("m", 400)) > 0
    finally:
        await store.close()

"""The recorder stage in-process, over a real SQLite traffic store: what it keeps, and that it never waits."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import orjson

from sidecar.config import RecordConfig
from sidecar.metrics import Metrics
from sidecar.pipeline.recorder import Recorder
from sidecar.pipeline.stage import Call, HttpAnswer, HttpWire, Reply
from sidecar.protocols import kserve_http
from sidecar.warmup import payload
from sidecar.warmup.store import StoreLimits, TrafficStore, open_store

JSON = ((b"Content-Type", b"application/json"),)


def call(model: str, value: float, batch: int = 1) -> Call:
    body = orjson.dumps({"inputs": [{"name": "X", "shape": [batch, 2], "datatype": "FP32",
                                     "data": [value, value] * batch}]})
    request = kserve_http.decode_request(model, "", body, None)
    return Call(request, "rid", 0.0, HttpWire(f"/v2/models/{model}/infer".encode(), JSON, body))


def answer(status: int) -> object:
    async def next_(_call: Call) -> Reply:
        return Reply(status, wire=HttpAnswer(status, b"", (), b"{}"), for_call=_call)

    return next_


def recorder(tmp_path: Path, **cfg: object) -> tuple[Recorder, TrafficStore, Metrics]:
    store = open_store(str(tmp_path / "t.db"), StoreLimits())
    metrics = Metrics()
    config = dataclasses.replace(RecordConfig(), **cfg)  # type: ignore[arg-type]
    return Recorder(config, store, metrics, capacity=64), store, metrics


async def test_counts_shapes_and_payloads_reach_the_store(tmp_path: Path) -> None:
    rec, store, _ = recorder(tmp_path)
    for c in [call("m", 1.0)] * 3 + [call("m", 2.0, batch=4), call("other", 1.0)]:
        assert (await rec(c, answer(200))).status == 200  # type: ignore[arg-type]
    await rec.close()  # drains the queue and flushes, as on SIGTERM
    top = await store.top("m", 10)
    assert [(round(r.weight, 3), r.batch) for r in top] == [(3.0, 1), (1.0, 4)]  # real clock: a hair of decay
    replay = payload.decode(top[0].payload)
    wire = call("m", 1.0).wire
    assert wire is not None
    assert (replay.path, replay.body, replay.headers) == ("/v2/models/m/infer", wire.body,
                                                          (("Content-Type", "application/json"),))
    assert replay.to_request() == call("m", 1.0).request
    assert {m: round(w, 3) for m, w in await store.models()} == {"m": 4.0, "other": 1.0}
    await store.close()


async def test_only_answered_calls_of_allowed_models_are_recorded(tmp_path: Path) -> None:
    rec, store, _ = recorder(tmp_path, models=("m",))
    await rec(call("m", 1.0), answer(400))  # type: ignore[arg-type]
    await rec(call("skipped", 1.0), answer(200))  # type: ignore[arg-type]
    await rec(call("m", 2.0), answer(200))  # type: ignore[arg-type]
    await rec.close()
    assert [m for m, _ in await store.models()] == ["m"]
    assert len(await store.top("m", 10)) == 1
    await store.close()


async def test_a_full_queue_is_counted_never_waited_for(tmp_path: Path) -> None:
    rec, store, metrics = recorder(tmp_path, queue_size=2)
    async with asyncio.timeout(5):  # nothing consumes the queue: a put that waited would hang here
        for i in range(5):
            await rec(call("m", float(i)), answer(200))  # type: ignore[arg-type]
    assert metrics.record_dropped._value.get() == 3
    await rec.close()
    assert len(await store.top("m", 10)) == 2
    await store.close()


async def test_the_queue_is_bounded_in_bytes_too(tmp_path: Path) -> None:
    one = len(call("m", 0.0).wire.body)  # type: ignore[union-attr]
    rec, store, metrics = recorder(tmp_path, queue_bytes=2 * one + 1)
    for i in range(5):
        await rec(call("m", float(i)), answer(200))  # type: ignore[arg-type]
    assert metrics.record_dropped._value.get() == 3
    await rec.close()
    assert len(await store.top("m", 10)) == 2
    await store.close()


async def test_a_call_that_cannot_be_recorded_is_dropped_and_counted(tmp_path: Path) -> None:
    rec, store, metrics = recorder(tmp_path)
    broken = call("m", 1.0)
    broken.request = None  # type: ignore[assignment]  # whatever goes wrong with one call
    await rec(broken, answer(200))  # type: ignore[arg-type]
    await rec(call("m", 2.0), answer(200))  # type: ignore[arg-type]
    await rec.close()
    assert metrics.record_errors._value.get() == 1
    assert len(await store.top("m", 10)) == 1
    await store.close()


async def test_bodies_over_the_limit_are_counted_but_not_kept(tmp_path: Path) -> None:
    rec, store, _ = recorder(tmp_path, max_payload_bytes=16)
    await rec(call("m", 1.0), answer(200))  # type: ignore[arg-type]
    await rec.close()
    assert await store.top("m", 10) == []  # nothing to replay
    assert [(shape, batch, round(w, 3)) for shape, batch, w in await store.shapes("m")] == [("X:FP32[1,2]", 1, 1.0)]
    await store.close()


async def test_memory_between_flushes_is_bounded_by_the_sketch(tmp_path: Path) -> None:
    rec, store, _ = recorder(tmp_path)
    for i in range(500):  # 500 distinct calls, capacity 64, no flush in between
        await rec(call("m", float(i)), answer(200))  # type: ignore[arg-type]
        await rec._drain()
    memory = rec._models["m"]
    assert len(memory.meta) <= 64 and set(memory.meta) == {k for k, _, _ in memory.sketch.items()}
    await rec.close()
    await store.close()

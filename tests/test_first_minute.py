"""The first minute after launch, against a real Triton and a real Redis: the pod is ready once warm-up has
measured each shape (not once every recorded call ran), the recorded calls it did not need fill the cache
behind readiness in batches, and a pod whose fleet already holds the answers takes them from Redis without
asking the model server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from sidecar.identity import batch_size, request_key, shape_signature
from sidecar.protocols import kserve_http
from sidecar.warmup import payload
from sidecar.warmup.replayer import _SAMPLE
from sidecar.warmup.store import Sample, StoreLimits, open_store
from tests.servers import MODELS_DIR, RedisServer, TritonServer, wait_until
from tests.sidecar_proc import SidecarProcess
from tests.wire import exchange

MODEL = "identity_fp32"
JSON = {"Content-Type": "application/json"}
RECORDED = 60  # distinct recorded calls: far more than warm-up measures (_SAMPLE per shape and pass)


def body(value: float) -> bytes:
    return orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": "FP32",
                                     "data": [value, -value, 0.5]}]})


def status(proc: SidecarProcess) -> dict:  # type: ignore[type-arg]
    return orjson.loads(exchange(proc.admin_url, "GET", "/status?format=json").body)


def filled(proc: SidecarProcess) -> dict | None:  # type: ignore[type-arg]
    fill = status(proc)["cache_fill"].get(MODEL)
    return fill if fill is not None and fill["left"] == 0 and fill["seconds"] is not None else None


@pytest.fixture()
def triton(tmp_path: Path) -> Iterator[TritonServer]:
    with TritonServer(MODELS_DIR, tmp_path / "triton", models=[MODEL]) as server:
        yield server


@pytest.fixture()
def store(tmp_path: Path) -> str:
    """Another replica's memory: RECORDED distinct calls of MODEL, the first seen most (a Zipf-like share)."""
    async def fill(path: str) -> str:
        traffic = open_store(path, StoreLimits(capacity=4 * RECORDED))
        samples = []
        for i in range(RECORDED):
            request = kserve_http.decode_request(MODEL, "", body(float(i)), None)
            samples.append(Sample(MODEL, request_key(request), shape_signature(request), batch_size(request),
                                  RECORDED - i, payload.encode(payload.RecordedCall.canonical(request))))
        await traffic.add(samples)
        await traffic.close()
        return path

    return asyncio.run(fill(str(tmp_path / "traffic.db")))


ARGS = ["--set", f"cache.models={MODEL}", "--set", f"batch.models={MODEL}", "--set", "record.coverage=1",
        "--set", "upstream.health_interval=0.25"]


def test_ready_after_measuring_then_the_rest_fills_the_cache_in_batches(triton: TritonServer, store: str,
                                                                         tmp_path: Path) -> None:
    with SidecarProcess(triton.url, tmp_path / "a", "triton", ["--store", store, *ARGS]) as sidecar:
        report = status(sidecar)
        planned = next(m for m in report["plan"] if m["model"] == MODEL)
        assert planned["covered"] == 1.0 and sum(c["kind"] == "recorded" for c in planned["calls"]) == RECORDED
        fill = wait_until(lambda: filled(sidecar), 30, "the cache filled behind readiness")
        # Warm-up measured samples of the one shape; the rest came after ready.
        assert fill["planned"] >= RECORDED - 2 * _SAMPLE and fill["failed"] == 0
        assert fill["from_model"] + fill["from_cache"] == fill["planned"]
        # Every recorded call is now a hit: its own answer, as the model server gives it.
        for i in range(RECORDED):
            answer = exchange(sidecar.url, "POST", f"/v2/models/{MODEL}/infer", body(float(i)), JSON)
            direct = exchange(triton.url, "POST", f"/v2/models/{MODEL}/infer", body(float(i)), JSON)
            assert answer.status == 200 and answer.header("x-sidecar-cache") == "hit"
            assert orjson.loads(answer.body)["outputs"] == orjson.loads(direct.body)["outputs"]


def test_a_pod_whose_fleet_holds_the_answers_fills_from_redis(triton: TritonServer, store: str, tmp_path: Path,
                                                              redis_server: RedisServer) -> None:
    # Redis answers within ms here, but a CI machine running other test modules beside this one can hold a read
    # past the default 5 ms timeout (and its breaker then sends the fill to the model): not what this tests.
    fleet = ["--set", f"cache.redis={redis_server.url}", "--set", "cache.redis_timeout=1"]
    with SidecarProcess(triton.url, tmp_path / "a", "triton", ["--store", store, *ARGS, *fleet]) as first:
        wait_until(lambda: filled(first), 30, "the first replica's cache filled")
    with SidecarProcess(triton.url, tmp_path / "b", "triton", ["--store", store, *ARGS, *fleet]) as second:
        fill = wait_until(lambda: filled(second), 30, "the second replica's cache filled")
        assert fill["from_cache"] == fill["planned"] and fill["from_model"] == 0, fill

"""The batcher against a real Triton: concurrent calls arrive as one upstream call, each caller gets
exactly its own rows (JSON and binary callers mixed), a poisoned member fails alone, a killed model
server fails every member promptly, and one caller at a time is never held back.

Calls reaching the server are counted at the server itself (Triton's statistics API).
"""

from __future__ import annotations

import concurrent.futures
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient

from tests.servers import MODELS_DIR, TritonServer, wait_until
from tests.sidecar_proc import SidecarProcess
from tests.wire import Answer, exchange

JSON = {"Content-Type": "application/json"}
MODELS = ["identity_fp32", "picky", "slow"]


def json_call(values: list[float], request_id: str, binary: bool = False, delay: float | None = None) -> bytes:
    body: dict[str, object] = {"id": request_id, "inputs": [{"name": "INPUT0", "shape": [1, len(values)],
                                                              "datatype": "FP32", "data": values}]}
    if binary:
        body["outputs"] = [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]
    if delay is not None:
        body["parameters"] = {"delay": delay}
    return orjson.dumps(body)


def output_of(answer: Answer) -> tuple[str, list[float]]:
    """(id, OUTPUT0 values) of an answer in either encoding."""
    length = answer.header("Inference-Header-Content-Length")
    result = httpclient.InferenceServerClient.parse_response_body(answer.body, header_length=int(length) if length
                                                                  else None)
    return result.get_response()["id"], result.as_numpy("OUTPUT0").ravel().tolist()


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with TritonServer(MODELS_DIR, tmp_path_factory.mktemp("batch-triton"), models=MODELS) as server:
        yield server


@pytest.fixture(scope="module")
def batching(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    args = ["--set", "batch.models=identity_fp32,picky,slow", "--set", "batch.max_delay=0.05"]
    with SidecarProcess(triton.url, tmp_path_factory.mktemp("batching"), "triton", args) as proc:
        yield proc


def concurrently(url: str, path: str, bodies: list[bytes]) -> list[Answer]:
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: exchange(url, "POST", path, b, JSON), bodies))


def test_concurrent_callers_share_upstream_calls_and_get_their_own_rows(triton: TritonServer,
                                                                        batching: SidecarProcess) -> None:
    rng = random.Random(3)
    callers = 48
    values = [[rng.uniform(-1e3, 1e3) for _ in range(3)] for _ in range(callers)]
    bodies = [json_call(v, f"caller-{i}", binary=i % 2 == 1) for i, v in enumerate(values)]
    before = triton.model_counts("identity_fp32")
    answers = concurrently(batching.url, "/v2/models/identity_fp32/infer", bodies)
    assert all(a.status == 200 for a in answers)
    for i, answer in enumerate(answers):
        request_id, out = output_of(answer)
        assert request_id == f"caller-{i}"
        np.testing.assert_array_equal(np.float32(out), np.float32(values[i]))
        assert bool(answer.header("Inference-Header-Content-Length")) == (i % 2 == 1)  # its own encoding
    inferences, batches = triton.counts_since("identity_fp32", before, callers)  # a batch is one execution
    assert inferences == callers and batches < callers  # fewer upstream calls than callers


def test_a_poisoned_member_fails_alone(triton: TritonServer, batching: SidecarProcess) -> None:
    values = [float(v) for v in range(1, 17)]  # 13 is poison to the model
    bodies = [json_call([v, v], f"p{int(v)}", delay=None) for v in values]
    answers = concurrently(batching.url, "/v2/models/picky/infer", bodies)
    for v, answer in zip(values, answers, strict=True):
        if v == 13.0:
            assert answer.status != 200 and "poisoned" in orjson.loads(answer.body)["error"]
        else:
            assert answer.status == 200 and output_of(answer) == (f"p{int(v)}", [v, v])


def test_callers_with_other_non_batch_dimensions_never_mix(triton: TritonServer, batching: SidecarProcess) -> None:
    bodies = [json_call([float(i)] * (2 + i % 3), f"w{i}") for i in range(24)]
    answers = concurrently(batching.url, "/v2/models/identity_fp32/infer", bodies)
    for i, answer in enumerate(answers):
        assert answer.status == 200 and output_of(answer) == (f"w{i}", [float(i)] * (2 + i % 3))


def test_one_caller_at_a_time_is_never_held_back(triton: TritonServer, batching: SidecarProcess) -> None:
    """At low load a call goes at once, alone and untouched: no queue delay recorded, batch size 1."""
    def waited_count() -> float:
        text = exchange(batching.admin_url, "GET", "/metrics").body.decode()
        line = next((ln for ln in text.splitlines() if ln.startswith(
            'sidecar_batch_queue_delay_seconds_bucket{le="0.0005",model="identity_fp32"}')), None)
        total = next((ln for ln in text.splitlines() if ln.startswith(
            'sidecar_batch_queue_delay_seconds_count{model="identity_fp32"}')), None)
        return (float(total.split()[-1]) if total else 0.0) - (float(line.split()[-1]) if line else 0.0)

    slow_before = waited_count()
    before = triton.model_counts("identity_fp32")
    for i in range(20):
        answer = exchange(batching.url, "POST", "/v2/models/identity_fp32/infer", json_call([1.0], f"s{i}"), JSON)
        assert answer.status == 200
    assert triton.counts_since("identity_fp32", before, 20) == (20, 20)  # every call its own execution
    assert waited_count() == slow_before  # none waited half a millisecond or more for a batch


def test_a_killed_model_server_fails_every_member_promptly(tmp_path: Path) -> None:
    with TritonServer(MODELS_DIR, tmp_path / "t", models=["slow"]) as triton:
        args = ["--set", "batch.models=slow", "--set", "upstream.timeout=20"]
        with SidecarProcess(triton.url, tmp_path, "triton", args) as proc, \
                concurrent.futures.ThreadPoolExecutor(12) as pool:
            bodies = [json_call([float(i)], f"k{i}", delay=1.5) for i in range(12)]
            futures = [pool.submit(exchange, proc.url, "POST", "/v2/models/slow/infer", b, JSON, 30) for b in bodies]
            wait_until(lambda: _in_flight(proc) >= 6, 10, "calls in flight")
            triton.kill()
            answers = [f.result(timeout=15) for f in futures]
    assert all(a.status in (502, 504) and "error" in orjson.loads(a.body) for a in answers)


def _in_flight(proc: SidecarProcess) -> float:
    text = exchange(proc.admin_url, "GET", "/metrics").body.decode()
    return next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("sidecar_in_flight_requests "))


def test_batches_reach_the_recorded_shape_histogram(triton: TritonServer, tmp_path: Path) -> None:
    """Warm-up covers the batch sizes the batcher makes: they are recorded as shapes that reached the server."""
    args = ["--set", "batch.models=identity_fp32", "--set", "batch.max_delay=0.05", "--set",
            "record.flush_interval=0.2"]
    with SidecarProcess(triton.url, tmp_path, "triton", args) as proc:
        concurrently(proc.url, "/v2/models/identity_fp32/infer", [json_call([1.0, 2.0], f"h{i}") for i in range(32)])

        def batch_sizes() -> set[int]:
            status = orjson.loads(exchange(proc.admin_url, "GET", "/status?format=json").body)
            return {call["batch"] for model in status["plan"] for call in model["calls"]}

        assert wait_until(lambda: any(b > 1 for b in batch_sizes()), 10, "a batch size above 1 in the plan")

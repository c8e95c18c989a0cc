"""The batcher against a real Triton: concurrent calls arrive as one upstream call, each caller gets
exactly its own rows (JSON and binary callers mixed), a poisoned member fails alone, a killed model
server fails every member promptly, and one caller at a time is never held back.

Whatever another member does, each caller gets what Triton answers its call alone: a short deadline
fails only its own caller, a batch whose joined answer is over the answer limit is retried member by
member, and a model padding rows to the longest in its batch (``pad_rows``) is not batched by ``auto``
and, named explicitly, still answers each caller as alone.

Calls reaching the server are counted at the server itself (Triton's statistics API).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from sidecar.pipeline.batcher import CONFIRM
from tests.servers import MODELS_DIR, TritonServer, wait_until
from tests.sidecar_proc import SidecarProcess
from tests.wire import Answer, exchange

JSON = {"Content-Type": "application/json"}
MODELS = ["identity_fp32", "picky", "slow", "pad_rows"]


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
    args = ["--set", "batch.models=identity_fp32,picky,slow,pad_rows", "--set", "batch.max_delay=0.05"]
    with SidecarProcess(triton.url, tmp_path_factory.mktemp("batching"), "triton", args) as proc:
        yield proc


@pytest.fixture(scope="module")
def batching_workers(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """The same with two data-plane workers: each learns shapes on its own, the model's load is the pod's."""
    args = ["--set", "batch.models=identity_fp32,picky,slow,pad_rows", "--set", "batch.max_delay=0.05",
            "--set", "workers=2"]
    with SidecarProcess(triton.url, tmp_path_factory.mktemp("batching-workers"), "triton", args) as proc:
        yield proc


ANSWER_LIMIT = 2000  # bytes: one row of 256 short floats as JSON fits; two rows of them, binary, do not


@pytest.fixture(scope="module")
def strict(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """Batches wait for a completion (never for max_delay) and answers are capped small; gRPC callers too."""
    args = ["--set", "batch.models=identity_fp32,slow", "--set", "batch.max_delay=5", "--set",
            f"limits.max_answer_bytes={ANSWER_LIMIT}", "--set", f"upstream.grpc_url={triton.grpc_url}"]
    with SidecarProcess(triton.url, tmp_path_factory.mktemp("strict"), "triton", args) as proc:
        yield proc


def batching_report(proc: SidecarProcess) -> dict[str, Any]:
    """The batcher's part of /status: per batched model, its limits, counts and what it learnt."""
    report: dict[str, Any] = orjson.loads(exchange(proc.admin_url, "GET", "/status?format=json").body)["batching"]
    return report


def prime(url: str, model: str, bodies: list[bytes]) -> None:
    """Calls sent one at a time, so each goes alone. The test models' outputs have a variable dimension, so
    the batcher batches a kind of call only once distinct calls of it sent alone agreed on their shape."""
    for body in bodies:
        assert exchange(url, "POST", f"/v2/models/{model}/infer", body, JSON).status == 200


def concurrently(url: str, path: str, bodies: list[bytes], headers: list[dict[str, str]] | None = None
                 ) -> list[Answer]:
    """Every call at once: each caller connects, then all send together, so arrivals overlap however slowly
    this process starts its threads (the batcher gathers only calls that arrive while the server is busy)."""
    parts = urlsplit(url)
    ready = threading.Barrier(len(bodies))

    def one(i: int) -> Answer:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            connection.connect()
            ready.wait(30)
            connection.request("POST", path, bodies[i], {**JSON, **(headers[i] if headers else {})})
            response = connection.getresponse()
            return Answer(response.status, response.getheaders(), response.read())
        finally:
            connection.close()

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, range(len(bodies))))


@pytest.mark.parametrize(("front", "workers"), [("batching", 1), ("batching_workers", 2)])
def test_concurrent_callers_share_upstream_calls_and_get_their_own_rows(
        triton: TritonServer, front: str, workers: int, request: pytest.FixtureRequest) -> None:
    batching: SidecarProcess = request.getfixturevalue(front)
    rng = random.Random(3)
    callers = 48
    values = [[rng.uniform(-1e3, 1e3) for _ in range(3)] for _ in range(callers)]
    bodies = [json_call(v, f"caller-{i}", binary=i % 2 == 1) for i, v in enumerate(values)]
    # Each worker learns the kind of call on its own: enough priming calls that both see several.
    prime(batching.url, "identity_fp32", [json_call([float(i)] * 3, f"prime-{i}", binary=i % 2 == 1)
                                          for i in range(2 * CONFIRM * workers * workers)])
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
        prime(proc.url, "identity_fp32", [json_call([float(i), 2.0], f"prime-{i}") for i in range(CONFIRM)])
        concurrently(proc.url, "/v2/models/identity_fp32/infer", [json_call([1.0, 2.0], f"h{i}") for i in range(32)])

        def batch_sizes() -> set[int]:
            status = orjson.loads(exchange(proc.admin_url, "GET", "/status?format=json").body)
            return {call["batch"] for model in status["plan"] for call in model["calls"]}

        assert wait_until(lambda: any(b > 1 for b in batch_sizes()), 10, "a batch size above 1 in the plan")


# -- whatever the other members do, each caller gets what Triton answers its call alone --------------------


def grpc_slow_call(url: str, values: list[float], request_id: str, timeout: float, delay: str) -> object:
    """OUTPUT0 of a gRPC call of ``slow`` with the caller's own deadline, or the exception it raised."""
    tensor = grpcclient.InferInput("INPUT0", [1, len(values)], "FP32")
    tensor.set_data_from_numpy(np.array([values], np.float32))
    with grpcclient.InferenceServerClient(url) as client:
        try:
            result = client.infer("slow", [tensor], request_id=request_id, parameters={"delay": delay},
                                  client_timeout=timeout)
        except InferenceServerException as e:
            return e
    return result.get_response().id, result.as_numpy("OUTPUT0").ravel().tolist()


def test_a_short_deadline_fails_only_its_own_caller(triton: TritonServer, strict: SidecarProcess) -> None:
    """Two gRPC callers share a batch that takes 1.5 s; one of them gives up 1.5 s after it started, before the
    batch is answered. The other still gets its answer (a batch no longer ends at its earliest deadline)."""
    for i in range(CONFIRM):  # this kind of call, sent alone, has been seen to keep its shape
        assert grpc_slow_call(strict.grpc_url, [float(i), 0.0], f"prime-{i}", 30, "1.5") == (f"prime-{i}", [i, 0])
    before = triton.model_counts("slow")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # Both instances busy for a while: the two callers wait, then leave together as one batch.
        blockers = [pool.submit(exchange, strict.url, "POST", "/v2/models/slow/infer",
                                json_call([9.0], f"b{i}", delay=0.6), JSON, 30) for i in range(2)]
        wait_until(lambda: _in_flight(strict) >= 2, 10, "both instances busy")
        hasty = pool.submit(grpc_slow_call, strict.grpc_url, [1.0, 2.0], "hasty", 1.5, "1.5")
        patient = pool.submit(grpc_slow_call, strict.grpc_url, [3.0, 4.0], "patient", 30.0, "1.5")
        assert all(b.result(timeout=30).status == 200 for b in blockers)
        hasty_outcome, patient_outcome = hasty.result(timeout=30), patient.result(timeout=30)
    assert isinstance(hasty_outcome, InferenceServerException) and "DEADLINE" in str(hasty_outcome.status())
    assert patient_outcome == ("patient", [3.0, 4.0])
    inferences, executions = triton.counts_since("slow", before, 4)
    assert (inferences, executions) == (4, 3)  # the two callers were one execution


def test_a_batch_too_large_together_fails_only_the_caller_too_large_alone(triton: TritonServer,
                                                                          strict: SidecarProcess) -> None:
    rng = random.Random(11)
    values = [[float((i + k) % 9) for k in range(256)] for i in range(16)]  # about 1.2 KB as JSON
    big = 5
    values[big] = [rng.uniform(-1e3, 1e3) for _ in range(256)]  # about 4.8 KB as JSON: over the limit alone
    retried = batching_report(strict).get("identity_fp32", {}).get("retried_alone", 0)
    answers = concurrently(strict.url, "/v2/models/identity_fp32/infer",
                           [json_call(v, f"t{i}") for i, v in enumerate(values)])
    for i, answer in enumerate(answers):
        if i == big:
            assert answer.status == 502 and "exceeds" in orjson.loads(answer.body)["error"]
        else:
            assert answer.status == 200, answer.body
            request_id, out = output_of(answer)
            assert request_id == f"t{i}" and out == values[i]
    assert batching_report(strict)["identity_fp32"]["retried_alone"] > retried


def pad_call(text: str, request_id: str) -> bytes:
    return orjson.dumps({"id": request_id, "inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES",
                                                       "data": [text]}]})


def random_text(rng: random.Random) -> str:
    """1 to 12 bytes of UTF-8, some of them characters of two bytes."""
    text = ""
    while True:
        char = rng.choice("abcdefgh\u00e9\u00df")
        if len((text + char).encode()) > rng.randint(1, 12):
            return text or char
        text += char


def direct_answers(triton: TritonServer, bodies: list[bytes]) -> list[object]:
    """What Triton answers each call alone."""
    return [orjson.loads(exchange(triton.url, "POST", "/v2/models/pad_rows/infer", b, JSON).body) for b in bodies]


def test_auto_does_not_batch_a_model_whose_output_shape_follows_the_batch(triton: TritonServer,
                                                                          tmp_path: Path) -> None:
    rng = random.Random(21)
    bodies = [pad_call(random_text(rng), f"a{i}") for i in range(24)]
    direct = direct_answers(triton, bodies)
    args = ["--set", "batch.models=auto", "--set", "batch.max_delay=0.05"]
    with SidecarProcess(triton.url, tmp_path, "triton", args) as proc:
        before = triton.model_counts("pad_rows")
        answers = concurrently(proc.url, "/v2/models/pad_rows/infer", bodies)
        assert [orjson.loads(a.body) for a in answers] == direct
        assert triton.counts_since("pad_rows", before, len(bodies)) == (len(bodies), len(bodies))  # each alone
        assert "pad_rows" not in batching_report(proc)


def test_a_padding_model_named_explicitly_still_answers_each_caller_as_alone(triton: TritonServer,
                                                                             batching: SidecarProcess) -> None:
    """Calls alone first agree on a shape (texts of 20 bytes); then concurrent callers with shorter texts of
    their own lengths: their first batch comes back padded to its longest text, not as any caller alone,
    so its members are sent again alone and the model is no longer batched. Every caller gets Triton's
    answer to its own call."""
    rng = random.Random(7)
    confirming = [pad_call(f"{i:020d}", f"c{i}") for i in range(CONFIRM)]
    for body, expected in zip(confirming, direct_answers(triton, confirming), strict=True):
        assert orjson.loads(exchange(batching.url, "POST", "/v2/models/pad_rows/infer", body, JSON).body) == expected
    for turn in range(2):
        bodies = [pad_call(random_text(rng), f"p{turn}-{i}") for i in range(24)]
        answers = concurrently(batching.url, "/v2/models/pad_rows/infer", bodies)
        assert [orjson.loads(a.body) for a in answers] == direct_answers(triton, bodies)
    report = batching_report(batching)["pad_rows"]
    assert report["variable_outputs"] is True and report["stopped"] is True
    assert report["shape_mismatches"] >= 1


def test_callers_share_a_batch_only_with_the_same_forwarded_headers(tmp_path: Path) -> None:
    """Triton turns x-tenant headers into model parameters (``reflect`` answers them back, per row): a batch
    holds one tenant's callers and carries their header, so each caller sees its own tenant's answer."""
    pattern = "^x-tenant"
    with TritonServer(MODELS_DIR, tmp_path / "t", models=["reflect"],
                      extra_args=[f"--http-header-forward-pattern={pattern}"]) as triton:
        args = ["--set", "batch.models=reflect", "--set", "batch.max_delay=5",
                "--set", f"upstream.http_header_forward_pattern={pattern}"]
        with SidecarProcess(triton.url, tmp_path, "triton", args) as proc:
            def body(value: float, request_id: str) -> bytes:
                return orjson.dumps({"id": request_id, "inputs": [
                    {"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [value, -value]}]})

            def send(url: str, value: float, request_id: str, tenant: str) -> Any:
                answer = exchange(url, "POST", "/v2/models/reflect/infer", body(value, request_id),
                                  {**JSON, "x-tenant": tenant})
                assert answer.status == 200, answer.body
                return orjson.loads(answer.body)

            tenants = ["red", "blue"]
            for tenant in tenants:
                for i in range(CONFIRM):
                    send(proc.url, float(i), f"prime-{tenant}-{i}", tenant)
            calls = [(float(100 + i), f"c{i}", tenants[i % 2]) for i in range(16)]
            before = triton.model_counts("reflect")
            answers = concurrently(proc.url, "/v2/models/reflect/infer", [body(v, r) for v, r, _ in calls],
                                   [{"x-tenant": t} for _, _, t in calls])
            assert all(a.status == 200 for a in answers)
            got = [orjson.loads(a.body) for a in answers]
            inferences, executions = triton.counts_since("reflect", before, len(calls))
            assert got == [send(triton.url, *c) for c in calls]
            for (_, _, tenant), answer in zip(calls, got, strict=True):
                meta = next(o for o in answer["outputs"] if o["name"] == "META")["data"][0]
                assert orjson.loads(meta)["x-tenant"] == tenant
            assert executions < inferences  # they did share batches

"""The real servers other tests rely on start, answer, and come back on the same ports after a crash.

Uses the session fixtures ``triton`` and ``kserve`` and the per-test ``redis_server`` from conftest.py;
tests that kill a server start their own.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from tests.servers import (
    HOST,
    MODELS_DIR,
    KServeServer,
    RedisServer,
    ServerExited,
    TritonServer,
    wait_until,
    wait_until_async,
)

Json = Any


# -- helpers ----------------------------------------------------------------------------------------


def request_json(port: int, method: str, path: str, body: Json = None) -> tuple[int, Json]:
    """One HTTP request; returns (status, parsed JSON body)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {} if body is None else {"Content-Type": "application/json"}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def fp32_input(name: str, values: list[float], shape: list[int]) -> dict[str, Json]:
    return {"name": name, "datatype": "FP32", "shape": shape, "data": values}


def infer_slow(port: int, delay: float) -> float:
    """Seconds taken by one request to the `slow` model with the given delay parameter."""
    body = {"parameters": {"delay": delay}, "inputs": [fp32_input("INPUT0", [1.0], [1, 1])]}
    started = time.monotonic()
    status, _ = request_json(port, "POST", "/v2/models/slow/infer", body)
    assert status == 200
    return time.monotonic() - started


def group_alive(pid: int) -> bool:
    """Whether any process (a zombie not yet reaped by init included) is left in the process group."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- waiting helpers --------------------------------------------------------------------------------


def test_wait_until_returns_the_first_truthy_value() -> None:
    values = iter([0, None, "", 7])
    assert wait_until(lambda: next(values), timeout=5) == 7


def test_wait_until_raises_at_the_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="never"):
        wait_until(lambda: False, timeout=0.2, what="never")
    assert 0.2 <= time.monotonic() - started < 2


@pytest.mark.asyncio
async def test_wait_until_async_accepts_async_predicates() -> None:
    calls: list[int] = []

    async def third_call() -> bool:
        calls.append(1)
        return len(calls) >= 3

    assert await wait_until_async(third_call, timeout=5) is True


def test_start_reports_a_server_that_exits(tmp_path: Path) -> None:
    server = TritonServer(tmp_path / "no-such-repository", tmp_path, extra_args=["--no-such-flag"])
    with pytest.raises(ServerExited, match="triton exited"):
        server.start()
    assert not server.running


# -- Triton -----------------------------------------------------------------------------------------


def test_triton_identity_over_http_json(triton: TritonServer) -> None:
    body = {"id": "req-1", "inputs": [fp32_input("INPUT0", [1.0, 2.5, -3.0], [1, 3])]}
    status, answer = request_json(triton.http_port, "POST", "/v2/models/identity_fp32/infer", body)
    assert status == 200
    assert answer["id"] == "req-1"
    expected = {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.5, -3.0]}
    assert answer["outputs"] == [expected]


def test_triton_add_sub(triton: TritonServer) -> None:
    inputs = [fp32_input("INPUT0", [1, 2, 3, 4], [4]), fp32_input("INPUT1", [0.5, 0.5, 1, 1], [4])]
    status, answer = request_json(triton.http_port, "POST", "/v2/models/add_sub/infer", {"inputs": inputs})
    assert status == 200
    outputs = {output["name"]: output["data"] for output in answer["outputs"]}
    assert outputs == {"OUTPUT0": [1.5, 2.5, 4.0, 5.0], "OUTPUT1": [0.5, 1.5, 2.0, 3.0]}


def test_triton_bytes_echo(triton: TritonServer) -> None:
    body = {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 2], "data": ["héllo", ""]}]}
    status, answer = request_json(triton.http_port, "POST", "/v2/models/bytes_echo/infer", body)
    assert status == 200
    assert answer["outputs"][0]["data"] == ["héllo", ""]


def test_triton_grpc_infer(triton: TritonServer) -> None:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = triton_grpc.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    with triton_grpc.InferenceServerClient(triton.grpc_url) as client:
        assert client.is_server_ready()
        result = client.infer("identity_fp32", [tensor])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_triton_big_takes_a_50_mb_binary_tensor(triton: TritonServer) -> None:
    data = np.random.default_rng(0).random(50 * 2**20 // 4, dtype=np.float32)
    tensor = triton_http.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data, binary_data=True)
    output = triton_http.InferRequestedOutput("OUTPUT0", binary_data=True)
    client = triton_http.InferenceServerClient(f"{HOST}:{triton.http_port}", network_timeout=120)
    try:
        result = client.infer("big", [tensor], outputs=[output])
    finally:
        client.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_triton_slow_delays_without_blocking_a_concurrent_request(triton: TritonServer) -> None:
    durations: list[float] = []
    slow = threading.Thread(target=lambda: durations.append(infer_slow(triton.http_port, 1.5)))
    slow.start()
    try:
        assert infer_slow(triton.http_port, 0) < 1.0
        assert slow.is_alive()
    finally:
        slow.join()
    assert durations[0] >= 1.5


def test_triton_errors_are_json(triton: TritonServer) -> None:
    status, answer = request_json(triton.http_port, "POST", "/v2/models/nope/infer", {"inputs": []})
    assert (status, answer) == (404, {"error": "Request for unknown model: 'nope' is not found"})
    inputs = [fp32_input("INPUT0", [1, 2, 3], [3]), fp32_input("INPUT1", [1, 2, 3, 4], [4])]
    status, answer = request_json(triton.http_port, "POST", "/v2/models/add_sub/infer", {"inputs": inputs})
    assert status == 400
    assert "unexpected shape for input 'INPUT0'" in answer["error"]


def test_triton_restarts_on_the_same_ports(tmp_path: Path) -> None:
    with TritonServer(MODELS_DIR, tmp_path, models=["identity_fp32"]) as server:
        urls, pid = (server.url, server.grpc_url), server.pid
        assert pid is not None
        server.kill()
        assert not server.running
        wait_until(lambda: not group_alive(pid), timeout=10, what="python-backend stubs gone")
        assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))
        assert not server.is_ready()
        server.start()
        assert (server.url, server.grpc_url) == urls and server.starts == 2
        assert server.model_ready("identity_fp32") and not server.model_ready("add_sub")
        body = {"inputs": [fp32_input("INPUT0", [4.0], [1, 1])]}
        assert request_json(server.http_port, "POST", "/v2/models/identity_fp32/infer", body)[0] == 200
        assert server.stop() == 0


# -- KServe -----------------------------------------------------------------------------------------


def test_kserve_model_status(kserve: KServeServer) -> None:
    status, answer = request_json(kserve.http_port, "GET", "/v1/models/tfmodel")
    assert (status, answer) == (200, {"name": "tfmodel", "ready": True})


def test_kserve_predict_doubles_instances(kserve: KServeServer) -> None:
    body = {"instances": [[1, 2.5], [3, -4]]}
    status, answer = request_json(kserve.http_port, "POST", kserve.predict_path, body)
    assert (status, answer) == (200, {"predictions": [[2, 5.0], [6, -8]]})


def test_kserve_predict_columnar(kserve: KServeServer) -> None:
    body = {"inputs": {"x": [1, 2]}}
    status, answer = request_json(kserve.http_port, "POST", kserve.predict_path, body)
    assert (status, answer) == (200, {"outputs": {"x": [2, 4]}})


def test_kserve_errors_are_json(kserve: KServeServer) -> None:
    status, answer = request_json(kserve.http_port, "POST", kserve.predict_path, {"instances": ["a"]})
    assert status == 400
    assert answer == {"error": "instances[0]: expected a number or a list of numbers, got str"}
    status, answer = request_json(kserve.http_port, "POST", "/v1/models/nope:predict", {"instances": [1]})
    assert (status, answer) == (404, {"error": "Model with name nope does not exist."})


def test_kserve_restarts_on_the_same_port(tmp_path: Path) -> None:
    with KServeServer(tmp_path) as server:
        url = server.url
        server.kill()
        assert not server.is_ready()
        server.start()
        assert server.url == url and server.is_ready()
        assert server.stop() == 0


# -- Redis ------------------------------------------------------------------------------------------


def test_redis_answers_and_restarts_empty_on_the_same_port(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping()
        client.set("key", b"value")
        redis_server.kill()
        assert not redis_server.is_ready()
        redis_server.start()
        assert client.get("key") is None  # persistence is off; redis-py reconnects on the same URL
    finally:
        client.close()
    assert redis_server.stop() == 0

"""Failure mapping with real processes: 413, 504, 502 then recovery, SIGTERM drain."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.servers import MODELS_DIR, TritonServer, wait_until
from tests.sidecar_proc import SidecarProcess, http_status
from tests.wire import exchange

JSON = {"Content-Type": "application/json"}


def slow_body(delay: float) -> bytes:
    return orjson.dumps({
        "parameters": {"delay": delay},
        "inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
    })


@pytest.fixture()
def small_limit_sidecar(triton: TritonServer, tmp_path: Path) -> Iterator[SidecarProcess]:
    with SidecarProcess(triton.url, tmp_path, "triton", ["--set", "limits.max_body_bytes=1KiB"]) as proc:
        yield proc


def test_body_over_limit_gets_413(small_limit_sidecar: SidecarProcess) -> None:
    big = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 400], "datatype": "FP32",
                                    "data": [1.0] * 400}]})
    assert len(big) > 1024
    for path in ("/v2/models/identity_fp32/infer", "/v2/repository/index"):
        answer = exchange(small_limit_sidecar.url, "POST", path, big, JSON)
        assert answer.status == 413, path
        assert "limit" in orjson.loads(answer.body)["error"]
    # Under the limit still works on the same sidecar.
    ok = exchange(small_limit_sidecar.url, "POST", "/v2/models/identity_fp32/infer", slow_body(0), JSON)
    assert ok.status == 200


def test_stalled_upstream_gets_504_within_the_timeout(triton: TritonServer, tmp_path: Path) -> None:
    with SidecarProcess(triton.url, tmp_path, "triton", ["--set", "upstream.timeout=1"]) as proc:
        started = time.monotonic()
        answer = exchange(proc.url, "POST", "/v2/models/slow/infer", slow_body(4), JSON)
        elapsed = time.monotonic() - started
    assert answer.status == 504
    assert "1 s" in orjson.loads(answer.body)["error"]
    assert 0.9 < elapsed < 3.0


def test_upstream_killed_mid_traffic_gives_502_then_recovers(tmp_path: Path) -> None:
    triton = TritonServer(MODELS_DIR, tmp_path / "triton", models=["identity_fp32"]).start()
    try:
        with SidecarProcess(triton.url, tmp_path, "triton", ["--set", "upstream.connect_timeout=1"]) as proc:
            body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [3]}]})

            def call() -> int:
                return exchange(proc.url, "POST", "/v2/models/identity_fp32/infer", body, JSON, timeout=10).status

            assert call() == 200
            triton.kill()
            started = time.monotonic()
            statuses = [call() for _ in range(5)]
            assert set(statuses) == {502}, statuses
            assert time.monotonic() - started < 5  # refused fast, nobody hangs
            wait_until(lambda: http_status(proc.admin_url + "/readyz") == 503, 3, "readyz 503")
            triton.start()
            wait_until(lambda: call() == 200, 60, "a 200 through the sidecar after restart")
            wait_until(lambda: http_status(proc.admin_url + "/readyz") == 200, 10, "readyz 200 again")
    finally:
        triton.stop()


def test_sigterm_drains_in_flight_requests(triton: TritonServer, tmp_path: Path) -> None:
    proc = SidecarProcess(triton.url, tmp_path, "triton", ["--set", "shutdown_grace=10"]).start()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(exchange, proc.url, "POST", "/v2/models/slow/infer", slow_body(1.5), JSON)
                   for _ in range(2)]
        # Both requests are inside the sidecar once its in-flight gauge says so.
        wait_until(lambda: b"sidecar_in_flight_requests 2.0" in exchange(
            proc.admin_url, "GET", "/metrics").body, 5, "two requests in flight")
        started = time.monotonic()
        status = proc.terminate(timeout=15)
        answers = [f.result(timeout=15) for f in futures]
    assert status == 0
    assert [a.status for a in answers] == [200, 200]
    assert time.monotonic() - started < 10
    assert http_status(proc.url + "/v2/health/live") is None  # no longer accepting

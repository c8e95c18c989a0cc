"""Data-plane workers (``workers=2``) behind one control process, against the real Triton.

Each test's calls go over new connections, which the kernel spreads over the workers' shared ports
(SO_REUSEPORT); ``/status`` says how many inference calls each worker answered, so a test knows both served.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import tritonclient.grpc as grpcclient

from tests.servers import TritonServer, free_ports, wait_until
from tests.sidecar_proc import SidecarProcess
from tests.test_cache import FAST, cache_of, flush, infer_body, metric, status
from tests.wire import exchange

IDENTITY = "identity_fp32"
PATH = f"/v2/models/{IDENTITY}/infer"
TOKEN = "workers-token"
WORKERS = ["--set", "workers=2"]
REQUESTS = f'sidecar_requests_total{{model="{IDENTITY}",route="infer",status="200"}}'


def body(*values: float) -> bytes:
    return orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, len(values)], "datatype": "FP32",
                                     "data": list(values)}]})


@pytest.fixture(scope="module")
def pod(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    args = [*WORKERS, "--set", f"cache.models={IDENTITY}", "--set", f"admin_token={TOKEN}", *FAST]
    with SidecarProcess(triton.url, tmp_path_factory.mktemp("pod"), "triton", args) as proc:
        yield proc


def calls_by_worker(proc: SidecarProcess) -> dict[str, int]:
    calls: dict[str, int] = status(proc)["workers"]["calls"]
    return calls


def both_served(before: dict[str, int], after: dict[str, int]) -> bool:
    return len(after) == 2 and all(n > before.get(pid, 0) for pid, n in after.items())


def test_two_worker_processes_serve_behind_one_control_plane(pod: SidecarProcess) -> None:
    workers = status(pod)["workers"]
    assert workers["setting"] == "2" and workers["running"] == 2 and workers["restarts"] == 0
    assert len(set(workers["pids"])) == 2 and pod.pid not in workers["pids"]
    assert metric(pod, "sidecar_workers") == 2.0


def test_an_answer_stored_by_one_worker_is_a_hit_in_the_other(pod: SidecarProcess) -> None:
    call = body(11.5, 12, 13, 14)
    before = calls_by_worker(pod)
    misses = status(pod)["cache"]["models"].get(IDENTITY, {}).get("misses", 0)
    first = exchange(pod.url, "POST", PATH, call)
    assert first.status == 200 and cache_of(first) == "miss"
    answers = []

    def both() -> bool:
        for _ in range(5):
            answers.append(exchange(pod.url, "POST", PATH, call))
        return both_served(before, calls_by_worker(pod))

    wait_until(both, 30, "both workers answered")
    assert {(a.status, cache_of(a), a.body) for a in answers} == {(200, "hit", first.body)}
    assert status(pod)["cache"]["models"][IDENTITY]["misses"] == misses + 1  # one miss in the whole pod


def test_metrics_count_every_call_whichever_worker_answered(pod: SidecarProcess) -> None:
    before_calls = calls_by_worker(pod)
    before = metric(pod, REQUESTS) or 0.0
    n = 0
    while n < 40 or not both_served(before_calls, calls_by_worker(pod)):
        assert exchange(pod.url, "POST", PATH, body(n % 7, 1)).status == 200
        n += 1
        assert n < 400, "the kernel never gave the second worker a connection"
    assert metric(pod, REQUESTS) == before + n


def test_a_flush_reaches_every_worker_within_100_ms(pod: SidecarProcess) -> None:
    calls = [body(100 + i, 0.5) for i in range(30)]
    for call in calls:
        assert exchange(pod.url, "POST", PATH, call).status == 200
    assert all(cache_of(exchange(pod.url, "POST", PATH, call)) == "hit" for call in calls)
    before = calls_by_worker(pod)
    assert flush(pod, TOKEN).status == 200
    time.sleep(0.1)  # the allowance under test: after it, no worker may answer from before the flush
    served = [cache_of(exchange(pod.url, "POST", PATH, call)) for call in calls]
    assert served == ["miss"] * len(calls)
    assert both_served(before, calls_by_worker(pod))


def test_per_worker_limits_and_status_text(pod: SidecarProcess) -> None:
    text = exchange(pod.admin_url, "GET", "/status").body.decode()
    assert "workers:  2 of 2 running (setting 2), 0 restarted" in text


# -- lifecycle: sidecars of their own (they are killed) ---------------------------------------------------------


class Load:
    """Threads calling the pod over keep-alive connections; a failed call reconnects."""

    def __init__(self, proc: SidecarProcess, threads: int) -> None:
        self.proc = proc
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[float] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _run(self, i: int) -> None:
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.proc.port, timeout=10)
                conn.request("POST", PATH, body(i, n))
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(response.status)
                with self.lock:
                    self.ok += 1
            except Exception:
                with self.lock:
                    self.failures.append(time.monotonic())
                if conn is not None:
                    conn.close()
                conn = None


def test_a_killed_worker_is_replaced_within_2_s_and_only_its_calls_fail(
        triton: TritonServer, tmp_path: Any) -> None:
    args = [*WORKERS, "--set", f"cache.models={IDENTITY}", *FAST]
    with SidecarProcess(triton.url, tmp_path, "triton", args) as proc, Load(proc, 8) as load:
        wait_until(lambda: load.ok > 200, 30, "load running")
        old = status(proc)["workers"]["pids"]
        killed_at = time.monotonic()
        os.kill(old[0], signal.SIGKILL)
        restarted = wait_until(lambda: (w := status(proc)["workers"])["running"] == 2 and old[0] not in w["pids"]
                               and w, 10, "a new worker")
        took = time.monotonic() - killed_at
        assert exchange(proc.admin_url, "GET", "/readyz").status == 200  # the pod stayed ready
        ok_then = load.ok
        wait_until(lambda: load.ok > ok_then + 200, 30, "load continues")
        failed = list(load.failures)
    assert took <= 2.0, f"the replacement worker served after {took:.2f} s"
    assert restarted["restarts"] == 1 and old[1] in restarted["pids"]
    # Each load thread had at most one call on the killed worker's connections; every call after the kill
    # found a live worker.
    assert len(failed) <= 8 and all(t >= killed_at for t in failed), failed


def test_a_restart_is_counted(triton: TritonServer, tmp_path: Any) -> None:
    with SidecarProcess(triton.url, tmp_path, "triton", [*WORKERS, *FAST]) as proc:
        pid = status(proc)["workers"]["pids"][1]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: metric(proc, "sidecar_worker_restarts_total") == 1.0, 10, "the restart counted")
        wait_until(lambda: metric(proc, "sidecar_workers") == 2.0, 10, "two workers again")


def test_a_frozen_worker_is_killed_and_replaced(triton: TritonServer, tmp_path: Any) -> None:
    """A worker whose loop stops answering still holds its share of the port: the control process kills it."""
    with SidecarProcess(triton.url, tmp_path, "triton", [*WORKERS, *FAST]) as proc:
        frozen = status(proc)["workers"]["pids"][0]
        os.kill(frozen, signal.SIGSTOP)
        try:
            wait_until(lambda: (w := status(proc)["workers"])["running"] == 2 and frozen not in w["pids"], 30,
                       "the frozen worker replaced")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
        assert not _alive(frozen)
        assert exchange(proc.url, "GET", "/v2/health/ready").status == 200


def test_readiness_leaves_every_worker_within_100_ms_on_both_protocols(triton: TritonServer, tmp_path: Any) -> None:
    args = [*WORKERS, *FAST, "--set", "shutdown_delay=5"]
    with SidecarProcess(triton.url, tmp_path, "triton", args) as proc:
        pids = status(proc)["workers"]["pids"]
        assert exchange(proc.url, "GET", "/v2/health/ready").status == 200
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.1)  # the allowance under test: after it, no worker may say ready
        http_ready = [exchange(proc.url, "GET", "/v2/health/ready").status for _ in range(30)]
        grpc_ready = []
        for _ in range(10):
            client = grpcclient.InferenceServerClient(proc.grpc_url)
            try:
                grpc_ready.append(client.is_server_ready())
            finally:
                client.close()
        assert 200 not in http_ready, http_ready
        assert not any(grpc_ready), grpc_ready
        assert all(_alive(pid) for pid in pids)  # still serving (shutdown_delay), only not ready


def test_sigterm_drains_every_worker_and_their_calls_in_flight_finish(triton: TritonServer, tmp_path: Any) -> None:
    args = [*WORKERS, "--set", "shutdown_delay=0.5", "--set", "shutdown_grace=20", "--set", "log_level=warning"]
    proc = SidecarProcess(triton.url, tmp_path, "triton", args).start()
    try:
        pids = status(proc)["workers"]["pids"]
        answers: list[int] = []

        def slow_call(i: int) -> None:  # each on its own connection: the kernel spreads them over the workers
            body = infer_body([float(i)], rid=f"drain-{i}", parameters={"delay": 1.5})
            answers.append(exchange(proc.url, "POST", "/v2/models/slow/infer", body).status)

        callers = [threading.Thread(target=slow_call, args=(i,)) for i in range(4)]
        for t in callers:
            t.start()
        wait_until(lambda: (metric(proc, 'sidecar_queue_depth{model="slow"}') or 0) >= 4, 10, "calls in flight")
        assert proc._process is not None
        proc._process.send_signal(signal.SIGTERM)
        for t in callers:
            t.join(30)
        assert answers == [200] * 4  # every call in flight finished, whichever worker had it
        assert proc._process.wait(timeout=30) == 0
        assert not any(_alive(pid) for pid in pids)
    finally:
        proc.stop()


def test_a_port_in_use_is_one_line_and_exit_2_with_workers(tmp_path: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        admin, grpc_port = free_ports(2)
        run = subprocess.run(
            [sys.executable, "-m", "sidecar", "run", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
             "--store", str(tmp_path / "t.db"), "--set", f"grpc_listen=127.0.0.1:{grpc_port}", *WORKERS],
            capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "listen" in lines[0] and str(port) in lines[0], run.stderr


def test_the_workers_stop_when_the_control_process_dies(triton: TritonServer, tmp_path: Any) -> None:
    with SidecarProcess(triton.url, tmp_path, "triton", [*WORKERS, *FAST]) as proc:
        pids = status(proc)["workers"]["pids"]
        os.kill(proc.pid, signal.SIGKILL)
        wait_until(lambda: not any(_alive(pid) for pid in pids), 5, "the workers gone")
        with pytest.raises(OSError):
            exchange(proc.url, "GET", "/v2/health/ready", timeout=2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

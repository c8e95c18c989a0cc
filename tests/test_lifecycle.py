"""Readiness never freezes; start-up and shutdown behave.

Background tasks are supervised; an upstream that answers something that is not a model server is
not-ready with the reason shown; a bad call never stops the recorder; SIGTERM fails readiness at once
and keeps serving for shutdown_delay; start-up errors are one line and exit 2.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from sidecar.metrics import Metrics
from sidecar.supervise import Supervisor
from sidecar.warmup import payload
from sidecar.warmup.planner import NO_BATCH, Plan, Planner
from sidecar.warmup.store import Sample, StoreLimits, open_store
from tests.fake_upstream import FakeUpstream
from tests.rawhttp import RawClient
from tests.servers import HOST, TritonServer, free_ports, wait_until
from tests.sidecar_proc import SidecarProcess, http_status
from tests.wire import exchange

JSON = {"Content-Type": "application/json"}


def status_json(proc: SidecarProcess) -> dict[str, object]:
    result: dict[str, object] = orjson.loads(exchange(proc.admin_url, "GET", "/status?format=json").body)
    return result


async def test_a_crashing_task_is_restarted_and_counted() -> None:
    metrics = Metrics()
    supervisor = Supervisor(metrics)
    runs: list[int] = []
    done = asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise KeyError("request data that must not be logged")
        done.set()
        await asyncio.Event().wait()

    supervisor.spawn("flaky", flaky)
    async with asyncio.timeout(5):
        await done.wait()
    assert supervisor.restarts == {"flaky": 2} and supervisor.alive("flaky")
    assert b'sidecar_task_restarts_total{task="flaky"} 2.0' in metrics.render()
    await supervisor.stop()


def test_odd_answers_mean_not_ready_with_the_reason_and_recovery(tmp_path: Path) -> None:
    with FakeUpstream() as upstream, SidecarProcess(upstream.url, tmp_path, "triton") as proc:
        upstream.behaviour = "odd"
        wait_until(lambda: http_status(proc.admin_url + "/readyz") == 503, 10, "not ready on odd answers")
        assert "malformed" in str(status_json(proc)["upstream"]) or "unavailable" in str(status_json(proc)["upstream"])
        upstream.behaviour = "triton"
        wait_until(lambda: http_status(proc.admin_url + "/readyz") == 200, 10, "ready again")
        upstream.behaviour = "down"
        wait_until(lambda: status_json(proc)["state"] == "cold", 10, "cold when the server is gone")
        upstream.behaviour = "triton"
        wait_until(lambda: status_json(proc)["state"] == "warm", 10, "warm again")
        log = proc.log_path.read_text()
    assert "Traceback" not in log
    assert log.count("model server http") < 20  # logged once per problem, not once per probe


def test_a_bad_call_never_stops_the_recorder(tmp_path: Path) -> None:
    with FakeUpstream() as upstream, SidecarProcess(upstream.url, tmp_path, "triton") as proc:
        body = orjson.dumps({"inputs": [{"name": "X", "shape": [1], "datatype": "FP32", "data": [1]}]})
        with RawClient(proc.port) as client:
            for content_type in (b"application/json\xff", b"application/json"):
                client.send(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (content_type, len(body), body))
                assert client.answer().status == 200

        def recorded() -> float:
            text = exchange(proc.admin_url, "GET", "/metrics").body.decode()
            lines = text.splitlines()
            return sum(float(line.split()[-1]) for line in lines if line.startswith("sidecar_recorded_total"))

        wait_until(lambda: recorded() == 2, 10, "both calls recorded")
        assert proc.terminate() == 0
    store = open_store(str(tmp_path / f"traffic-{proc.port}.db"), StoreLimits())

    async def stored() -> list[bytes]:
        try:
            return [r.payload for r in await store.top("m", 10)]
        finally:
            await store.close()

    payloads = asyncio.run(stored())
    assert payloads and payload.decode(payloads[0]).header("content-type") is not None


def test_sigterm_fails_readiness_at_once_and_serves_through_the_delay(triton: TritonServer, tmp_path: Path) -> None:
    proc = SidecarProcess(triton.url, tmp_path, "triton", ["--set", "shutdown_delay=2"]).start()
    try:
        assert proc._process is not None
        proc._process.send_signal(15)
        wait_until(lambda: http_status(proc.admin_url + "/readyz") == 503, 1, "readiness failed at once")
        # Still accepting new connections during the delay, so in-flight load balancers lose nothing.
        answer = exchange(proc.url, "GET", "/v2/health/live")
        assert answer.status == 200 and answer.header("Connection") == "close"
        assert proc._process.wait(timeout=15) == 0
    finally:
        proc.stop()


def test_a_stopping_model_server_is_not_ready_at_once_and_can_exit(tmp_path: Path) -> None:
    """Triton, on SIGTERM, refuses new connections but answers "ready" on open ones for up to its exit
    timeout (30 s), and waits for them to close. The sidecar must not keep it looking warm, nor alive."""
    import time

    triton = TritonServer(workdir=tmp_path / "triton", models=["identity_fp32"])
    with triton, SidecarProcess(triton.url, tmp_path, "triton", ["--set", "upstream.health_interval=0.2"]) as proc:
        for _ in range(20):  # the data pool and the probes both hold connections now
            assert exchange(proc.url, "GET", "/v2/models/identity_fp32/ready").status == 200
        assert triton._process is not None
        stopped = time.monotonic()
        triton._process.send_signal(15)
        wait_until(lambda: http_status(proc.admin_url + "/readyz") == 503, 5, "the sidecar not ready")
        triton._process.wait(timeout=20)
        assert time.monotonic() - stopped < 20  # not Triton's 30 s wait for the sidecar's connections


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        (admin,) = free_ports(1)
        proc = subprocess.run(
            [sys.executable, "-m", "sidecar", "run", "--listen", f"{HOST}:{port}", "--admin", f"{HOST}:{admin}",
             "--store", str(tmp_path / "t.db")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "listen" in lines[0] and str(port) in lines[0], proc.stderr


def test_an_unwritable_store_is_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = subprocess.run([sys.executable, "-m", "sidecar", "run", "--store", str(blocker / "sub" / "t.db")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "traffic store" in lines[0], proc.stderr


# -- the plan as shown ------------------------------------------------------------------------------------


async def test_a_model_without_a_batch_dimension_shows_no_batch_size(tmp_path: Path) -> None:
    from sidecar.config import load
    from sidecar.identity import request_key
    from sidecar.protocols import kserve_http

    body = orjson.dumps({"inputs": [{"name": "X", "shape": [4, 2], "datatype": "FP32", "data": [1] * 8}]})
    recorded = payload.encode(payload.RecordedCall("/v2/models/flat/infer", (("Content-Type", "application/json"),),
                                                   body))
    assert kserve_http.decode_request("flat", "", body, None).inputs[0].shape == (4, 2)
    store = open_store(str(tmp_path / "t.db"), StoreLimits())
    key = request_key(kserve_http.decode_request("flat", "", body, None))
    await store.add([Sample("flat", key, "X:FP32[4,2]", 4, 3, recorded)])

    async def no_batch_dimension(model: str, protocol: object) -> int:
        return 0

    plan: Plan = await Planner(load({}, {}, {}), store, no_batch_dimension).build("triton")  # type: ignore[arg-type]
    await store.close()
    assert [c.batch for c in plan.models[0].calls] == [NO_BATCH]
    text = plan.render()
    assert "no batch dimension" in text and "batch sizes [4]" not in text


def test_status_shows_the_plan_that_would_run_now(triton: TritonServer, tmp_path: Path) -> None:
    args = ["--set", "record.flush_interval=0.1"]
    with SidecarProcess(triton.url, tmp_path, "triton", args) as proc:
        assert status_json(proc)["plan"] == []
        body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]})
        assert exchange(proc.url, "POST", "/v2/models/identity_fp32/infer", body, JSON).status == 200
        wait_until(lambda: status_json(proc)["plan"], 10, "the recorded call in the plan")
        assert "identity_fp32" in exchange(proc.admin_url, "GET", "/status").body.decode()


# The names of the design notes outside this repository, spelt in pieces so this file does not name them.
_OUTSIDE = ("DESIGN" + ".md", ".." + "/shared")


@pytest.mark.parametrize("name", ["scripts", "tests", "docs", "sidecar", "bench", "k8s"])
def test_the_project_stands_on_its_own(name: str) -> None:
    root = Path(__file__).resolve().parents[1] / name
    offenders = [str(p) for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".md", ".yaml")
                 and any(ref in p.read_text(errors="replace") for ref in _OUTSIDE)]
    assert not offenders


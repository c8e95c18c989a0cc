"""The load-balancer signals without load balancers: HAProxy's agent protocol, ORCA's three
encodings as Envoy parses them, Envoy's health-check headers, and the autoscaler gauges.

The sidecar here is the real composition root (``Sidecar``) in-process, with only its data port,
agent port and admin handlers running: no model server, so the test drives the state machine.
"""

from __future__ import annotations

import asyncio
import base64
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.app import Sidecar
from sidecar.config import load
from sidecar.errors import ConfigError
from sidecar.mesh import agent, orca
from sidecar.mesh.agent import AgentServer
from sidecar.mesh.load import LoadTracker
from sidecar.state import State, StateMachine
from tests.servers import HOST, free_ports, wait_until_async

# --- HAProxy's agent-check -------------------------------------------------------------------


@pytest.mark.parametrize(("state", "progress", "line"), [
    (State.WARM, 1.0, b"up ready 100%\n"),
    (State.WARMING, 0.0, b"up ready 1%\n"),  # never 0%: HAProxy shows a 0 weight as DRAIN
    (State.WARMING, 0.5, b"up ready 50%\n"),
    (State.WARMING, 0.99, b"up ready 99%\n"),
    (State.DRAINING, 1.0, b"drain\n"),
    (State.STARTING, 0.0, b"down #starting: why\n"),
    (State.LOADING, 0.0, b"down #loading: why\n"),
    (State.COLD, 0.0, b"down #cold: why\n"),
])
def test_agent_answer_for_every_state(state: State, progress: float, line: bytes) -> None:
    assert agent.answer(state, progress, "why") == line


def test_agent_reason_cannot_break_the_line() -> None:
    line = agent.answer(State.COLD, 0.0, "model server said\r\nup ready 100%\x00" + "x" * 500)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and b"\r" not in line and b"\x00" not in line
    assert line.startswith(b"down #cold: ") and len(line) < 140


def _agent_line(port: int, send: bytes = b"") -> bytes:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        if send:
            sock.sendall(send)  # HAProxy's agent-send
        data = b""
        while chunk := sock.recv(256):
            data += chunk
        return data


async def test_agent_server_answers_from_the_state_machine() -> None:
    machine = StateMachine()
    server = AgentServer(f"{HOST}:0", machine)
    await server.start()
    try:
        assert server.port is not None
        assert await asyncio.to_thread(_agent_line, server.port) == b"down #starting: sidecar started\n"
        machine.to(State.WARMING, "model server ready")
        machine.progress = 0.37
        assert await asyncio.to_thread(_agent_line, server.port, b"backend/pod-1\n") == b"up ready 37%\n"
        machine.to(State.WARM, "converged")
        assert await asyncio.to_thread(_agent_line, server.port) == b"up ready 100%\n"
        machine.to(State.DRAINING, "SIGTERM")
        assert await asyncio.to_thread(_agent_line, server.port) == b"drain\n"
        await wait_until_async(_async(lambda: server.open == 0), 5, "every agent connection closed")
    finally:
        await server.stop()


def _async(predicate: Callable[[], object]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(predicate())
    return check


async def test_agent_server_caps_connections_and_drops_silent_peers() -> None:
    server = AgentServer(f"{HOST}:0", StateMachine(), max_connections=2, timeout=0.3)
    await server.start()
    try:
        assert server.port is not None
        # Two peers connect and never close: each gets its line and is then held at most `timeout`.
        held = [socket.create_connection((HOST, server.port), timeout=5) for _ in range(2)]
        await wait_until_async(_async(lambda: server.open == 2), 5, "two agent connections open")
        # A third is closed unanswered while they are open (HAProxy: "no answer", not a failure).
        assert await asyncio.to_thread(_agent_line, server.port) == b""
        # The silent two are dropped by the timeout; then the port answers again.
        await wait_until_async(_async(lambda: server.open == 0), 5, "silent peers dropped")
        for sock in held:
            assert sock.recv(256).startswith(b"down #starting")
            sock.close()
        assert (await asyncio.to_thread(_agent_line, server.port)).startswith(b"down #")
    finally:
        await server.stop()


async def test_agent_port_taken_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        server = AgentServer(f"{HOST}:{taken.getsockname()[1]}", StateMachine())
        with pytest.raises(ConfigError, match=r"mesh\.agent_listen"):
            await server.start()


# --- ORCA, as Envoy reads it -----------------------------------------------------------------

_ENVOY_FIELDS = {"cpu_utilization", "mem_utilization", "application_utilization", "eps", "rps_fractional"}


def envoy_text(value: bytes) -> dict[str, float]:
    """Envoy's TEXT parser (orca_parser.cc, with the '=' delimiter of envoy#37724), as strict as it is:
    comma-separated, whitespace-trimmed key=value pairs, known keys or named_metrics.<name>, finite
    numbers, no key twice."""
    assert value.startswith(b"TEXT ")
    metrics: dict[str, float] = {}
    for pair in value[5:].decode("ascii").split(","):
        key, sep, number = pair.strip().partition("=")
        assert sep and key and number, pair
        assert key in _ENVOY_FIELDS or (key.startswith("named_metrics.") and len(key) > 14), key
        assert key not in metrics, f"duplicate {key}"
        parsed = float(number)
        assert math.isfinite(parsed)
        metrics[key] = parsed
    return metrics


def orca_proto() -> Any:
    """``xds.data.orca.v3.OrcaLoadReport`` as Google's protobuf runtime builds it from its schema:
    field names, numbers and types as cncf/xds declares them (xds/data/orca/v3/orca_load_report.proto).
    Google's parser, not the sidecar's code, then reads the bytes and the JSON. (envoy-data-plane has
    no ORCA types; PyPI's xds-protos has them generated, but installs a `cel` package over the CEL
    evaluator the manifest tests use.)"""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field_type = descriptor_pb2.FieldDescriptorProto
    schema = descriptor_pb2.FileDescriptorProto(name="xds/data/orca/v3/orca_load_report.proto",
                                                package="xds.data.orca.v3", syntax="proto3")
    report = schema.message_type.add(name="OrcaLoadReport")

    def json_name(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(part.title() for part in rest)

    def scalar(name: str, number: int, kind: int) -> None:
        report.field.add(name=name, number=number, type=kind, label=field_type.LABEL_OPTIONAL,
                         json_name=json_name(name))

    def string_to_double(name: str, number: int) -> None:
        entry = report.nested_type.add(name=json_name(name)[0].upper() + json_name(name)[1:] + "Entry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=field_type.TYPE_STRING, label=field_type.LABEL_OPTIONAL,
                        json_name="key")
        entry.field.add(name="value", number=2, type=field_type.TYPE_DOUBLE, label=field_type.LABEL_OPTIONAL,
                        json_name="value")
        report.field.add(name=name, number=number, type=field_type.TYPE_MESSAGE,
                         label=field_type.LABEL_REPEATED, type_name=f".xds.data.orca.v3.OrcaLoadReport.{entry.name}",
                         json_name=json_name(name))

    scalar("cpu_utilization", 1, field_type.TYPE_DOUBLE)
    scalar("mem_utilization", 2, field_type.TYPE_DOUBLE)
    scalar("rps", 3, field_type.TYPE_UINT64)
    string_to_double("request_cost", 4)
    string_to_double("utilization", 5)
    scalar("rps_fractional", 6, field_type.TYPE_DOUBLE)
    scalar("eps", 7, field_type.TYPE_DOUBLE)
    string_to_double("named_metrics", 8)
    scalar("application_utilization", 9, field_type.TYPE_DOUBLE)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("xds.data.orca.v3.OrcaLoadReport"))


def test_utilization_is_high_until_warm_then_follows_load() -> None:
    assert orca.utilization(State.WARM, 0, 64) == 1 / 64  # the answered call counts: never 0
    assert orca.utilization(State.WARM, 32, 64) == 0.5
    assert orca.utilization(State.WARM, 128, 64) == 2.0  # past capacity: over 1, as ORCA allows
    for state in (State.STARTING, State.LOADING, State.WARMING, State.COLD, State.DRAINING):
        assert orca.utilization(state, 1, 64) == 1.0
        assert orca.utilization(state, 640, 64) == 10.0


def test_the_three_encodings_say_the_same_to_envoy() -> None:
    from google.protobuf import json_format

    report = orca.report(State.WARMING, 0.25, 3, 64, 12.5)
    text = orca.encode(report, b"TEXT")
    json = orca.encode(report, b" json ")  # the request header's value, trimmed, any case
    binary = orca.encode(report, b"BIN")
    assert orca.encode(report, b"XML") is None
    assert text is not None and json is not None and binary is not None

    assert text[0] == b"endpoint-load-metrics"
    assert envoy_text(text[1]) == {"application_utilization": 1.0, "rps_fractional": 12.5,
                                   "named_metrics.in_flight": 3.0, "named_metrics.warm_capacity": 0.25}

    OrcaLoadReport = orca_proto()
    assert json[0] == b"endpoint-load-metrics" and json[1].startswith(b"JSON {")
    from_json = OrcaLoadReport()
    json_format.Parse(json[1][5:], from_json, ignore_unknown_fields=False)  # Envoy refuses unknown fields

    assert binary[0] == b"endpoint-load-metrics-bin"
    from_bin = OrcaLoadReport()
    from_bin.ParseFromString(base64.b64decode(binary[1], validate=True))
    assert from_bin.SerializeToString(deterministic=True) == orca.as_binary(report)  # canonical bytes

    for parsed in (from_json, from_bin):
        assert parsed.application_utilization == 1.0
        assert parsed.rps_fractional == 12.5
        assert dict(parsed.named_metrics) == {"in_flight": 3.0, "warm_capacity": 0.25}
        assert parsed.cpu_utilization == 0.0 and parsed.eps == 0.0

    idle = orca.report(State.DRAINING, 1.0, 0, 64, 0.0)  # zeros: left out, except inside map entries
    from_bin.Clear()
    from_bin.ParseFromString(orca.as_binary(idle))
    assert dict(from_bin.named_metrics) == {"in_flight": 0.0, "warm_capacity": 0.0}
    assert from_bin.SerializeToString(deterministic=True) == orca.as_binary(idle)


def test_envoy_weight_of_a_cold_and_a_warm_pod() -> None:
    """Envoy's client-side WRR weight is rps / utilization: a warming pod weighs its (small) rps."""
    cold = envoy_text(orca.encode(orca.report(State.WARMING, 0.1, 1, 64, 2.0), b"TEXT")[1])  # type: ignore[index]
    warm = envoy_text(orca.encode(orca.report(State.WARM, 1.0, 8, 64, 100.0), b"TEXT")[1])  # type: ignore[index]
    weight = {name: m["rps_fractional"] / m["application_utilization"] for name, m in
              (("cold", cold), ("warm", warm))}
    assert weight["cold"] == 2.0 and weight["warm"] == 800.0


def test_load_tracker_counts_in_flight_and_a_sliding_rate() -> None:
    now = [1000.0]
    tracker = LoadTracker(window=10, clock=lambda: now[0])
    now[0] = 1020.0  # the process has run 20 s: the window is full
    for _ in range(30):
        tracker.begin("a")
    tracker.begin("b")
    assert tracker.in_flight == {"a": 30, "b": 1} and tracker.total == 31
    for _ in range(30):
        tracker.end("a")
    assert tracker.in_flight == {"b": 1}  # idle models leave: callers cannot grow it
    now[0] = 1020.5
    assert tracker.rates() == pytest.approx({"a": 30 / 9.5, "b": 1 / 9.5})
    now[0] = 1031.0  # every arrival is older than the window now
    assert tracker.rates() == {}
    tracker.end("b")
    tracker.end("b")  # one too many (never happens) cannot go negative
    assert tracker.total == 0 and tracker.in_flight == {}


# --- the sidecar in-process: Envoy's headers and the autoscaler gauges ------------------------


@pytest.fixture()
async def sidecar(tmp_path: Path) -> AsyncIterator[Sidecar]:
    """Gate `hold`: an inference call waits in the sidecar while not warm, so it can be seen queued."""
    data, agent_port, dead = free_ports(3)
    cfg = load({}, {}, {"store": str(tmp_path / "t.db"), "gate.policy": "hold",
                        "upstream.url": f"http://{HOST}:{dead}", "upstream.connect_timeout": "0.5",
                        "mesh.agent_listen": f"{HOST}:{agent_port}", "mesh.degraded_while_warming": "true",
                        "limits.decode_workers": "0", "workers": "1"})
    app = Sidecar(cfg)
    await app.data.data_port.listen(HOST, data)  # no upstream monitor: the test moves the state machine
    assert app.control.agent is not None
    await app.control.agent.start()
    app.metrics.known_models.add("m")
    try:
        yield app
    finally:
        await app.close()


def _exchange(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[
        int, dict[str, str]]:
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        answer = conn.getresponse()
        answer.read()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}
    finally:
        conn.close()


def _metric(app: Sidecar, line_start: str) -> float:
    for line in app.metrics.render().decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not exported")


async def test_readyz_degraded_while_warming_and_failing_fast_while_draining(sidecar: Sidecar) -> None:
    machine = sidecar.control.machine
    answer = await sidecar.control.admin.readyz(None)  # type: ignore[arg-type]
    assert answer.status == 503 and "x-envoy-degraded" not in answer.headers
    machine.to(State.WARMING, "test")
    answer = await sidecar.control.admin.readyz(None)  # type: ignore[arg-type]
    assert answer.status == 200 and answer.headers["x-envoy-degraded"] == "true"
    assert _metric(sidecar, "sidecar_warm_capacity") == 0.0
    machine.progress = 0.5
    assert _metric(sidecar, "sidecar_warm_capacity") == 0.5
    machine.to(State.WARM, "test")
    answer = await sidecar.control.admin.readyz(None)  # type: ignore[arg-type]
    assert answer.status == 200 and "x-envoy-degraded" not in answer.headers
    assert "x-envoy-immediate-health-check-fail" not in answer.headers
    assert _metric(sidecar, "sidecar_warm_capacity") == 1.0
    machine.to(State.DRAINING, "test")
    answer = await sidecar.control.admin.readyz(None)  # type: ignore[arg-type]
    assert answer.status == 503 and answer.headers["x-envoy-immediate-health-check-fail"] == "true"
    assert _metric(sidecar, "sidecar_warm_capacity") == 0.0


async def test_data_port_orca_report_drain_header_and_queue_depth(sidecar: Sidecar) -> None:
    port = sidecar.data.data_port._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    machine = sidecar.control.machine
    machine.to(State.WARMING, "test")
    machine.progress = 0.5
    # A health path answered by the sidecar itself (not ready yet): no ORCA unless asked.
    status, headers = await asyncio.to_thread(_exchange, port, "GET", "/v2/health/ready", {})
    assert status == 400 and "endpoint-load-metrics" not in headers
    status, headers = await asyncio.to_thread(_exchange, port, "GET", "/v2/health/ready",
                                              {"endpoint-load-metrics-format": "TEXT"})
    assert envoy_text(headers["endpoint-load-metrics"].encode()) == {
        "application_utilization": 1.0, "rps_fractional": 0.0, "named_metrics.in_flight": 0.0,
        "named_metrics.warm_capacity": 0.5}

    # Two inference calls held by the gate: they are the pod's queue.
    body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [[1.0]]}]})
    calls = [asyncio.create_task(asyncio.to_thread(
        _exchange, port, "POST", "/v2/models/m/infer", {"endpoint-load-metrics-format": "JSON"}, body))
        for _ in range(2)]
    await wait_until_async(_async(lambda: _metric(sidecar, 'sidecar_queue_depth{model="m"}') == 2), 10, "queued")
    assert _metric(sidecar, 'sidecar_model_requests_per_second{model="m"}') > 0
    assert sidecar.control.agent is not None and sidecar.control.agent.port is not None
    assert await asyncio.to_thread(_agent_line, sidecar.control.agent.port) == b"up ready 50%\n"

    # Draining releases them (the model server is gone: 502), each answer telling Envoy to stop now.
    machine.to(State.DRAINING, "test")
    for status, headers in await asyncio.gather(*calls):
        assert status == 502
        assert headers["x-envoy-immediate-health-check-fail"] == "true"
        report = orjson.loads(headers["endpoint-load-metrics"].removeprefix("JSON "))
        assert report["application_utilization"] >= 1.0 and report["named_metrics"]["warm_capacity"] == 0.0
    assert _metric(sidecar, 'sidecar_queue_depth{model="m"}') == 0
    status, headers = await asyncio.to_thread(_exchange, port, "GET", "/v2/health/ready", {})
    assert headers["x-envoy-immediate-health-check-fail"] == "true"

"""The gRPC data port against a real Triton: NVIDIA's own tritonclient.grpc gets the same answers through the
sidecar as directly; the stages (cache, batcher, recorder) treat gRPC callers as HTTP ones; grpc.health.v1
follows the state machine; deadlines and cancellation reach the model server.

What reaches the model server is read from the model server itself (Triton's statistics) or, for
cancellation, from a stand-in gRPC server that records what it was asked. Every wait is on a condition with
a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from sidecar.protogen.grpc.health.v1 import health_pb2
from tests.servers import HOST, MODELS_DIR, TritonServer, free_ports, wait_until
from tests.sidecar_proc import SidecarProcess
from tests.wire import exchange

FAST = ["--set", "upstream.health_interval=0.25", "--set", "log_level=warning", "--set", "shutdown_delay=0"]
INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_counter = iter(range(1, 1 << 30))


def unique(n: int = 4) -> np.ndarray:
    """Values no other call of the session sends: each call is a cache miss unless a test wants a hit."""
    base = next(_counter) * 1000.0 + time.time() % 1000
    return (np.arange(n, dtype=np.float32) + np.float32(base)).reshape(1, n)


def identity_input(data: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def raw_request(model: str, data: np.ndarray, rid: str = "", parameters: dict[str, Any] | None = None) -> bytes:
    msg = service_pb2.ModelInferRequest(model_name=model, id=rid)
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=list(data.shape))
    msg.raw_input_contents.append(data.astype("<f4").tobytes())
    for key, value in (parameters or {}).items():
        msg.parameters[key].double_param = value
    return bytes(msg.SerializeToString())


Meta = dict[str, str]


def unary(url: str, method: str, message: bytes, metadata: tuple[tuple[str, str], ...] = (),
          timeout: float = 30, options: tuple[tuple[str, Any], ...] = ()) -> tuple[bytes, Meta, Meta]:
    """(response, initial metadata, trailing metadata) of one raw call."""
    with grpc.insecure_channel(url, options=options) as channel:
        response, call = channel.unary_unary(method).with_call(message, metadata=metadata, timeout=timeout)
        return response, dict(call.initial_metadata()), dict(call.trailing_metadata())


def health(url: str, service: str) -> int:
    message = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    with grpc.insecure_channel(url) as channel:
        answer = channel.unary_unary("/grpc.health.v1.Health/Check")(message, timeout=5)
    return int(health_pb2.HealthCheckResponse.FromString(answer).status)


def health_or_code(url: str, service: str) -> int | grpc.StatusCode:
    try:
        return health(url, service)
    except grpc.RpcError as e:
        return e.code()


class Watcher(threading.Thread):
    """A grpc.health.v1 Watch stream, read in a thread: every status it sends, in order."""

    def __init__(self, url: str, service: str) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(url)
        self.service = service
        self.statuses: list[int] = []
        self.ended: grpc.StatusCode | None = None

    def run(self) -> None:
        message = health_pb2.HealthCheckRequest(service=self.service).SerializeToString()
        stream = self.channel.unary_stream("/grpc.health.v1.Health/Watch")(message)
        try:
            for answer in stream:
                self.statuses.append(int(health_pb2.HealthCheckResponse.FromString(answer).status))
            self.ended = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.ended = e.code()

    def saw(self, *statuses: int) -> bool:
        return self.statuses == list(statuses)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def grpc_sidecar(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    args = [*FAST, "--set", f"upstream.grpc_url={triton.grpc_url}", "--set", "cache.models=identity_fp32",
            "--set", "batch.models=slow"]
    with SidecarProcess(triton.url, tmp_path_factory.mktemp("grpc-sidecar"), "triton", args) as proc:
        yield proc


# -- tritonclient.grpc: the same answers through the sidecar as directly -----------------------------------


def test_sync_client_gets_the_servers_own_answers(triton: TritonServer, grpc_sidecar: SidecarProcess) -> None:
    data = unique(5)
    add = [grpcclient.InferInput(n, [4], "FP32") for n in ("INPUT0", "INPUT1")]
    add[0].set_data_from_numpy(np.arange(4, dtype=np.float32))
    add[1].set_data_from_numpy(np.ones(4, dtype=np.float32))
    text = grpcclient.InferInput("INPUT0", [1, 2], "BYTES")
    text.set_data_from_numpy(np.array([[b"hello", b"\x00\xff"]], dtype=np.object_))
    answers = []
    for url in (triton.grpc_url, grpc_sidecar.grpc_url):
        with grpcclient.InferenceServerClient(url) as client:
            answers.append([
                client.infer("identity_fp32", [identity_input(data)], request_id="id-1").get_response(),
                client.infer("add_sub", add, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")],
                             request_id="id-2").get_response(),
                client.infer("bytes_echo", [text]).get_response(),
            ])
    direct, through = answers
    assert through == direct  # the very same messages: raw bytes passed back
    assert through[0].id == "id-1" and [o.name for o in through[1].outputs] == ["OUTPUT1"]
    result = grpcclient.InferResult(through[2])
    assert result.as_numpy("OUTPUT0").tolist() == [[b"hello", b"\x00\xff"]]


async def test_async_clients_get_the_servers_own_answers(triton: TritonServer,
                                                         grpc_sidecar: SidecarProcess) -> None:
    data = unique(3)
    results = []
    for url in (triton.grpc_url, grpc_sidecar.grpc_url):
        async with aioclient.InferenceServerClient(url) as client:
            tensor = aioclient.InferInput("INPUT0", [1, 3], "FP32")
            tensor.set_data_from_numpy(data)
            results.append((await client.infer("identity_fp32", [tensor], request_id="aio")).get_response())
    assert results[0] == results[1] and results[1].id == "aio"
    done: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(grpc_sidecar.grpc_url) as sync_client:
        sync_client.async_infer("identity_fp32", [identity_input(data)],
                                lambda result, error: done.put((result, error)), request_id="cb")
        result, error = done.get(timeout=30)
    assert error is None and np.array_equal(result.as_numpy("OUTPUT0"), data)
    assert result.get_response().id == "cb"


def _stream(url: str, requests: list[tuple[str, list[grpcclient.InferInput], str]], expect: int) -> dict[str, Any]:
    """Results by request id (an error as its text) of one ModelStreamInfer stream."""
    got: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        for model, inputs, rid in requests:
            client.async_stream_infer(model, inputs, request_id=rid)
        out: dict[str, Any] = {}
        for _ in range(expect):
            result, error = got.get(timeout=30)
            if error is not None:
                out[f"error {len(out)}"] = str(error)
            else:
                out.setdefault(result.get_response().id, []).append(result.get_response())
        client.stop_stream()
    return out


def test_stream_infer_answers_each_request_as_triton_does(triton: TritonServer,
                                                          grpc_sidecar: SidecarProcess) -> None:
    good = [unique(2) for _ in range(3)]
    bad = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
    bad.set_data_from_numpy(np.ones((1, 3), np.float32))
    bad._raw_content = np.ones(2, np.float32).tobytes()  # fewer bytes than the shape needs
    requests = [("identity_fp32", [identity_input(d)], f"s{i}") for i, d in enumerate(good)]
    requests += [("identity_fp32", [bad], "bad"), ("no_such_model", [identity_input(good[0])], "gone")]
    direct = _stream(triton.grpc_url, requests, len(requests))
    through = _stream(grpc_sidecar.grpc_url, requests, len(requests))
    assert sorted(k for k in through if not k.startswith("error")) == ["s0", "s1", "s2"]
    for i, d in enumerate(good):
        assert through[f"s{i}"] == direct[f"s{i}"]
        assert np.array_equal(grpcclient.InferResult(through[f"s{i}"][0]).as_numpy("OUTPUT0"), d)
    assert sorted(v for k, v in through.items() if k.startswith("error")) == sorted(
        v for k, v in direct.items() if k.startswith("error"))


def test_other_rpcs_pass_through_unchanged(triton: TritonServer, grpc_sidecar: SidecarProcess) -> None:
    views = []
    for url in (triton.grpc_url, grpc_sidecar.grpc_url):
        with grpcclient.InferenceServerClient(url) as client:
            stats = client.get_inference_statistics("identity_fp32", as_json=True)
            views.append({
                "live": client.is_server_live(), "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready("add_sub"),
                "server": client.get_server_metadata(as_json=True),
                "metadata": client.get_model_metadata("add_sub", as_json=True),
                "config": client.get_model_config("bytes_echo", as_json=True),
                "index": client.get_model_repository_index(as_json=True),
                "shm": client.get_system_shared_memory_status(as_json=True),
                "log": client.get_log_settings(as_json=True),
                "stats": sorted(s["name"] for s in stats["model_stats"]),
            })
    assert views[0] == views[1]
    assert views[1]["ready"] and views[1]["model_ready"] and views[1]["stats"] == ["identity_fp32"]


def test_errors_are_the_servers_own(triton: TritonServer, grpc_sidecar: SidecarProcess) -> None:
    bad = grpcclient.InferInput("INPUT0", [1, 2], "INT32")
    bad.set_data_from_numpy(np.ones((1, 2), np.int32))
    seen = []
    for url in (triton.grpc_url, grpc_sidecar.grpc_url):
        with grpcclient.InferenceServerClient(url) as client:
            errors = []
            for model, inputs in (("no_such_model", [identity_input(unique(2))]), ("identity_fp32", [bad])):
                with pytest.raises(InferenceServerException) as caught:
                    client.infer(model, inputs)
                errors.append((caught.value.status(), caught.value.message()))
            seen.append(errors)
    assert seen[0] == seen[1]
    assert seen[1][0][0] == "StatusCode.NOT_FOUND" and seen[1][1][0] == "StatusCode.INVALID_ARGUMENT"


def test_typed_contents_and_metadata(triton: TritonServer, grpc_sidecar: SidecarProcess) -> None:
    values = unique(3).ravel().tolist()
    msg = service_pb2.ModelInferRequest(model_name="identity_fp32", id="typed")
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(values)
    message = msg.SerializeToString()
    direct, _, _ = unary(triton.grpc_url, INFER, message)
    through, initial, _ = unary(grpc_sidecar.grpc_url, INFER, message, (("x-request-id", "req-42"),))
    assert through == direct
    assert initial["x-request-id"] == "req-42" and initial["x-sidecar-state"] == "warm"
    assert initial["x-sidecar-cache"] == "miss"
    _, generated, _ = unary(grpc_sidecar.grpc_url, INFER, raw_request("identity_fp32", unique(2)))
    assert len(generated["x-request-id"]) == 32


def test_messages_far_above_4_mib(grpc_sidecar: SidecarProcess) -> None:
    data = np.random.default_rng(1).random((1, 1_500_000), dtype=np.float32)  # 6 MB each way
    with grpcclient.InferenceServerClient(grpc_sidecar.grpc_url) as client:
        result = client.infer("identity_fp32", [identity_input(data)])
    assert np.array_equal(result.as_numpy("OUTPUT0"), data)


# -- the stages: cache, batching, recording, for gRPC callers as for HTTP ones -------------------------------


def _http_infer(sidecar: SidecarProcess, data: np.ndarray, model: str = "identity_fp32",
                parameters: dict[str, Any] | None = None) -> tuple[list[float], str | None]:
    doc: dict[str, Any] = {"inputs": [{"name": "INPUT0", "shape": list(data.shape), "datatype": "FP32",
                                       "data": data.ravel().tolist()}]}
    if parameters:
        doc["parameters"] = parameters
    answer = exchange(sidecar.url, "POST", f"/v2/models/{model}/infer", orjson.dumps(doc),
                      {"Content-Type": "application/json"}, timeout=30)
    assert answer.status == 200, answer.body
    return orjson.loads(answer.body)["outputs"][0]["data"], answer.header("x-sidecar-cache")


def test_cached_answers_are_shared_between_http_and_grpc(triton: TritonServer,
                                                         grpc_sidecar: SidecarProcess) -> None:
    for http_first in (True, False):
        data = unique(4)
        before = triton.model_counts("identity_fp32")
        if http_first:
            assert _http_infer(grpc_sidecar, data)[1] == "miss"
        response, initial, _ = unary(grpc_sidecar.grpc_url, INFER, raw_request("identity_fp32", data, "mine"))
        if not http_first:
            assert initial["x-sidecar-cache"] == "miss"
            values, verdict = _http_infer(grpc_sidecar, data)
            assert verdict == "hit" and values == data.ravel().tolist()
        else:
            assert initial["x-sidecar-cache"] == "hit"
        answer = service_pb2.ModelInferResponse.FromString(response)
        assert answer.id == "mine"
        assert np.array_equal(grpcclient.InferResult(answer).as_numpy("OUTPUT0"), data)
        assert triton.counts_since("identity_fp32", before, 1)[0] == 1  # one call reached the server


def test_http_and_grpc_callers_share_batches(triton: TritonServer, grpc_sidecar: SidecarProcess) -> None:
    """``slow`` (2 instances, 0.3 s per call) is batched by the sidecar: while both instances are busy,
    HTTP and gRPC arrivals gather into shared batches, and each caller gets exactly its own rows."""
    inputs = [unique(3) for _ in range(12)]
    before = triton.model_counts("slow")

    def call(i: int) -> list[float]:
        if i % 2:
            return _http_infer(grpc_sidecar, inputs[i], "slow", {"delay": 0.3})[0]
        response, _, _ = unary(grpc_sidecar.grpc_url, INFER, raw_request("slow", inputs[i], parameters={"delay": 0.3}))
        return grpcclient.InferResult(service_pb2.ModelInferResponse.FromString(response)).as_numpy(
            "OUTPUT0").ravel().tolist()

    with concurrent.futures.ThreadPoolExecutor(len(inputs)) as pool:
        answers = list(pool.map(call, range(len(inputs))))
    assert answers == [d.ravel().tolist() for d in inputs]
    inferences, executions = triton.counts_since("slow", before, len(inputs))
    assert inferences == len(inputs) and executions < inferences


def test_a_call_recorded_from_grpc_is_replayed_by_warm_up(triton: TritonServer, tmp_path: Path) -> None:
    store = str(tmp_path / "traffic.db")
    args = [*FAST, "--store", store, "--set", f"upstream.grpc_url={triton.grpc_url}",
            "--set", "record.flush_interval=0.1"]
    add = [grpcclient.InferInput(n, [4], "FP32") for n in ("INPUT0", "INPUT1")]
    for tensor in add:
        tensor.set_data_from_numpy(unique(4).ravel())
    with SidecarProcess(triton.url, tmp_path / "a", "triton", args) as first:
        with grpcclient.InferenceServerClient(first.grpc_url) as client:
            client.infer("add_sub", add)
        assert first.terminate() == 0  # the recorder writes what it saw before the store closes
    before = triton.settled_counts("add_sub")
    with SidecarProcess(triton.url, tmp_path / "b", "triton", args) as second:
        replayed = wait_until(lambda: _metric(second, 'sidecar_warmup_replayed_total{model="add_sub",outcome="ok"}'),
                              30, "add_sub replayed")
    assert replayed >= 2  # at least the two passes convergence needs
    assert triton.counts_since("add_sub", before, 2)[0] >= 2


def _metric(sidecar: SidecarProcess, sample: str) -> float:
    for line in exchange(sidecar.admin_url, "GET", "/metrics").body.decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- deadlines and cancellation --------------------------------------------------------------------------------


def test_a_caller_deadline_becomes_the_upstream_deadline(triton: TritonServer, grpc_sidecar: SidecarProcess) -> None:
    elapsed = {}
    for name, url in (("direct", triton.grpc_url), ("sidecar", grpc_sidecar.grpc_url)):
        with grpcclient.InferenceServerClient(url) as client:
            started = time.monotonic()
            with pytest.raises(InferenceServerException) as caught:
                client.infer("slow", [identity_input(unique(2))], parameters={"delay": 3.0}, client_timeout=0.1)
            elapsed[name] = time.monotonic() - started
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert elapsed["sidecar"] < 0.5, elapsed
    # The sidecar let go of its own upstream call at the deadline, not when the model finished 3 s later.
    wait_until(lambda: _metric(grpc_sidecar, "sidecar_in_flight_requests") == 0, 1.0, "the sidecar's call ended")


class RecordingUpstream:
    """A stand-in model server for what Triton cannot show: the gRPC calls it got, their metadata and
    deadline, and whether each was cancelled. ModelInfer waits for request parameter "wait" seconds;
    model "refuse" answers FAILED_PRECONDITION with trailing metadata."""

    def __init__(self) -> None:
        self.port = free_ports(1)[0]
        self.url = f"{HOST}:{self.port}"
        self.calls: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Any = None

    async def _infer(self, message: bytes, context: Any) -> bytes:
        request = service_pb2.ModelInferRequest.FromString(message)
        seen: dict[str, Any] = {"metadata": dict(context.invocation_metadata()),
                                "time_remaining": context.time_remaining(), "cancelled": False}
        self.calls.append(seen)
        if request.model_name == "refuse":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused on purpose", (("x-why", "test"),))
        await context.send_initial_metadata((("x-upstream", "yes"),))
        try:
            await asyncio.sleep(request.parameters["wait"].double_param)
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise
        context.set_trailing_metadata((("x-trailer", "t"),))
        return bytes(service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id).SerializeToString())

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(self._infer)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),))
        self.server.add_insecure_port(self.url)
        await self.server.start()

    def __enter__(self) -> RecordingUpstream:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def recording(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[RecordingUpstream, SidecarProcess]]:
    with RecordingUpstream() as upstream, SidecarProcess(
            triton.url, tmp_path_factory.mktemp("recording"), "triton",
            [*FAST, "--set", f"upstream.grpc_url={upstream.url}"]) as proc:
        yield upstream, proc


def test_deadline_metadata_and_cancellation_reach_the_upstream(
        recording: tuple[RecordingUpstream, SidecarProcess]) -> None:
    upstream, proc = recording
    message = raw_request("m", unique(2), "d1", {"wait": 5.0})
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        unary(proc.grpc_url, INFER, message, (("x-tenant", "acme"), ("x-request-id", "d1")), timeout=0.2,
              options=(("grpc.primary_user_agent", "caller-agent/7"),))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0
    call = wait_until(lambda: upstream.calls and upstream.calls[-1]["cancelled"] and upstream.calls[-1], 5,
                      "the upstream call cancelled")
    assert 0 < call["time_remaining"] <= 0.2
    metadata = call["metadata"]
    assert metadata["x-tenant"] == "acme" and metadata["x-request-id"] == "d1"
    # The caller's hop (its user agent) stays with the caller; the sidecar's own channel speaks for itself.
    assert "caller-agent" not in metadata.get("user-agent", "") and "x-sidecar-state" not in metadata

    async def leave_early() -> None:
        async with grpc.aio.insecure_channel(proc.grpc_url) as channel:
            pending = channel.unary_unary(INFER)(raw_request("m", unique(2), "c1", {"wait": 5.0}))
            await asyncio.sleep(0.3)
            pending.cancel()

    count = len(upstream.calls)
    asyncio.run(leave_early())
    wait_until(lambda: len(upstream.calls) > count and upstream.calls[-1]["cancelled"], 5, "cancel reached upstream")


def test_the_upstreams_metadata_and_errors_come_back(recording: tuple[RecordingUpstream, SidecarProcess]) -> None:
    _, proc = recording
    response, initial, trailing = unary(proc.grpc_url, INFER, raw_request("m", unique(2), "ok", {"wait": 0.0}))
    assert service_pb2.ModelInferResponse.FromString(response).id == "ok"
    assert initial["x-upstream"] == "yes" and initial["x-sidecar-state"] == "warm" and trailing["x-trailer"] == "t"
    with grpc.insecure_channel(proc.grpc_url) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(INFER)(raw_request("refuse", unique(2)), timeout=10)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error.details() == "refused on purpose"
    assert dict(error.trailing_metadata())["x-why"] == "test"


# -- readiness: the state machine behind ServerReady, ModelReady and grpc.health.v1 ---------------------------


def test_not_warm_readiness_and_the_sidecars_own_errors(tmp_path: Path) -> None:
    dead_http, dead_grpc = free_ports(2)
    args = [*FAST, "--set", f"upstream.grpc_url={HOST}:{dead_grpc}", "--set", "gate.policy=reject"]
    with SidecarProcess(f"http://{HOST}:{dead_http}", tmp_path, "triton", args, wait="listening") as proc:
        with grpcclient.InferenceServerClient(proc.grpc_url) as client:
            assert client.is_server_ready() is False and client.is_model_ready("identity_fp32") is False
            with pytest.raises(InferenceServerException, match="not warm yet") as rejected:
                client.infer("identity_fp32", [identity_input(unique(2))])
            assert rejected.value.status() == "StatusCode.UNAVAILABLE"
            with pytest.raises(InferenceServerException, match="model server unavailable") as down:
                client.is_server_live()
            assert down.value.status() == "StatusCode.UNAVAILABLE"
        with grpc.insecure_channel(proc.grpc_url) as channel, pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(INFER)(raw_request("identity_fp32", unique(2)), timeout=10)
        assert dict(caught.value.trailing_metadata())["retry-after"] == "5"
        assert health(proc.grpc_url, "") == NOT_SERVING and health(proc.grpc_url, "readiness") == NOT_SERVING
        assert health(proc.grpc_url, "liveness") == SERVING
        assert health_or_code(proc.grpc_url, "no_such_model") == grpc.StatusCode.NOT_FOUND


def test_health_follows_the_state_machine(tmp_path: Path) -> None:
    """STARTING -> WARMING -> WARM -> COLD (the server killed) -> WARM (restarted) -> DRAINING (SIGTERM):
    Check answers each state, and a Watch stream sees each change of status, once."""
    triton = TritonServer(MODELS_DIR, tmp_path / "triton", models=["identity_fp32"])
    args = [*FAST, "--set", f"upstream.grpc_url={triton.grpc_url}", "--set", "shutdown_delay=1.0"]
    proc = SidecarProcess(triton.url, tmp_path / "sidecar", "triton", args, wait="listening").start()
    watchers = {name: Watcher(proc.grpc_url, name) for name in ("readiness", "identity_fp32", "liveness", "nope")}
    try:
        for w in watchers.values():
            w.start()
        wait_until(lambda: watchers["readiness"].saw(NOT_SERVING), 10, "first status")
        assert health(proc.grpc_url, "liveness") == SERVING
        triton.start()
        wait_until(lambda: health(proc.grpc_url, "") == SERVING, 30, "warm")
        assert health(proc.grpc_url, "identity_fp32") == SERVING
        assert health(proc.grpc_url, "add_sub") == NOT_SERVING  # in the repository, not loaded
        assert health_or_code(proc.grpc_url, "nope") == grpc.StatusCode.NOT_FOUND
        triton.kill()
        wait_until(lambda: health(proc.grpc_url, "readiness") == NOT_SERVING, 10, "cold")
        assert health(proc.grpc_url, "identity_fp32") == NOT_SERVING
        triton.start()
        wait_until(lambda: health(proc.grpc_url, "readiness") == SERVING, 30, "warm again")
        with grpc.insecure_channel(proc.grpc_url) as channel:
            listed = health_pb2.HealthListResponse.FromString(
                channel.unary_unary("/grpc.health.v1.Health/List")(b"", timeout=5))
        assert {k: v.status for k, v in listed.statuses.items() if k in ("", "liveness", "identity_fp32")} == {
            "": SERVING, "liveness": SERVING, "identity_fp32": SERVING}
        stopping = threading.Thread(target=lambda: setattr(proc, "exit_code", proc.terminate()))
        stopping.start()
        wait_until(lambda: watchers["liveness"].saw(SERVING, NOT_SERVING), 5, "draining")
        stopping.join(30)
        assert getattr(proc, "exit_code", None) == 0
        wait_until(lambda: all(w.ended is not None for w in watchers.values()), 10, "streams ended")
        assert watchers["readiness"].saw(NOT_SERVING, SERVING, NOT_SERVING, SERVING, NOT_SERVING)
        assert watchers["identity_fp32"].statuses[-4:] == [SERVING, NOT_SERVING, SERVING, NOT_SERVING]
        assert watchers["nope"].saw(SERVICE_UNKNOWN)
    finally:
        for w in watchers.values():
            w.close()
        proc.stop()
        triton.stop()


# -- the repository API and decoupled models, on a Triton in explicit mode --------------------------------------

_REPEAT_CONFIG = """backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
_REPEAT_MODEL = '''import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Decoupled: IN = n gives n responses (OUT = 0..n-1), then the final flag alone."""

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            for i in range(n):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, SidecarProcess]]:
    work = tmp_path_factory.mktemp("explicit")
    repository = work / "models"
    shutil.copytree(MODELS_DIR / "identity_fp32", repository / "identity_fp32")
    (repository / "repeat" / "1").mkdir(parents=True)
    (repository / "repeat" / "config.pbtxt").write_text(_REPEAT_CONFIG)
    (repository / "repeat" / "1" / "model.py").write_text(_REPEAT_MODEL)
    with TritonServer(repository, work, models=["identity_fp32", "repeat"]) as triton, SidecarProcess(
            triton.url, work, "triton", [*FAST, "--set", f"upstream.grpc_url={triton.grpc_url}",
                                         "--set", "cache.models=identity_fp32"]) as proc:
        yield triton, proc


_TRITON_WRITER_ABORT = "!byte_buffer->Valid()"


def _streams(triton: TritonServer, proc: SidecarProcess, requests: list[tuple[str, list[grpcclient.InferInput], str]],
             expect: int) -> list[dict[str, Any]]:
    """The stream's results directly and through the sidecar. Triton's own gRPC writer aborts now and then on a
    decoupled stream (proto_buffer_writer.h "!byte_buffer->Valid()"; on the direct call as much as through the
    sidecar, before the sidecar is involved: Triton's bug). Only then is the run repeated on a restarted Triton,
    at most twice; any other failure fails the test."""
    for attempt in range(3):
        try:
            return [_stream(url, requests, expect) for url in (triton.grpc_url, proc.grpc_url)]
        except queue.Empty:
            if attempt == 2 or triton.running or _TRITON_WRITER_ABORT not in triton.log_tail(400):
                raise
            triton.start()
            proc.wait_until_ready(60)
    raise AssertionError("unreachable")


# Before the reload test, on purpose: a stream opened on Triton just after identity_fp32 was reloaded
# made Triton abort (above) more often: about 1 module run in 7 when run after it.
def test_decoupled_stream_passes_every_response(explicit: tuple[TritonServer, SidecarProcess]) -> None:
    triton, proc = explicit

    def repeat(n: int) -> list[grpcclient.InferInput]:
        tensor = grpcclient.InferInput("IN", [1], "INT32")
        tensor.set_data_from_numpy(np.array([n], np.int32))
        return [tensor]

    requests = [("repeat", repeat(3), "r3"), ("identity_fp32", [identity_input(unique(2))], "plain"),
                ("repeat", repeat(2), "r2")]
    results = _streams(triton, proc, requests, 3 + 1 + 2)
    for got in results:
        outs = {rid: [grpcclient.InferResult(r).as_numpy("OUT").tolist() for r in got[rid]] for rid in ("r3", "r2")}
        assert outs == {"r3": [[0], [1], [2]], "r2": [[0], [1]]}
    assert results[0]["plain"] == results[1]["plain"]


def test_repository_index_load_and_unload(explicit: tuple[TritonServer, SidecarProcess]) -> None:
    triton, proc = explicit
    with grpcclient.InferenceServerClient(proc.grpc_url) as through, grpcclient.InferenceServerClient(
            triton.grpc_url) as direct:
        assert through.get_model_repository_index(as_json=True) == direct.get_model_repository_index(as_json=True)
        data = unique(2)
        through.infer("identity_fp32", [identity_input(data)])
        through.unload_model("identity_fp32")
        assert direct.is_model_ready("identity_fp32") is False
        with pytest.raises(InferenceServerException) as unloaded:
            through.infer("identity_fp32", [identity_input(unique(2))])
        assert "identity_fp32" in unloaded.value.message()
        through.load_model("identity_fp32")
        assert direct.is_model_ready("identity_fp32") is True
    # The reload through the sidecar dropped the model's cached answers: the same call reaches Triton again.
    wait_until(lambda: unary(proc.grpc_url, INFER, raw_request("identity_fp32", data))[1]["x-sidecar-cache"]
               == "miss", 10, "a fresh miss after the reload")

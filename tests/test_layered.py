"""Layered loading against a real Triton in explicit model-control mode, with genuinely slow first calls.

A repository of torch.compile'd models (copies of tests/models_torch/compiled_mlp) with very different
recorded shares: the sidecar loads them in order of share and warms each as soon as it is loaded; the
pod is ready once the share threshold is warm, before the rest; each model's own readiness follows
that model; a call for a model not loaded is served after its on-demand load under ``hold``; the
operator's model is never unloaded; idle models the sidecar loaded are unloaded and loaded again.
"""

from __future__ import annotations

import concurrent.futures
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from tritonclient.grpc import service_pb2

from sidecar.protogen.grpc.health.v1 import health_pb2
from tests.servers import TritonServer, wait_until
from tests.sidecar_proc import SidecarProcess, http_status
from tests.traffic import recorded_store
from tests.wire import exchange

JSON = {"Content-Type": "application/json"}
SOURCE = Path(__file__).resolve().parent / "models_torch" / "compiled_mlp"
SHARES = {"m_top": 70, "m_second": 20, "m_third": 10}  # recorded calls; m_op is the operator's, m_idle unseen


def body(value: float = 0.5) -> bytes:
    return orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": [value] * 64}]})


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layered-models")
    for name in [*SHARES, "m_op", "m_idle"]:
        shutil.copytree(SOURCE, root / name)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Traffic memory as another replica left it: three models, 70/20/10 of the calls."""
    # Each payload under its own request's key: warm-up replays nothing else.
    path = str(tmp_path_factory.mktemp("layered-store") / "traffic.db")
    return recorded_store(path, {m: (body(), n) for m, n in SHARES.items()})


@pytest.fixture()
def triton(repository: Path, tmp_path: Path) -> Iterator[TritonServer]:
    """Explicit mode; only the operator's model loaded by hand at start."""
    with TritonServer(repository, tmp_path / "triton", models=["m_op"]).start(timeout=120) as server:
        yield server


def status(proc: SidecarProcess) -> dict[str, object]:
    result: dict[str, object] = orjson.loads(exchange(proc.admin_url, "GET", "/status?format=json").body)
    return result


def models(proc: SidecarProcess) -> dict[str, dict[str, object]]:
    found: dict[str, dict[str, object]] = status(proc)["models"]  # type: ignore[assignment]
    return found


def model_ready_status(proc: SidecarProcess, model: str) -> int:
    return exchange(proc.url, "GET", f"/v2/models/{model}/ready", timeout=60).status


def grpc_model_ready(proc: SidecarProcess, model: str) -> tuple[bool, int]:
    """(KServe ModelReady, grpc.health.v1 status) for ``model`` on the sidecar's gRPC port."""
    with grpc.insecure_channel(proc.grpc_url) as channel:
        ready = channel.unary_unary("/inference.GRPCInferenceService/ModelReady")(
            service_pb2.ModelReadyRequest(name=model).SerializeToString(), timeout=60)
        health = channel.unary_unary("/grpc.health.v1.Health/Check")(
            health_pb2.HealthCheckRequest(service=model).SerializeToString(), timeout=10)
    return (service_pb2.ModelReadyResponse.FromString(ready).ready,
            int(health_pb2.HealthCheckResponse.FromString(health).status))


def index_states(triton: TritonServer) -> dict[str, str]:
    entries = orjson.loads(exchange(triton.url, "POST", "/v2/repository/index").body)
    return {e["name"]: e.get("state", "") for e in entries}


def test_models_load_and_warm_by_share_and_the_pod_is_ready_at_the_threshold(
        triton: TritonServer, store: str, tmp_path: Path) -> None:
    args = ["--store", store, "--set", "warmup.ready_share=0.85", "--set", "gate.policy=hold",
            "--set", "warmup.max_batch=2", "--set", f"upstream.grpc_url={triton.grpc_url}"]
    with SidecarProcess(triton.url, tmp_path, "triton", args, wait="listening") as proc:
        wait_until(lambda: http_status(proc.admin_url + "/readyz") == 200, 120, "the pod ready")
        at_ready = models(proc)
        # 70 % + 20 % carry the threshold: warm when the pod turns ready, the 10 % one not yet.
        assert at_ready["m_top"]["state"] == "warm" and at_ready["m_second"]["state"] == "warm", at_ready
        assert at_ready["m_third"]["state"] != "warm", at_ready
        # Each model's own readiness follows that model, not the pod. (Triton answers readiness only once a
        # load in progress is done, so these may take as long as m_third's load.)
        assert model_ready_status(proc, "m_top") == 200
        assert model_ready_status(proc, "m_third") == 400
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert grpc_model_ready(proc, "m_top") == (True, serving)  # the same view on the gRPC port
        if models(proc)["m_third"]["state"] != "warm":
            assert grpc_model_ready(proc, "m_third") == (False, not_serving)
        wait_until(lambda: models(proc)["m_third"]["state"] == "warm", 120, "the rest warmed behind")
        assert model_ready_status(proc, "m_third") == 200
        assert grpc_model_ready(proc, "m_third") == (True, serving)
        final = models(proc)
        # Loaded in order of share: each model's load began after the one above it had warmed.
        starts = [final[m]["since"] for m in SHARES]
        assert starts == sorted(starts), final
        assert all(final[m]["loaded_by_sidecar"] for m in SHARES)
        assert not final["m_op"]["loaded_by_sidecar"] and final["m_op"]["state"] == "warm"
        assert final["m_idle"]["state"] == "unloaded"  # never seen in traffic, never loaded by the sidecar
        states = index_states(triton)
        assert states["m_op"] == "READY" and states["m_idle"] != "READY"

        # A call for a model not loaded, under hold: loaded on demand, warmed, then served.
        answer = exchange(proc.url, "POST", "/v2/models/m_idle/infer", body(), JSON, timeout=120)
        assert answer.status == 200, answer.body
        assert models(proc)["m_idle"]["state"] == "warm" and index_states(triton)["m_idle"] == "READY"


def test_idle_models_are_unloaded_and_loaded_again_on_demand(triton: TritonServer, store: str,
                                                             tmp_path: Path) -> None:
    args = ["--store", store, "--set", "models.idle_unload=3", "--set", "gate.policy=hold",
            "--set", "warmup.max_batch=1", "--set", f"upstream.grpc_url={triton.grpc_url}"]
    with SidecarProcess(triton.url, tmp_path, "triton", args, wait="listening") as proc:
        wait_until(lambda: http_status(proc.admin_url + "/readyz") == 200, 180, "the pod ready")
        # The pod is ready once the share that matters is warm; the last model warms behind (and, idle from
        # then on, is unloaded 3 s later: the check below polls far more often than that).
        wait_until(lambda: all(models(proc)[m]["state"] == "warm" for m in SHARES), 120, "every model warm")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            keep = pool.submit(lambda: [exchange(proc.url, "POST", "/v2/models/m_top/infer", body(), JSON)
                                        for _ in range(20)])
            wait_until(lambda: index_states(triton)["m_third"] != "READY", 30, "the idle model unloaded")
            keep.result()
        assert models(proc)["m_third"]["state"] == "unloaded"
        assert index_states(triton)["m_op"] == "READY"  # the operator's model stays, idle or not
        answer = exchange(proc.url, "POST", "/v2/models/m_third/infer", body(), JSON, timeout=120)
        assert answer.status == 200 and index_states(triton)["m_third"] == "READY"

"""Warm-up from recorded traffic, against real Triton servers (and a real Redis).

Each test starts its own Triton (fresh process = cold, empty statistics) so that what the
sidecar replayed can be read back from Triton's own per-batch-size statistics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from sidecar.identity import request_key, shape_signature
from sidecar.protocols import kserve_http, tfserving_rest
from sidecar.warmup.export import from_tfserving_warmup, to_tfserving_warmup
from sidecar.warmup.store import Sample, StoreLimits, open_store
from tests.servers import MODELS_DIR, KServeServer, RedisServer, ServerExited, TritonServer, wait_until
from tests.sidecar_proc import SidecarProcess, http_status
from tests.wire import exchange

JSON = {"Content-Type": "application/json"}
FAST = ["--set", "record.flush_interval=0.2", "--set", "upstream.health_interval=0.25"]


def infer_body(batch: int, seed: float, **extra: object) -> bytes:
    rows = [[seed + r, seed - r, 0.5 * r] for r in range(batch)]
    return orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [batch, 3], "datatype": "FP32", "data": rows}],
                         **extra})


def send(base: str, model: str, body: bytes) -> int:
    return exchange(base, "POST", f"/v2/models/{model}/infer", body, JSON, timeout=30).status


def batch_counts(triton: TritonServer, model: str) -> dict[int, int]:
    """Triton's own count of executions per batch size for ``model``."""
    stats = orjson.loads(exchange(triton.url, "GET", f"/v2/models/{model}/stats").body)
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["model_stats"][0]["batch_stats"]}


def ran_batches(triton: TritonServer, model: str, sizes: set[int], times: int = 1) -> dict[int, int]:
    """``batch_counts`` once each of ``sizes`` ran ``times`` or more. Triton counts an execution just after
    it answers, so the last pass of a warm-up that just ended may take a moment to show."""
    def done() -> dict[int, int] | None:
        counts = batch_counts(triton, model)
        return counts if all(counts.get(b, 0) >= times for b in sizes) else None

    try:
        return wait_until(done, 5, f"batch sizes {sorted(sizes)} of {model} run {times}x")
    except TimeoutError as e:
        raise AssertionError(f"{e}: {batch_counts(triton, model)}") from None


def status(sidecar: SidecarProcess) -> dict:  # type: ignore[type-arg]
    return orjson.loads(exchange(sidecar.admin_url, "GET", "/status?format=json").body)


def record_traffic(triton: TritonServer, workdir: Path, store: str) -> None:
    """Real traffic through a first sidecar: batch sizes 1, 2 and 4, the batch-1 call most often."""
    with SidecarProcess(triton.url, workdir, "triton", ["--store", store, *FAST]) as recorder:
        for _ in range(5):
            assert send(recorder.url, "identity_fp32", infer_body(1, 1.0)) == 200
        for batch in (2, 4):
            assert send(recorder.url, "identity_fp32", infer_body(batch, float(batch))) == 200
    # Leaving the context sends SIGTERM: the recorder flushes what it saw.


@pytest.fixture()
def cold_triton(tmp_path: Path) -> Iterator[TritonServer]:
    with TritonServer(MODELS_DIR, tmp_path / "triton", models=["identity_fp32", "slow"]) as server:
        yield server


def test_recorded_traffic_is_replayed_before_ready(cold_triton: TritonServer, tmp_path: Path) -> None:
    store = str(tmp_path / "traffic.db")
    with TritonServer(MODELS_DIR, tmp_path / "t0", models=["identity_fp32"]) as first:
        record_traffic(first, tmp_path, store)

    plan = subprocess.run([sys.executable, "-m", "sidecar", "plan", "--store", store, "--upstream", cold_triton.url],
                          capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert "identity_fp32" in plan.stdout and "batch sizes [1, 2, 4]" in plan.stdout, plan.stdout

    assert batch_counts(cold_triton, "identity_fp32") == {}
    with SidecarProcess(cold_triton.url, tmp_path, "triton", ["--store", store, *FAST]) as sidecar:
        # Ready only now: every recorded shape already ran, at least twice.
        ran_batches(cold_triton, "identity_fp32", {1, 2, 4}, times=2)
        report = status(sidecar)["last_warmup"]
        assert report["complete"] and report["passes"] >= 2
        assert all(g["converged"] for g in report["groups"])
        text = exchange(sidecar.admin_url, "GET", "/status").body.decode()
        assert "state:    warm" in text and "identity_fp32" in text
        metrics = exchange(sidecar.admin_url, "GET", "/metrics").body.decode()
        assert 'sidecar_state{state="warm"} 1.0' in metrics
        assert "sidecar_warmup_progress 1.0" in metrics
        assert 'sidecar_warmup_replayed_total{model="identity_fp32",outcome="ok"}' in metrics


def test_seed_requests_and_the_shape_sweep(cold_triton: TritonServer, tmp_path: Path) -> None:
    """Nothing recorded yet: a seed request, stacked into batch sizes 1, 2, 4, 8 (max_batch_size 8)."""
    seeds = tmp_path / "seeds" / "identity_fp32"
    seeds.mkdir(parents=True)
    (seeds / "one.json").write_bytes(infer_body(1, 7.0))
    (seeds / "broken.json").write_bytes(b'{"inputs": "nope"}')  # reported and skipped
    args = ["--store", str(tmp_path / "empty.db"), "--set", f"warmup.seeds={seeds.parent}", *FAST]
    with SidecarProcess(cold_triton.url, tmp_path, "triton", args) as sidecar:
        ran_batches(cold_triton, "identity_fp32", {1, 2, 4, 8})
        kinds = {c["kind"] for m in status(sidecar)["plan"] for c in m["calls"]}
        assert kinds == {"seed", "sweep"}
    assert "broken.json skipped" in sidecar.log_path.read_text()


def test_triton_restart_under_the_sidecar_rewarms(cold_triton: TritonServer, tmp_path: Path) -> None:
    store = str(tmp_path / "traffic.db")
    record_traffic(cold_triton, tmp_path, store)
    with SidecarProcess(cold_triton.url, tmp_path, "triton", ["--store", store, *FAST]) as sidecar:
        assert status(sidecar)["warmups_run"] == 1
        cold_triton.kill()
        killed = time.monotonic()
        wait_until(lambda: http_status(sidecar.admin_url + "/readyz") == 503, 2.0, "readyz 503 after the kill")
        assert time.monotonic() - killed < 2.0
        started = time.monotonic()
        assert send(sidecar.url, "identity_fp32", infer_body(1, 1.0)) == 502  # refused fast, no hang
        assert time.monotonic() - started < 2.0
        cold_triton.start()
        wait_until(lambda: http_status(sidecar.admin_url + "/readyz") == 200, 60, "ready again by itself")
        assert status(sidecar)["warmups_run"] == 2
        ran_batches(cold_triton, "identity_fp32", {1, 2, 4})  # the new Triton was re-warmed


@pytest.fixture()
def slow_store(cold_triton: TritonServer, tmp_path: Path) -> str:
    """Recorded traffic whose replay takes seconds: the `slow` model, asked to wait 1 s a call."""
    store = str(tmp_path / "slow.db")
    with SidecarProcess(cold_triton.url, tmp_path, "triton", ["--store", store, *FAST]) as recorder:
        assert send(recorder.url, "slow", infer_body(1, 1.0, parameters={"delay": 1.0})) == 200
    return store


def start_warming(triton: TritonServer, workdir: Path, store: str, *extra: str) -> SidecarProcess:
    args = ["--store", store, *FAST, "--set", "warmup.max_batch=1", *extra]
    sidecar = SidecarProcess(triton.url, workdir, "triton", args, wait="listening").start()
    wait_until(lambda: status(sidecar)["state"] == "warming", 10, "warming")
    return sidecar


def test_hold_policy_answers_after_warm_up(cold_triton: TritonServer, tmp_path: Path, slow_store: str) -> None:
    sidecar = start_warming(cold_triton, tmp_path, slow_store, "--set", "gate.policy=hold")
    try:
        started = time.monotonic()
        answer = exchange(sidecar.url, "POST", "/v2/models/identity_fp32/infer", infer_body(1, 2.0), JSON)
        assert answer.status == 200
        assert answer.header("x-sidecar-state") == "warm"  # it was held until warm
        assert time.monotonic() - started < 30  # within gate.hold_timeout
        assert http_status(sidecar.admin_url + "/readyz") == 200
    finally:
        sidecar.stop()


def test_reject_policy_and_not_ready_health_paths(
    cold_triton: TritonServer, tmp_path: Path, slow_store: str
) -> None:
    sidecar = start_warming(cold_triton, tmp_path, slow_store, "--set", "gate.policy=reject")
    try:
        answer = exchange(sidecar.url, "POST", "/v2/models/identity_fp32/infer", infer_body(1, 2.0), JSON)
        assert answer.status == 503 and answer.header("Retry-After") == "5"
        assert "not warm" in orjson.loads(answer.body)["error"]
        # Triton itself says ready; the sidecar answers its paths "not ready" until warm.
        assert http_status(cold_triton.url + "/v2/health/ready") == 200
        assert http_status(sidecar.url + "/v2/health/ready") == 400
        assert http_status(sidecar.url + "/v2/models/identity_fp32/ready") == 400
        assert http_status(sidecar.admin_url + "/startupz") == 200
        assert http_status(sidecar.admin_url + "/readyz") == 503
        wait_until(lambda: http_status(sidecar.admin_url + "/readyz") == 200, 30, "warm")
        assert http_status(sidecar.url + "/v2/health/ready") == 200
        assert send(sidecar.url, "identity_fp32", infer_body(1, 2.0)) == 200
    finally:
        sidecar.stop()


TOKEN = "test-admin-token"


def test_a_rewarm_keeps_a_warm_pod_and_its_models_ready(
    cold_triton: TritonServer, tmp_path: Path, slow_store: str
) -> None:
    """POST /warmup on a warm pod replays behind readiness: under gate.policy=reject, no caller gets a 503 and
    the pod and the model being replayed stay ready while it runs."""
    args = ["--store", slow_store, *FAST, "--set", "warmup.max_batch=1", "--set", "gate.policy=reject",
            "--set", f"admin_token={TOKEN}"]
    with SidecarProcess(cold_triton.url, tmp_path, "triton", args) as sidecar:
        assert status(sidecar)["warmups_run"] == 1
        before = cold_triton.settled_counts("slow")
        posted = time.time()
        answer = exchange(sidecar.admin_url, "POST", "/warmup", b"", {"Authorization": f"Bearer {TOKEN}"})
        assert answer.status == 202 and "stays ready" in orjson.loads(answer.body)["warmup"]
        # The re-warm's first replayed call of `slow` (1 s) is answered: its next pass is under way now.
        cold_triton.counts_since("slow", before, 1)
        for _ in range(2):
            assert send(sidecar.url, "slow", infer_body(1, 3.0)) == 200  # queued behind the replay, not refused
            assert http_status(sidecar.url + "/v2/models/slow/ready") == 200
            assert http_status(sidecar.url + "/v2/health/ready") == 200
            assert http_status(sidecar.admin_url + "/readyz") == 200
        report = wait_until(lambda: (r := status(sidecar)["last_warmup"])["started"] >= posted - 1 and r, 30,
                            "the re-warm's report")
        assert report["complete"] and report["passes"] >= 2, report
        assert status(sidecar)["warmups_run"] == 2
        assert status(sidecar)["models"]["slow"]["state"] == "warm"
        # The re-warm replayed at least two passes of the recorded call; the two probes came on top.
        assert cold_triton.counts_since("slow", before, 4)[0] >= 4


def older_payload(model: str, body: bytes) -> bytes:
    """A payload as sidecars before version 2 wrote it: the caller's own JSON bytes."""
    header = orjson.dumps({"v": 1, "path": f"/v2/models/{model}/infer",
                           "headers": [["Content-Type", "application/json"]]})
    return struct.pack("<I", len(header)) + header + body


def test_sequence_calls_are_never_recorded_nor_replayed(cold_triton: TritonServer, tmp_path: Path) -> None:
    """Calls of a sequence: not recorded now, and those an older version recorded are never replayed (each
    kind at a batch size of its own, so Triton's statistics show what ran)."""
    store = str(tmp_path / "traffic.db")
    sequence = infer_body(2, 2.0, parameters={"sequence_id": 7, "sequence_start": True})
    with (TritonServer(MODELS_DIR, tmp_path / "t0", models=["identity_fp32"]) as first,
          SidecarProcess(first.url, tmp_path, "triton", ["--store", store, *FAST]) as recorder):
        assert send(recorder.url, "identity_fp32", infer_body(1, 1.0)) == 200
        for _ in range(3):
            assert send(recorder.url, "identity_fp32", sequence) == 200
    older = infer_body(4, 4.0, parameters={"sequence_id": 9, "sequence_end": True})
    request = kserve_http.decode_request("identity_fp32", "", older, None)

    async def add_older() -> None:
        traffic = open_store(store, StoreLimits())
        await traffic.add([Sample("identity_fp32", request_key(request), shape_signature(request), 4, 10,
                                  older_payload("identity_fp32", older))])
        await traffic.close()

    asyncio.run(add_older())
    assert batch_counts(cold_triton, "identity_fp32") == {}
    args = ["--store", store, *FAST, "--set", "warmup.max_batch=1"]  # no shape sweep: only recorded calls run
    with SidecarProcess(cold_triton.url, tmp_path, "triton", args) as sidecar:
        ran_batches(cold_triton, "identity_fp32", {1}, times=2)
        data = status(sidecar)
        assert data["plan_skipped"] == {"stateful": 1}, data["plan_skipped"]
        assert [c["batch"] for m in data["plan"] for c in m["calls"]] == [1]
        cold_triton.settled_counts("identity_fp32")
        counts = batch_counts(cold_triton, "identity_fp32")
        assert set(counts) == {1}, counts  # neither the sequence recorded now nor the older one ran


def test_two_sidecars_share_redis_and_survive_its_loss(tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "redis") as redis,
        TritonServer(MODELS_DIR, tmp_path / "t1", models=["identity_fp32"]) as t1,
        TritonServer(MODELS_DIR, tmp_path / "t2", models=["identity_fp32"]) as t2,
    ):
        store = redis.url
        with SidecarProcess(t1.url, tmp_path, "triton", ["--store", store, *FAST]) as first:
            for batch in (1, 2, 4):
                assert send(first.url, "identity_fp32", infer_body(batch, 3.0)) == 200
            wait_until(lambda: b"identity_fp32" in subprocess.run(
                [sys.executable, "-m", "sidecar", "plan", "--store", store, "--upstream", t2.url],
                capture_output=True, timeout=60).stdout, 10, "the fleet memory in Redis")
            # A second replica that never saw a request warms up with what the first recorded.
            with SidecarProcess(t2.url, tmp_path, "triton", ["--store", store, *FAST]) as second:
                ran_batches(t2, "identity_fp32", {1, 2, 4})
                assert status(second)["last_warmup"]["complete"]
            # Redis dies mid-traffic: the request path shows no errors.
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(send, first.url, "identity_fp32", infer_body(1 + i % 4, float(i)))
                           for i in range(200)]
                redis.kill()
                statuses = [f.result(timeout=60) for f in futures]
            assert set(statuses) == {200}
            assert all(send(first.url, "identity_fp32", infer_body(2, 9.0)) == 200 for _ in range(20))
            assert http_status(first.admin_url + "/readyz") == 200


def export(fmt: str, store: str, upstream: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "export-warmup", "--format", fmt, "--model",
                           "identity_fp32", "--out", str(out), "--store", store, "--upstream", upstream],
                          capture_output=True, text=True, timeout=60)


def test_exports_load_as_the_model_servers_own_warm_up(cold_triton: TritonServer, tmp_path: Path) -> None:
    store = str(tmp_path / "traffic.db")
    record_traffic(cold_triton, tmp_path, store)
    triton_out, tf_out = tmp_path / "triton-export", tmp_path / "assets.extra" / "tf_serving_warmup_requests"
    done = export("triton", store, cold_triton.url, triton_out)
    assert done.returncode == 0, done.stderr
    done = export("tfserving", store, cold_triton.url, tf_out)
    assert done.returncode == 0, done.stderr

    # TF Serving's file: TFRecord framing and CRCs hold, every record a PredictLog of a recorded call.
    imported = from_tfserving_warmup(tf_out.read_bytes())
    assert not imported.skipped
    assert sorted(r.inputs[0].shape[0] for r in imported.requests) == [1, 2, 4]

    # Triton's: the model, with the snippet appended and warmup/ beside it, loads and runs each sample.
    repo = tmp_path / "repo"
    model_dir = shutil.copytree(MODELS_DIR / "identity_fp32", repo / "identity_fp32")
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text() + (triton_out / "model_warmup.pbtxt").read_text())
    shutil.copytree(triton_out / "warmup", model_dir / "warmup")
    with TritonServer(repo, tmp_path / "t-warm", models=["identity_fp32"], extra_args=["--log-verbose=1"]) as t:
        samples = set(re.findall(r"running warmup sample '(recorded_\d+_batch_\d+)'", t.log_path.read_text()))
        assert {s.rsplit("_", 1)[1] for s in samples} == {"1", "2", "4"}, samples
    # And Triton really reads the files: a truncated one fails the model's load.
    first = sorted((model_dir / "warmup").iterdir())[0]
    first.write_bytes(first.read_bytes()[:-1])
    with pytest.raises((ServerExited, TimeoutError)):
        TritonServer(repo, tmp_path / "t-bad", models=["identity_fp32"]).start(timeout=30)


def model_ready(base: str) -> bool:
    """KServe v1's model status (``{"name", "ready"}``); TF Serving's own: test_codec_tfserving_rest."""
    return bool(orjson.loads(exchange(base, "GET", "/v1/models/tfmodel").body)["ready"])


def test_tfserving_upstream_is_warmed_from_records_and_a_savedmodel(kserve: KServeServer, tmp_path: Path) -> None:
    """TF Serving's REST API (a real KServe ModelServer): recorded calls and a SavedModel's own warm-up
    file are replayed; while not warm, the data port shows the model not ready."""
    store = str(tmp_path / "tf.db")
    args = ["--store", store, *FAST, "--set", f"upstream.models={kserve.model}"]
    with SidecarProcess(kserve.url, tmp_path, "tfserving", args) as recorder:
        for body in ({"instances": [[1.0, 2.0]]}, {"instances": [[1.0, 2.0], [3.0, 4.0]]}):
            assert exchange(recorder.url, "POST", kserve.predict_path, orjson.dumps(body), JSON).status == 200
    savedmodel = tmp_path / "models" / "tfmodel" / "1"  # TF Serving's layout: <model base path>/<version>
    (savedmodel / "assets.extra").mkdir(parents=True)
    seed = tfserving_rest.decode_request("tfmodel", "", "", "predict", b'{"inputs": {"x": [[5.0, 6.0, 7.0]]}}')
    (savedmodel / "assets.extra" / "tf_serving_warmup_requests").write_bytes(to_tfserving_warmup([seed], "").data)
    refused = tmp_path / "seeds" / "tfmodel"
    refused.mkdir(parents=True)
    (refused / "refused.json").write_bytes(b'{"instances": [["not a number"]]}')  # KServe answers 400

    # With a call the server refuses and warmup.require_complete, the pod stays not ready.
    strict = [*args, "--set", f"warmup.savedmodel={savedmodel}", "--set", f"warmup.seeds={refused.parent}",
              "--set", "warmup.require_complete=true"]
    with SidecarProcess(kserve.url, tmp_path, "tfserving", strict, wait="listening") as sidecar:
        report = wait_until(lambda: status(sidecar)["last_warmup"], 30, "a finished warm-up")
        assert not report["complete"] and "HTTP 400" in report["errors"][0], report
        kinds = {c["kind"] for m in status(sidecar)["plan"] for c in m["calls"]}
        assert kinds == {"recorded", "seed"}
        assert sum(g["converged"] for g in report["groups"]) == 3  # 2 recorded shapes + the SavedModel's
        assert status(sidecar)["state"] == "warming"
        assert http_status(sidecar.admin_url + "/readyz") == 503
        assert model_ready(kserve.url) and not model_ready(sidecar.url)
    # Without require_complete the refused call is reported, and the pod becomes ready.
    with SidecarProcess(kserve.url, tmp_path, "tfserving", strict[:-2]) as sidecar:
        assert status(sidecar)["last_warmup"]["reason"] == "1 call(s) failed"
        assert model_ready(sidecar.url)
        metrics = exchange(sidecar.admin_url, "GET", "/metrics").body.decode()
        assert 'sidecar_warmup_replayed_total{model="tfmodel",outcome="error"} 1.0' in metrics
        assert "sidecar_warmup_incomplete_total 1.0" in metrics


def test_a_model_loaded_into_a_running_triton_is_warmed_too(cold_triton: TritonServer, tmp_path: Path) -> None:
    """Triton never went down, but a model version it did not have is cold: the sidecar re-warms."""
    store = str(tmp_path / "traffic.db")
    with SidecarProcess(cold_triton.url, tmp_path, "triton", ["--store", store, *FAST]) as sidecar:
        assert status(sidecar)["warmups_run"] == 1
        assert send(sidecar.url, "identity_fp32", infer_body(2, 1.0)) == 200
        assert exchange(cold_triton.url, "POST", "/v2/repository/models/add_sub/load").status == 200
        wait_until(lambda: status(sidecar)["warmups_run"] == 2 and status(sidecar)["state"] == "warm", 30,
                   "a second warm-up after the load")
        # Triton may stall its HTTP port while it loads (then the probe times out: "not answering"), or
        # answer not ready while the model loads ("lost readiness"); if neither, the new version in its
        # repository index is what moves the state.
        assert re.search(r"state warm -> cold: model server (not answering|lost readiness|loaded add_sub version 1)",
                         sidecar.log_path.read_text())
        # The second warm-up replayed what was recorded in between.
        ran_batches(cold_triton, "identity_fp32", {2}, times=3)

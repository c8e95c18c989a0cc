"""The genuinely cold model (tests/models_torch/compiled_mlp) is cold where a real one is.

A real Triton loads the torch.compile'd MLP with a fresh Inductor cache: the first call compiles
(slow), repeated calls at that batch size are fast, and the first call at a new batch size compiles
again. The cold-start benchmark and the warm-up tests rely on exactly these cliffs.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.servers import TritonServer
from tests.sidecar_proc import SidecarProcess
from tests.wire import exchange

MODELS_TORCH_DIR = Path(__file__).resolve().parent / "models_torch"
MODEL = "compiled_mlp"
FEATURES, OUTPUTS = 64, 8
STEADY_CALLS = 50
COLD_FLOOR_S = 0.25  # a compile takes 0.6 s and more here; a warm call a few ms


@pytest.fixture(scope="module")
def torch_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = TritonServer(MODELS_TORCH_DIR, tmp_path_factory.mktemp("triton-torch"), models=[MODEL])
    with server.start(timeout=120):
        yield server


def infer(server: TritonServer | SidecarProcess, rows: np.ndarray) -> tuple[float, np.ndarray]:
    """One request with ``rows`` as the batch, to Triton or a sidecar; returns (latency in seconds, OUTPUT0)."""
    body = {"inputs": [{"name": "INPUT0", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.ravel().tolist()}]}
    started = time.perf_counter()
    answer = exchange(server.url, "POST", f"/v2/models/{MODEL}/infer", json.dumps(body).encode(),
                      {"Content-Type": "application/json"}, timeout=120)
    latency = time.perf_counter() - started
    assert answer.status == 200, answer.body[:500]
    (output,) = json.loads(answer.body)["outputs"]
    assert output["name"] == "OUTPUT0"
    assert output["shape"] == [rows.shape[0], OUTPUTS]
    return latency, np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100, method="inclusive")[98]


def test_first_call_per_batch_size_compiles_and_steady_calls_are_fast(torch_triton: TritonServer) -> None:
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((4, FEATURES), dtype=np.float32)

    first_b1, alone = infer(torch_triton, rows[:1])
    steady = [infer(torch_triton, rows[:1])[0] for _ in range(STEADY_CALLS)]
    first_b4, together = infer(torch_triton, rows)
    again_b4 = [infer(torch_triton, rows)[0] for _ in range(5)]

    steady_p99 = p99(steady)
    report = (f"first b1 {first_b1 * 1e3:.0f} ms, steady b1 p50 {statistics.median(steady) * 1e3:.1f} ms "
              f"p99 {steady_p99 * 1e3:.1f} ms, first b4 {first_b4 * 1e3:.0f} ms, "
              f"warm b4 max {max(again_b4) * 1e3:.1f} ms")
    assert first_b1 > max(5 * steady_p99, COLD_FLOOR_S), report
    assert statistics.median(steady) < 0.05, report
    assert first_b4 > max(5 * steady_p99, COLD_FLOOR_S), report
    assert max(again_b4) < first_b4 / 5, report

    # Deterministic weights, and a row's result does not depend on the batch it travels in.
    assert np.all(np.isfinite(together))
    np.testing.assert_allclose(together[:1], alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(infer(torch_triton, rows[:1])[1], alone, rtol=0, atol=0)


def test_after_ready_the_first_call_at_every_recorded_batch_size_is_warm(tmp_path: Path) -> None:
    """The headline: record real traffic, restart model server and sidecar cold, and once /readyz
    says 200 the first call at each recorded batch size is within 3x the steady-state p99."""
    store = str(tmp_path / "traffic.db")
    recorded = (1, 2, 4)
    rng = np.random.default_rng(11)
    rows = rng.standard_normal((8, FEATURES), dtype=np.float32)
    fast = ["--store", store, "--set", "record.flush_interval=0.2", "--set", "upstream.health_interval=0.25"]
    with (TritonServer(MODELS_TORCH_DIR, tmp_path / "t1", models=[MODEL]).start(timeout=120) as triton,
          SidecarProcess(triton.url, tmp_path, "triton", fast) as sidecar):
        for batch in recorded:
            for _ in range(3):
                infer(sidecar, rows[:batch])

    # Both restarted: a new Triton process compiles from nothing (fresh Inductor cache).
    with (TritonServer(MODELS_TORCH_DIR, tmp_path / "t2", models=[MODEL]).start(timeout=120) as triton,
          SidecarProcess(triton.url, tmp_path, "triton", fast) as sidecar):  # returns once /readyz is 200
        first = {batch: infer(sidecar, rows[:batch])[0] for batch in recorded}
        steady = [infer(sidecar, rows[:batch])[0] for _ in range(20) for batch in recorded]
        never_seen = infer(sidecar, rows[:8])[0]  # control: a batch size no one sent is still cold

    steady_p99 = p99(steady)
    report = (f"first calls ms {({b: round(s * 1e3, 1) for b, s in first.items()})}, steady p99 "
              f"{steady_p99 * 1e3:.1f} ms, unrecorded batch 8 {never_seen * 1e3:.0f} ms")
    assert all(latency <= 3 * steady_p99 for latency in first.values()), report
    assert never_seen > max(5 * steady_p99, COLD_FLOOR_S), report

"""Layered loading: time until the pod serves 90 % of recorded traffic warm, ready_share 0.9 vs all models.

    .venv/bin/python bench/layered.py [--rounds 2]

Six torch.compile'd models (copies of tests/models_torch/compiled_mlp, each compiling on its first
call and at each new batch size) with recorded shares 70/20/5/3/1/1 %, Triton in explicit mode with
nothing loaded, everything cold (a fresh Inductor cache per model load). The sidecar loads and warms
the models in order of share. Case A turns ready at 90 % of the share (warmup.ready_share=0.9),
case B only once every model is warm (1.0, the behaviour without layering). For each: seconds from
the sidecar's start until /readyz says 200, and, right after, the slowest of the first calls to the
two top models against their steady p99. Rounds alternate the cases (the machine is shared).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from tests import traffic  # noqa: E402
from tests.servers import TritonServer, wait_until  # noqa: E402
from tests.sidecar_proc import SidecarProcess, http_status  # noqa: E402
from tests.wire import exchange  # noqa: E402

SOURCE = ROOT / "tests" / "models_torch" / "compiled_mlp"
SHARES = {"m1": 70, "m2": 20, "m3": 5, "m4": 3, "m5": 1, "m6": 1}
JSON = {"Content-Type": "application/json"}


def body(value: float) -> bytes:
    return orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": [value] * 64}]})


def repository(root: Path) -> Path:
    for name in SHARES:
        shutil.copytree(SOURCE, root / name)
    return root


def recorded_store(path: Path) -> str:
    return traffic.recorded_store(str(path), {m: (body(float(i)), share * 10)
                                              for i, (m, share) in enumerate(SHARES.items())})


def one_case(work: Path, share: float) -> dict[str, float]:
    store = recorded_store(work / "traffic.db")
    with TritonServer(repository(work / "models"), work / "triton", models=[]).start(timeout=120) as triton:
        args = ["--store", store, "--set", f"warmup.ready_share={share}", "--set", "warmup.max_batch=4",
                "--set", "log_level=warning", "--set", f"upstream.grpc_url={triton.grpc_url}"]
        started = time.monotonic()
        with SidecarProcess(triton.url, work, "triton", args, wait="listening") as proc:
            wait_until(lambda: http_status(proc.admin_url + "/readyz") == 200, 600, "ready")
            ready_after = time.monotonic() - started
            first = [_latency(proc.url, m) for m in ("m1", "m2")]
            steady = [_latency(proc.url, m) for _ in range(40) for m in ("m1", "m2")]
    p99 = statistics.quantiles(steady, n=100)[98]
    return {"ready_s": ready_after, "first_max_ms": max(first) * 1e3, "steady_p99_ms": p99 * 1e3,
            "first_over_p99": max(first) / p99}


def _latency(url: str, model: str) -> float:
    started = time.perf_counter()
    answer = exchange(url, "POST", f"/v2/models/{model}/infer", body(0.25), JSON, timeout=60)
    if answer.status != 200:
        raise RuntimeError(f"{model}: {answer.status} {answer.body[:200]!r}")
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    results: dict[float, list[dict[str, float]]] = {0.9: [], 1.0: []}
    for r in range(args.rounds):
        for share in ((0.9, 1.0) if r % 2 == 0 else (1.0, 0.9)):
            with tempfile.TemporaryDirectory(prefix="layered-") as tmp:
                results[share].append(one_case(Path(tmp), share))
            print(f"round {r + 1} ready_share {share}: {results[share][-1]}", file=sys.stderr)
    print(f"\nLayered loading, six torch.compile models (shares {list(SHARES.values())} %), median of "
          f"{args.rounds} rounds\n")
    print("| case | ready after (s) | rounds (s) | first call to top models (ms) | steady p99 (ms) | first / p99 |")
    print("|---|---|---|---|---|---|")
    for share, name in ((0.9, "ready_share 0.9 (layered)"), (1.0, "ready_share 1.0 (all models first)")):
        rs = results[share]
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        spread = ", ".join(f"{r['ready_s']:.1f}" for r in rs)
        print(f"| {name} | {med['ready_s']:.1f} | {spread} | {med['first_max_ms']:.1f} | {med['steady_p99_ms']:.1f} | "
              f"{med['first_over_p99']:.1f}x |")
    sooner = statistics.median(r["ready_s"] for r in results[1.0]) / statistics.median(
        r["ready_s"] for r in results[0.9])
    print(f"\nready sooner with ready_share 0.9: {sooner:.1f}x   (goal >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

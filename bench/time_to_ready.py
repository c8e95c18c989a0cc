"""Time to ready with nothing to warm beyond one pass (issue 17), against Triton's own:

    .venv/bin/python bench/time_to_ready.py [--rounds 5]

A real Triton serving ``identity_fp32`` (no compile cliff), launched from nothing in each round, three ways,
interleaved round by round: (a) Triton alone, launch to ``/v2/health/ready`` 200; (b) the pod as the shipped
manifests run it, the sidecar a native sidecar (an init container Kubernetes starts first, the model server
once the sidecar's startup probe passes), launch to the sidecar's ``/readyz`` 200; (c) the classic-sidecar
overlay, both containers started together. The sidecar has a store recorded beforehand (50 distinct calls).
Prints the medians, their spread and the ratios to (a).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from tests.servers import MODELS_DIR, TritonServer  # noqa: E402
from tests.sidecar_proc import SidecarProcess  # noqa: E402
from tests.wire import exchange  # noqa: E402

MODEL = "identity_fp32"
QUIET = ["--set", "record.flush_interval=0.2", "--set", "shutdown_delay=0", "--set", "log_level=warning",
         "--set", "workers=auto"]  # the product's default (the tests' helper pins one process)
JSON = {"Content-Type": "application/json"}


def record(work: Path, store: str, calls: int = 50) -> None:
    with (TritonServer(MODELS_DIR, work / "record", models=[MODEL]) as triton,
          SidecarProcess(triton.url, work / "record-sidecar", "triton", ["--store", store, *QUIET]) as sidecar):
        for i in range(calls):
            body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": "FP32",
                                             "data": [i, 1, 2]}]})
            assert exchange(sidecar.url, "POST", f"/v2/models/{MODEL}/infer", body, JSON).status == 200


def alone(work: Path) -> float:
    started = time.monotonic()
    with TritonServer(MODELS_DIR, work, models=[MODEL]).start(120):
        return time.monotonic() - started


def pod(work: Path, store: str, together: bool) -> float:
    triton = TritonServer(MODELS_DIR, work / "triton", models=[MODEL])
    sidecar = SidecarProcess(triton.url, work / "sidecar", "triton", ["--store", store, *QUIET], wait="listening")
    with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(1) as pool:
        stack.callback(triton.stop)  # the sidecar stops first (registered last)
        stack.callback(sidecar.stop)
        started = time.monotonic()
        if together:
            listening = pool.submit(sidecar.start)
            triton.start(120)
            listening.result()
        else:
            sidecar.start()  # the native sidecar's startup probe (/livez) passes: the model server starts
            triton.start(120)
        sidecar.wait_until_ready(timeout=120)
        return time.monotonic() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    cases: dict[str, Callable[[Path, str], float]] = {
        "(a) Triton alone": lambda w, s: alone(w),
        "(b) pod, native sidecar (shipped manifests)": lambda w, s: pod(w, s, together=False),
        "(c) pod, classic sidecar (both started together)": lambda w, s: pod(w, s, together=True),
    }
    with tempfile.TemporaryDirectory(prefix="time-to-ready-") as tmp:
        work = Path(tmp)
        store = str(work / "traffic.db")
        record(work, store)
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(args.rounds):
            for i, (name, run) in enumerate(cases.items()):
                seconds[name].append(run(work / f"r{r}-{i}", store))
            print(f"round {r + 1}: " + ", ".join(f"{v[-1]:.2f} s" for v in seconds.values()), flush=True)
    anchor = statistics.median(seconds["(a) Triton alone"])
    print("\n| case | time to ready s (median) | spread | vs Triton alone |\n|---|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {min(values):.2f}-{max(values):.2f} | {median / anchor:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

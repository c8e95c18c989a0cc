"""Proxy overhead: direct Triton vs HAProxy vs the sidecar, in one run.

    .venv/bin/python bench/proxy_overhead.py [--seconds 8] [--rounds 3] [--connections 16]

Two loads: the issue's 16 connections (throughput ratio, p50/p99), and 1 connection, where
nothing queues and the p50 difference is the latency the hop itself adds. The targets are
measured in interleaved rounds (the machine is shared and noisy) and each figure is the median
over rounds; the ratios are what to compare across runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from bench.loadgen import HAProxy, WrkResult, run_wrk  # noqa: E402
from tests.servers import MODELS_DIR, TritonServer  # noqa: E402
from tests.sidecar_proc import SidecarProcess  # noqa: E402

PATH = "/v2/models/identity_fp32/infer"
BODY = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})


def median_result(results: list[WrkResult]) -> WrkResult:
    return WrkResult(
        rps=statistics.median(r.rps for r in results),
        p50=statistics.median(r.p50 for r in results),
        p99=statistics.median(r.p99 for r in results),
        requests=sum(r.requests for r in results),
        errors=sum(r.errors for r in results),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        with (
            TritonServer(MODELS_DIR, work / "triton", models=["identity_fp32"]) as triton,
            HAProxy(work, triton.url) as haproxy,
            SidecarProcess(triton.url, work, "triton", ["--set", "log_level=warning"]) as sidecar,
        ):
            targets = {"direct Triton": triton.url, "HAProxy": haproxy.url, "sidecar": sidecar.url}
            for url in targets.values():  # warm every path once, unmeasured
                run_wrk(url + PATH, BODY, args.connections, 2)
            loaded = measure(targets, args.connections, args.rounds, args.seconds)
            unloaded = measure(targets, 1, args.rounds, args.seconds / 2)

    report(loaded, args, args.connections, goals=True)
    report(unloaded, args, 1, goals=False)
    return 0


def measure(targets: dict[str, str], connections: int, rounds: int, seconds: float) -> dict[str, WrkResult]:
    results: dict[str, list[WrkResult]] = {name: [] for name in targets}
    names = list(targets)
    for r in range(rounds):
        for name in names[r % 3:] + names[: r % 3]:  # rotate the order each round
            results[name].append(run_wrk(targets[name] + PATH, BODY, connections, seconds))
            print(f"c={connections} round {r + 1} {name}: {results[name][-1].rps:,.0f} req/s", file=sys.stderr)
    return {name: median_result(rs) for name, rs in results.items()}


def report(med: dict[str, WrkResult], args: argparse.Namespace, connections: int, goals: bool) -> None:
    direct, side, ha = med["direct Triton"], med["sidecar"], med["HAProxy"]
    print(f"\n{connections} connection(s), median of {args.rounds} interleaved wrk runs, "
          "model identity_fp32 (HTTP JSON)\n")
    print("| target | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|")
    for name, res in med.items():
        print(res.row(name))
    print()
    print(f"sidecar throughput / direct: {side.rps / direct.rps:.2f}x" + ("   (goal >= 0.6x)" if goals else ""))
    print(f"HAProxy throughput / direct: {ha.rps / direct.rps:.2f}x")
    print(f"sidecar added p50: {(side.p50 - direct.p50) * 1e3:+.2f} ms" + ("   (goal <= 0.5 ms)" if goals else ""))
    print(f"sidecar added p99: {(side.p99 - direct.p99) * 1e3:+.2f} ms")
    print(f"HAProxy added p50: {(ha.p50 - direct.p50) * 1e3:+.2f} ms, p99: {(ha.p99 - direct.p99) * 1e3:+.2f} ms")


if __name__ == "__main__":
    sys.exit(main())

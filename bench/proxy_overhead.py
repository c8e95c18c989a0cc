"""Proxy overhead: direct Triton vs HAProxy vs the sidecar, in one run.

    .venv/bin/python bench/proxy_overhead.py [--seconds 8] [--rounds 3] [--connections 16]

Three loads: the issue's 16 connections (throughput ratio, p50/p99, and each proxy's CPU time per
call read from /proc), 1 connection (nothing queues, so the p50 difference is the latency the hop
itself adds), and the ceiling: a trivial answer the sidecar's front gives by itself with no
upstream hop (a second sidecar in front of nothing answers ``GET /v2/health/ready`` "not ready").
The targets run in interleaved rounds (the machine is shared and noisy); each figure is the median
over rounds, with the spread (min-max) beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from bench.loadgen import HAProxy, WrkResult, run_wrk, run_wrk_script  # noqa: E402
from tests.servers import MODELS_DIR, TritonServer, free_ports  # noqa: E402
from tests.sidecar_proc import SidecarProcess  # noqa: E402

PATH = "/v2/models/identity_fp32/infer"
BODY = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Run:
    wrk: WrkResult
    cpu_us: dict[str, float]  # process name -> CPU microseconds per call


@dataclass
class Target:
    url: str
    pids: dict[str, int]  # the processes whose CPU a call through this target costs


def run(target: Target, connections: int, seconds: float) -> Run:
    before = {name: cpu_seconds(pid) for name, pid in target.pids.items()}
    result = run_wrk(target.url + PATH, BODY, connections, seconds)
    calls = max(result.requests, 1)
    return Run(result, {name: (cpu_seconds(pid) - before[name]) / calls * 1e6 for name, pid in target.pids.items()})


def median_result(results: list[WrkResult]) -> WrkResult:
    return WrkResult(
        rps=statistics.median(r.rps for r in results),
        p50=statistics.median(r.p50 for r in results),
        p99=statistics.median(r.p99 for r in results),
        requests=sum(r.requests for r in results),
        errors=sum(r.errors for r in results),
    )


def measure(targets: dict[str, Target], connections: int, rounds: int, seconds: float) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {name: [] for name in targets}
    names = list(targets)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
            runs[name].append(run(targets[name], connections, seconds))
            print(f"c={connections} round {r + 1} {name}: {runs[name][-1].wrk.rps:,.0f} req/s", file=sys.stderr)
    return runs


def trivial(url: str, connections: int, rounds: int, seconds: float, work: Path) -> list[WrkResult]:
    script = work / "ready.lua"
    script.write_text('wrk.method = "GET"\n')
    return [run_wrk_script(url + "/v2/health/ready", script, connections, seconds) for _ in range(rounds)]


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        (dead,) = free_ports(1)
        with (
            TritonServer(MODELS_DIR, work / "triton", models=["identity_fp32"]) as triton,
            HAProxy(work, triton.url) as haproxy,
            SidecarProcess(triton.url, work, "triton", ["--set", "log_level=warning"]) as sidecar,
            SidecarProcess(f"http://127.0.0.1:{dead}", work / "cold", "triton", ["--set", "log_level=warning"],
                           wait="listening") as cold,
        ):
            assert triton.pid and haproxy.pid and sidecar.pid
            targets = {
                "direct Triton": Target(triton.url, {"Triton": triton.pid}),
                "HAProxy": Target(haproxy.url, {"proxy": haproxy.pid, "Triton": triton.pid}),
                "sidecar": Target(sidecar.url, {"proxy": sidecar.pid, "Triton": triton.pid}),
            }
            for target in targets.values():  # warm every path once, unmeasured
                run_wrk(target.url + PATH, BODY, args.connections, 2)
            loaded = measure(targets, args.connections, args.rounds, args.seconds)
            unloaded = measure(targets, 1, args.rounds, args.seconds / 2)
            ceiling = trivial(cold.url, args.connections, args.rounds, args.seconds / 2, work)

    report(loaded, args.rounds, args.connections)
    report(unloaded, args.rounds, 1)
    goals(loaded, unloaded, ceiling)
    return 0


def report(runs: dict[str, list[Run]], rounds: int, connections: int) -> None:
    print(f"\n{connections} connection(s), median (min-max) of {rounds} interleaved wrk runs, "
          "model identity_fp32 (HTTP JSON)\n")
    print("| target | req/s | p50 ms | p99 ms | errors | proxy CPU us/call | Triton CPU us/call |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        med = median_result([r.wrk for r in rs])
        proxy = spread([r.cpu_us["proxy"] for r in rs], "{:.0f}") if "proxy" in rs[0].cpu_us else "-"
        print(f"| {name} | {spread([r.wrk.rps for r in rs], '{:,.0f}')} | {med.p50 * 1e3:.2f} | "
              f"{med.p99 * 1e3:.2f} | {med.errors} | {proxy} | {spread([r.cpu_us['Triton'] for r in rs], '{:.0f}')} |")


def goals(loaded: dict[str, list[Run]], unloaded: dict[str, list[Run]], ceiling: list[WrkResult]) -> None:
    def med(runs: dict[str, list[Run]], name: str) -> WrkResult:
        return median_result([r.wrk for r in runs[name]])

    direct, side, ha = med(loaded, "direct Triton"), med(loaded, "sidecar"), med(loaded, "HAProxy")
    added = (med(unloaded, "sidecar").p50 - med(unloaded, "direct Triton").p50) * 1e3
    ha_added = (med(unloaded, "HAProxy").p50 - med(unloaded, "direct Triton").p50) * 1e3
    cpu = statistics.median(r.cpu_us["proxy"] for r in loaded["sidecar"])
    ha_cpu = statistics.median(r.cpu_us["proxy"] for r in loaded["HAProxy"])
    top = statistics.median(r.rps for r in ceiling)
    rows = [
        ("throughput / direct Triton, 16 connections", f"{side.rps / direct.rps:.2f}x",
         f"{ha.rps / direct.rps:.2f}x", ">= 0.7x", side.rps / direct.rps >= 0.7),
        ("added p50, 1 connection", f"{added:+.2f} ms", f"{ha_added:+.2f} ms", "<= 0.15 ms", added <= 0.15),
        ("CPU per proxied call", f"{cpu:.0f} us", f"{ha_cpu:.0f} us", "<= 70 us", cpu <= 70),
        ("trivial answer by the front (no upstream hop)", f"{top:,.0f} req/s", "-", ">= 25,000 req/s",
         top >= 25_000),
    ]
    print("\n| figure | sidecar | HAProxy | goal | |")
    print("|---|---|---|---|---|")
    for figure, value, reference, goal, met in rows:
        print(f"| {figure} | {value} | {reference} | {goal} | {'met' if met else '**not met**'} |")
    print(f"\ntrivial answer runs: {', '.join(f'{r.rps:,.0f}' for r in ceiling)} req/s "
          f"(GET /v2/health/ready on a sidecar whose model server is absent: its own 'not ready')")


if __name__ == "__main__":
    sys.exit(main())

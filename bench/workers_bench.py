"""Data-plane workers: one worker against two, against today's single process and against Triton itself.

    .venv/bin/python bench/workers_bench.py [--seconds 5] [--rounds 3] [--baseline REV] [--workers N]

One Triton (identity_fp32, and identity_cached: a copy with Triton's own response cache) and, in front
of it, sidecars with ``workers=1`` and ``workers=N`` (2 by default: this machine's cores), caching
identity_cached only, plus the sidecar at ``--baseline`` (a git revision, run from a worktree; the code
before workers) for the "no regression for small pods" figure. Every figure is a ratio to the anchor
the issue names, each the median of interleaved rounds (order rotated each round), spread beside it:

1. HTTP cache hits, 16 connections (wrk): workers=N vs workers=1 (goal >= 1.5x) and vs Triton's own
   response cache (goal >= 0.8x);
2. HTTP pass-through of identity_fp32 at 16 and 64 connections: workers=N vs direct Triton (goal
   >= 0.8x); workers=1 vs the baseline revision (goal: within 5%);
3. gRPC ModelInfer (grpc.aio clients in 2 processes, 16 callers): pass-through, workers=N vs direct
   Triton gRPC (goal >= 0.6x); hits, workers=N vs Triton's cache over gRPC (goal >= 0.5x).

The load generators share the machine's cores with Triton and the sidecar: on 2 cores wrk alone takes
most of one, which caps every target here (the anchors included) below what a pod with its own cores
would serve.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cache_bench import Measured, interleaved, run_wrk, same_body_lua  # noqa: E402
from bench.grpc_bench import CACHED, cached_repository, infer_message, load, measure  # noqa: E402
from tests.servers import TritonServer  # noqa: E402
from tests.sidecar_proc import SidecarProcess  # noqa: E402

BODY = b'{"inputs":[{"name":"INPUT0","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
PLAIN = "/v2/models/identity_fp32/infer"
HIT = f"/v2/models/{CACHED}/infer"
QUIET = ["--set", "log_level=warning", "--set", "shutdown_delay=0", "--set", f"cache.models={CACHED}"]


class Baseline(SidecarProcess):
    """The sidecar of an older revision: it has no ``workers`` setting to be told."""

    def command(self) -> list[str]:
        command = super().command()
        at = command.index("workers=1")
        return command[: at - 1] + command[at + 1 :]


def baseline_tree(rev: str) -> Path:
    """A worktree of ``rev`` (made once): its sidecar runs from there with this venv's packages."""
    tree = Path(tempfile.gettempdir()) / f"warm-sidecar-{rev}"
    if not (tree / "sidecar").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(tree), rev],
                       check=True, capture_output=True)
    return tree


def ratio(a: Measured, b: Measured) -> str:
    """Median ratio, and the spread of per-round ratios (rounds are interleaved: round r of each side)."""
    per_round = [x.rps / y.rps for x, y in zip(a.rounds, b.rounds, strict=True)]
    return f"**{a.med.rps / b.med.rps:.2f}x** ({min(per_round):.2f}-{max(per_round):.2f})"


def verdict(value: float, goal: float, at_least: bool = True) -> str:
    return "met" if (value >= goal if at_least else value <= goal) else "**not met**"


def table(measured: dict[str, Measured]) -> list[str]:
    lines = ["| target | req/s (median) | spread | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for name, m in measured.items():
        med = m.med
        lines.append(f"| {name} | {med.rps:,.0f} | {m.rps_spread()} | {med.p50 * 1e3:.3f} | {med.p99 * 1e3:.3f} | "
                     f"{med.errors} |")
    return lines


def http_section(title: str, targets: dict[str, tuple[str, Callable[[int], str], int | None]],
                 connections: int, args: argparse.Namespace) -> tuple[list[str], dict[str, Measured]]:
    for url, lua, _ in targets.values():  # warm every path (and fill every cache), unmeasured
        run_wrk(url, lua(0), connections, 2)
    measured = interleaved(targets, connections, args.rounds, args.seconds, title)
    return [f"### {title}, {connections} connections, median of {args.rounds} interleaved wrk runs of "
            f"{args.seconds:g} s", "", *table(measured), ""], measured


def grpc_section(targets: dict[str, tuple[str, bytes]], args: argparse.Namespace) -> dict[str, list[Any]]:
    for target, message in targets.values():
        load(target, message, args.concurrency, args.procs, 1)  # warm (and fill the caches), unmeasured
    return measure(targets, args)


def grpc_ratio(runs: dict[str, list[Any]], a: str, b: str) -> tuple[float, str]:
    value = statistics.median(r.rps for r in runs[a]) / statistics.median(r.rps for r in runs[b])
    per_round = [x.rps / y.rps for x, y in zip(runs[a], runs[b], strict=True)]
    return value, f"**{value:.2f}x** ({min(per_round):.2f}-{max(per_round):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16, help="gRPC callers")
    ap.add_argument("--procs", type=int, default=2, help="gRPC client processes")
    ap.add_argument("--baseline", default="b1fe2d0", help="git revision of the single-process code before workers")
    args = ap.parse_args()
    n = args.workers
    out = ["## Data-plane workers", "", "Command:", "",
           f"    .venv/bin/python bench/workers_bench.py --seconds {args.seconds:g} --rounds {args.rounds} "
           f"--workers {n} --baseline {args.baseline}", "",
           f"Machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}", ""]
    tree = baseline_tree(args.baseline)
    same = same_body_lua(BODY)
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp:
        work = Path(tmp)
        with TritonServer(cached_repository(work), work, models=["identity_fp32", CACHED],
                          extra_args=["--cache-config=local,size=16777216"]) as triton:
            grpc_up = ["--set", f"upstream.grpc_url={triton.grpc_url}"]
            with (SidecarProcess(triton.url, work, "triton", [*QUIET, *grpc_up, "--set", "workers=1"]) as one,
                  SidecarProcess(triton.url, work, "triton", [*QUIET, *grpc_up, "--set", f"workers={n}"]) as many,
                  Baseline(triton.url, work, "triton", [*QUIET, *grpc_up], env={"PYTHONPATH": str(tree)}) as old):
                def target(url: str) -> tuple[str, Callable[[int], str], int | None]:
                    return (url, lambda r: same, None)

                lines, hits = http_section("1. HTTP cache hits", {
                    "Triton, its own response cache": target(triton.url + HIT),
                    "sidecar workers=1": target(one.url + HIT), f"sidecar workers={n}": target(many.url + HIT),
                }, 16, args)
                w_many, w_one = hits[f"sidecar workers={n}"], hits["sidecar workers=1"]
                triton_hits = hits["Triton, its own response cache"]
                out += [
                    *lines,
                    f"- workers={n} / workers=1: {ratio(w_many, w_one)} (goal >= 1.5x: "
                    f"{verdict(w_many.med.rps / w_one.med.rps, 1.5)})",
                    f"- workers={n} / Triton's own cache: {ratio(w_many, triton_hits)} (goal >= 0.8x: "
                    f"{verdict(w_many.med.rps / triton_hits.med.rps, 0.8)})", ""]
                for connections in (16, 64):
                    lines, passed = http_section("2. HTTP pass-through (identity_fp32)", {
                        "direct Triton": target(triton.url + PLAIN), f"baseline {args.baseline}": target(
                            old.url + PLAIN),
                        "sidecar workers=1": target(one.url + PLAIN), f"sidecar workers={n}": target(
                            many.url + PLAIN),
                    }, connections, args)
                    w_many, w_one = passed[f"sidecar workers={n}"], passed["sidecar workers=1"]
                    direct, base = passed["direct Triton"], passed[f"baseline {args.baseline}"]
                    out += [
                        *lines,
                        f"- workers={n} / direct Triton: {ratio(w_many, direct)} (goal >= 0.8x: "
                        f"{verdict(w_many.med.rps / direct.med.rps, 0.8)})",
                        f"- workers=1 / baseline {args.baseline}: {ratio(w_one, base)} (goal: within 5%: "
                        f"{verdict(w_one.med.rps / base.med.rps, 0.95)})", ""]
                plain, cached = infer_message("identity_fp32"), infer_message(CACHED)
                runs = grpc_section({
                    "direct Triton": (triton.grpc_url, plain), "sidecar workers=1": (one.grpc_url, plain),
                    f"sidecar workers={n}": (many.grpc_url, plain),
                    "Triton, its own cache": (triton.grpc_url, cached), "sidecar workers=1, hits": (
                        one.grpc_url, cached),
                    f"sidecar workers={n}, hits": (many.grpc_url, cached),
                }, args)
    out += [f"### 3. gRPC ModelInfer, {args.concurrency} callers in {args.procs} client processes, median of "
            f"{args.rounds} interleaved rounds of {args.seconds:g} s", "",
            "| target | calls/s (median) | spread | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        out.append(f"| {name} | {statistics.median(r.rps for r in rs):,.0f} | {min(r.rps for r in rs):,.0f}-"
                   f"{max(r.rps for r in rs):,.0f} | {statistics.median(r.p50 for r in rs) * 1e3:.2f} | "
                   f"{statistics.median(r.p99 for r in rs) * 1e3:.2f} | {sum(r.errors for r in rs)} |")
    passed_value, passed_text = grpc_ratio(runs, f"sidecar workers={n}", "direct Triton")
    hit_value, hit_text = grpc_ratio(runs, f"sidecar workers={n}, hits", "Triton, its own cache")
    _, one_text = grpc_ratio(runs, f"sidecar workers={n}", "sidecar workers=1")
    out += ["", f"- pass-through, workers={n} / direct Triton gRPC: {passed_text} (goal >= 0.6x: "
            f"{verdict(passed_value, 0.6)}); workers={n} / workers=1: {one_text}",
            f"- hits, workers={n} / Triton's cache over gRPC: {hit_text} (goal >= 0.5x: {verdict(hit_value, 0.5)})",
            "", f"Load average at the end: {os.getloadavg()[0]:.2f}"]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

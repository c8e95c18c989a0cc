"""The cold-start timeline, the project's headline figure. Everything is started cold, in one run:

    .venv/bin/python bench/cold_start.py [--per-batch 100] [--steady 100] [--concurrency 2] [--first-minute]

(a) Triton alone, no warm-up; (b) Triton with its own ``model_warmup`` at batch 1; (c) Triton
behind the sidecar, with traffic recorded beforehand by a sidecar in front of another Triton.
Traffic waits for each case's readiness signal, as a Kubernetes Service would, then sends
``--per-batch`` calls at each batch size 1, 2, 4, 8 (the window measured), then ``--steady`` more
(the steady state). Prints a markdown table, and writes the plot (SVG) and the raw samples (JSON).

``--first-minute``: the window is instead every call sent from ready until 60 s after launch (the
issue-17 view): calls served in the first minute, and those within 3x the steady p99 of Triton alone
(a call that waited for a compile is not served in any sense a user would accept).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from bench import svgplot  # noqa: E402
from bench.coldstart import BATCHES, MODELS_TORCH_DIR, Case, record, run_sidecar, run_triton, triton_warmup_repo  # noqa: E402

GOAL = 3.0  # with the sidecar, no call after ready slower than 3x steady-state p99
FIRST_MINUTE_GOAL = 5.0  # calls within 3x steady p99 in the first minute, against Triton alone


def table(cases: list[Case], window: str) -> str:
    head = " | ".join(f"worst of {window}, batch {b}" for b in BATCHES)
    lines = [f"| case | time to ready s | first call ms | {head} | steady p99 ms | worst / steady p99 | errors |",
             "|---" * (6 + len(BATCHES)) + "|"]
    for c in cases:
        if not c.samples:  # ready after the window ended (--first-minute)
            lines.append(f"| {c.name} | {c.ready:.1f} | - |" + " - |" * len(BATCHES) + " - | - | - |")
            continue
        p99 = c.steady_p99()
        worst = max(c.worst(b) for b in BATCHES)
        cells = " | ".join(f"{c.worst(b) * 1e3:,.0f}" for b in BATCHES)
        lines.append(f"| {c.name} | {c.ready:.1f} | {c.first().latency * 1e3:,.0f} | {cells} | {p99 * 1e3:.1f} | "
                     f"**{worst / p99:,.1f}x** | {c.errors()} |")
    return "\n".join(lines)


def first_minute_table(cases: list[Case], minute: float) -> tuple[str, float]:
    """Calls served in the first ``minute`` after launch, and those within 3x Triton alone's steady p99."""
    bar = GOAL * cases[0].steady_p99()
    within = [sum(s.status == 200 and s.latency <= bar for s in c.samples) for c in cases]
    lines = [f"| case | time to ready s | calls served in the first {minute:g} s | within {GOAL:g}x steady p99 "
             f"({bar * 1e3:.1f} ms) | vs Triton alone |", "|---|---|---|---|---|"]
    for c, n in zip(cases, within, strict=True):
        served = sum(s.status == 200 for s in c.samples)
        lines.append(f"| {c.name} | {c.ready:.1f} | {served:,} | {n:,} | {n / max(1, within[0]):.2f}x |")
    return "\n".join(lines), within[-1] / max(1, within[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-batch", type=int, default=100)
    p.add_argument("--steady", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--plot", default=None, help="SVG written (default docs/cold_start.svg, none with --first-minute)")
    p.add_argument("--raw", default=str(ROOT / "bench" / "out" / "cold_start.json"))
    p.add_argument("--first-minute", nargs="?", type=float, const=60.0, default=None, metavar="SECONDS",
                   help="send from ready until SECONDS (60) after launch and count the calls served")
    args = p.parse_args()
    minute = args.first_minute
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        work = Path(tmp)
        store = str(work / "traffic.db")
        print("recording traffic through a sidecar ...", flush=True)
        record(work, store)
        cases = []
        for name, run in (
            ("(a) Triton, no warm-up", lambda n: run_triton(n, MODELS_TORCH_DIR, work, args.per_batch, args.steady,
                                                              args.concurrency, minute)),
            ("(b) Triton model_warmup batch 1", lambda n: run_triton(n, triton_warmup_repo(work), work, args.per_batch,
                                                                       args.steady, args.concurrency, minute)),
            ("(c) Triton behind the sidecar", lambda n: run_sidecar(work, store, args.per_batch, args.steady,
                                                                      args.concurrency, n, minute)),
        ):
            print(f"{name} ...", flush=True)
            cases.append(run(name))
    print()
    if minute is not None:
        text, gain = first_minute_table(cases, minute)
        print(text)
        print(f"\nwith the sidecar, {gain:.2f}x the calls within {GOAL:g}x steady p99 that Triton alone served in "
              f"its first {minute:g} s (goal >= {FIRST_MINUTE_GOAL:g}x: "
              f"{'met' if gain >= FIRST_MINUTE_GOAL else 'NOT met'})\n")
    print(table(cases, f"first {args.per_batch}" if minute is None else "the minute"))
    sidecar = cases[-1]
    if sidecar.samples:
        ratio = max(sidecar.worst(b) for b in BATCHES) / sidecar.steady_p99()
        print(f"\nwith the sidecar, the slowest call after ready is {ratio:.1f}x steady p99 "
              f"(goal <= {GOAL:g}x: {'met' if ratio <= GOAL else 'NOT met'})")
    plot = args.plot or (None if minute is not None else str(ROOT / "docs" / "cold_start.svg"))
    if plot:
        Path(plot).write_text(svgplot.render(
            [svgplot.Series(c.name, [(s.sent, s.latency) for s in c.samples], c.ready) for c in cases],
            f"Cold start: latency of the first {args.per_batch} calls per batch size (1, 2, 4, 8)"))
    Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
    Path(args.raw).write_bytes(orjson.dumps([dataclasses.asdict(c) for c in cases]))
    print(f"plot: {plot or 'none'}; raw samples: {args.raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The cold-start timeline, the project's headline figure. Everything is started cold, in one run:

    .venv/bin/python bench/cold_start.py [--per-batch 100] [--steady 100] [--concurrency 2]

(a) Triton alone, no warm-up; (b) Triton with its own ``model_warmup`` at batch 1; (c) Triton
behind the sidecar, with traffic recorded beforehand by a sidecar in front of another Triton.
Traffic waits for each case's readiness signal, as a Kubernetes Service would, then sends
``--per-batch`` calls at each batch size 1, 2, 4, 8 (the window measured), then ``--steady`` more
(the steady state). Prints a markdown table, and writes the plot (SVG) and the raw samples (JSON).
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


def table(cases: list[Case], per_batch: int) -> str:
    head = " | ".join(f"worst of first {per_batch}, batch {b}" for b in BATCHES)
    lines = [f"| case | time to ready s | first call ms | {head} | steady p99 ms | worst / steady p99 | errors |",
             "|---" * (6 + len(BATCHES)) + "|"]
    for c in cases:
        p99 = c.steady_p99()
        worst = max(c.worst(b) for b in BATCHES)
        cells = " | ".join(f"{c.worst(b) * 1e3:,.0f}" for b in BATCHES)
        lines.append(f"| {c.name} | {c.ready:.1f} | {c.first().latency * 1e3:,.0f} | {cells} | {p99 * 1e3:.1f} | "
                     f"**{worst / p99:,.1f}x** | {c.errors()} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-batch", type=int, default=100)
    p.add_argument("--steady", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--plot", default=str(ROOT / "docs" / "cold_start.svg"))
    p.add_argument("--raw", default=str(ROOT / "bench" / "out" / "cold_start.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        work = Path(tmp)
        store = str(work / "traffic.db")
        print("recording traffic through a sidecar ...", flush=True)
        record(work, store)
        cases = []
        for name, run in (
            ("(a) Triton, no warm-up", lambda n: run_triton(n, MODELS_TORCH_DIR, work, args.per_batch, args.steady,
                                                              args.concurrency)),
            ("(b) Triton model_warmup batch 1", lambda n: run_triton(n, triton_warmup_repo(work), work,
                                                                       args.per_batch, args.steady, args.concurrency)),
            ("(c) Triton behind the sidecar", lambda n: run_sidecar(work, store, args.per_batch, args.steady,
                                                                      args.concurrency, n)),
        ):
            print(f"{name} ...", flush=True)
            cases.append(run(name))
    print()
    print(table(cases, args.per_batch))
    sidecar = cases[-1]
    ratio = max(sidecar.worst(b) for b in BATCHES) / sidecar.steady_p99()
    print(f"\nwith the sidecar, the slowest call after ready is {ratio:.1f}x steady p99 "
          f"(goal <= {GOAL:g}x: {'met' if ratio <= GOAL else 'NOT met'})")
    Path(args.plot).write_text(svgplot.render(
        [svgplot.Series(c.name, [(s.sent, s.latency) for s in c.samples], c.ready) for c in cases],
        f"Cold start: latency of the first {args.per_batch} calls per batch size (1, 2, 4, 8)"))
    Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
    Path(args.raw).write_bytes(orjson.dumps([dataclasses.asdict(c) for c in cases]))
    print(f"plot: {args.plot}; raw samples: {args.raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

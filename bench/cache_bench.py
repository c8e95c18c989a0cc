"""Response cache benchmarks, in one run: four figures, each a ratio to its own anchor.

    .venv/bin/python bench/cache_bench.py [--seconds 5] [--rounds 3] [--connections 16]

1. Hit throughput: a sidecar answering from its in-process tier vs Triton answering the same call
   from its own response cache (``--cache-config local,...`` and ``response_cache { enable: true }``
   in a copy of tests/models/identity_fp32), wrk at ``--connections``. Goal >= 0.5x, stretch 1x.
2. Shared-tier hit: a sidecar whose in-process tier holds nothing (``cache.max_bytes=1``) answering
   from Redis vs one answering from memory, both over the same filled Redis; the p50 difference at
   one connection (nothing queues) is what the Redis read adds. Goal <= 1 ms.
3. Hit ratio of the in-process tier (W-TinyLFU) vs plain LRU at equal memory on a Zipf(1.1) trace
   over 10k items, pure Python; several seeds. Goal: higher.
4. Miss cost: the same sidecar with the cache on but every call unique (a wrk Lua script numbers
   every body) vs the cache off, over Triton. Goal: throughput >= 1/1.1 of cache-off (<= +10 %).

Load figures come from interleaved rounds (the order rotates every round; the machine is shared
and noisy); each is the median over rounds, with the spread (min-max) beside it.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from bench.loadgen import WrkResult, _seconds  # noqa: E402
from sidecar.cache import Entry, MemoryTier  # noqa: E402
from sidecar.identity import cache_key  # noqa: E402
from sidecar.protocols.request import InferenceRequest, InferenceResponse, Protocol, Tensor  # noqa: E402
from tests.servers import MODELS_DIR, RedisServer, TritonServer  # noqa: E402
from tests.sidecar_proc import SidecarProcess  # noqa: E402
from tests.wire import exchange  # noqa: E402

MODEL = "identity_fp32"
PATH = f"/v2/models/{MODEL}/infer"
BODY = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
QUIET = ["--set", "log_level=warning", "--set", "shutdown_delay=0"]
COMMAND = "  .venv/bin/python bench/cache_bench.py"


# -- wrk ---------------------------------------------------------------------------------------------------


def run_wrk(url: str, lua: str, connections: int, seconds: float) -> WrkResult:
    """wrk with a Lua script of our own (one thread, as bench/loadgen.py runs it)."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "cache.lua"
        script.write_text(lua)
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                              "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> WrkResult:
    def grab(pattern: str) -> str:
        found = re.search(pattern, out)
        if found is None:
            raise ValueError(f"wrk output without {pattern!r}:\n{out}")
        return found.group(1)

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    return WrkResult(float(grab(r"Requests/sec:\s+([\d.]+)")), _seconds(grab(r"\s50%\s+(\S+)")),
                     _seconds(grab(r"\s99%\s+(\S+)")), int(grab(r"(\d+) requests in")), errors)


def same_body_lua(body: bytes) -> str:
    return ('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {_lua_string(body)}\n")


def unique_body_lua(offset: int) -> str:
    """Every request a new body: INPUT0 = [offset, n, 3, 4], n counting from 1 (exact in FP32 below 2^24)."""
    return ('local n = 0\nlocal headers = {["Content-Type"] = "application/json"}\n'
            "request = function()\n  n = n + 1\n"
            '  local body = \'{"inputs":[{"name":"INPUT0","shape":[1,4],"datatype":"FP32","data":[\' .. '
            f'"{offset}," .. n .. \',3,4]}}]}}\'\n'
            f'  return wrk.format("POST", "{PATH}", headers, body)\nend\n')


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b}" if not (32 <= b < 127) or b in b'"\\' else chr(b) for b in data) + '"'


@dataclass
class Measured:
    rounds: list[WrkResult]
    cpu: list[float]  # the serving process's CPU seconds per request, each round (empty: not measured)

    @property
    def med(self) -> WrkResult:
        rs = self.rounds
        return WrkResult(statistics.median(r.rps for r in rs), statistics.median(r.p50 for r in rs),
                         statistics.median(r.p99 for r in rs), sum(r.requests for r in rs), sum(r.errors for r in rs))

    def rps_spread(self) -> str:
        return f"{min(r.rps for r in self.rounds):,.0f}-{max(r.rps for r in self.rounds):,.0f}"

    def p50_spread(self) -> str:
        return f"{min(r.p50 for r in self.rounds) * 1e3:.3f}-{max(r.p50 for r in self.rounds) * 1e3:.3f}"

    def cpu_text(self) -> str:
        if not self.cpu:
            return "-"
        return f"{statistics.median(self.cpu) * 1e6:.0f} ({min(self.cpu) * 1e6:.0f}-{max(self.cpu) * 1e6:.0f})"


# name -> (url, the wrk script for round r, the pid whose CPU time is counted per request or None)
Targets = dict[str, tuple[str, Callable[[int], str], int | None]]
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def interleaved(targets: Targets, connections: int, rounds: int, seconds: float, label: str) -> dict[str, Measured]:
    """Each target measured once per round, the order rotating every round."""
    results: dict[str, Measured] = {name: Measured([], []) for name in targets}
    names = list(targets)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            url, lua, pid = targets[name]
            before = cpu_seconds(pid) if pid else 0.0
            result = run_wrk(url, lua(r), connections, seconds)
            results[name].rounds.append(result)
            if pid:
                results[name].cpu.append((cpu_seconds(pid) - before) / max(result.requests, 1))
            print(f"{label} c={connections} round {r + 1} {name}: {result.rps:,.0f} req/s, "
                  f"p50 {result.p50 * 1e3:.3f} ms", file=sys.stderr)
    return results


def table(measured: dict[str, Measured]) -> list[str]:
    lines = ["| target | req/s (median) | req/s spread | p50 ms | p50 spread | p99 ms | sidecar CPU us/req (spread) "
             "| requests | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in measured.items():
        med = m.med
        lines.append(f"| {name} | {med.rps:,.0f} | {m.rps_spread()} | {med.p50 * 1e3:.3f} | {m.p50_spread()} | "
                     f"{med.p99 * 1e3:.3f} | {m.cpu_text()} | {med.requests:,} | {med.errors} |")
    return lines


# -- servers -----------------------------------------------------------------------------------------------


def cached_repository(work: Path) -> Path:
    """A copy of identity_fp32 with Triton's own response cache enabled."""
    repository = work / "models"
    shutil.copytree(MODELS_DIR / MODEL, repository / MODEL, ignore=shutil.ignore_patterns("__pycache__"))
    config = repository / MODEL / "config.pbtxt"
    config.write_text(config.read_text() + "\nresponse_cache { enable: true }\n")
    return repository


def triton_stats(triton: TritonServer) -> dict[str, int]:
    stats = orjson.loads(exchange(triton.url, "GET", f"/v2/models/{MODEL}/stats").body)["model_stats"][0]
    inference = stats["inference_stats"]
    return {"inferences": int(stats["inference_count"]), "executions": int(stats["execution_count"]),
            "cache_hits": int(inference["cache_hit"]["count"]), "cache_misses": int(inference["cache_miss"]["count"])}


def cache_counts(sidecar: SidecarProcess) -> dict[str, int]:
    doc = orjson.loads(exchange(sidecar.admin_url, "GET", "/status?format=json").body)
    return {k: v for k, v in doc["cache"]["models"].get(MODEL, {}).items() if isinstance(v, int) and k != "entries"}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


# -- 3: hit ratio, pure Python ---------------------------------------------------------------------------


RESPONSE = InferenceResponse(Protocol.KSERVE_HTTP, MODEL)


def zipf_trace(items: int, length: int, skew: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weights = np.arange(1, items + 1, dtype=np.float64) ** -skew
    ranks = rng.choice(items, size=length, p=weights / weights.sum())
    return rng.permutation(items)[ranks]  # popularity not in key order


def hit_ratios(trace: np.ndarray, capacity: int, entry_bytes: int) -> tuple[float, float]:
    """(W-TinyLFU, LRU) hit ratios with room for ``capacity`` entries of ``entry_bytes`` each."""
    keys = [cache_key(InferenceRequest(Protocol.KSERVE_HTTP, MODEL, inputs=(
        Tensor("X", "INT64", (1,), int(i).to_bytes(8, "little")),)), "") for i in range(int(trace.max()) + 1)]
    tier = MemoryTier(capacity * entry_bytes)
    lru: collections.OrderedDict[int, None] = collections.OrderedDict()
    hits_tier = hits_lru = 0
    for raw in trace.tolist():
        key = keys[raw]
        if tier.get(key) is not None:
            hits_tier += 1
        else:
            tier.put(key, MODEL, Entry(RESPONSE, 0.0, 1e18, entry_bytes))
        if raw in lru:
            lru.move_to_end(raw)
            hits_lru += 1
        else:
            lru[raw] = None
            if len(lru) > capacity:
                lru.popitem(last=False)
    return hits_tier / len(trace), hits_lru / len(trace)


def hit_ratio_section(seeds: int) -> list[str]:
    items, length, skew, entry_bytes = 10_000, 200_000, 1.1, 1024
    lines = [f"### 3. In-process tier (W-TinyLFU) vs LRU at equal memory: Zipf({skew}) over {items:,} items, "
             f"{length:,} requests, {entry_bytes} B entries, median of {seeds} seeds (spread)", "",
             "| memory (entries) | W-TinyLFU hit ratio | LRU hit ratio | ratio | goal |", "|---|---|---|---|---|"]
    traces = [zipf_trace(items, length, skew, seed) for seed in range(seeds)]
    for capacity in (100, 500, 1000, 2500):
        runs = [hit_ratios(trace, capacity, entry_bytes) for trace in traces]
        tiny, lru = [r[0] for r in runs], [r[1] for r in runs]
        ratio = statistics.median(t / max(lr, 1e-9) for t, lr in runs)
        met = "met" if all(t > lr for t, lr in runs) else "NOT met"
        lines.append(f"| {capacity:,} ({capacity / items:.0%}) | {statistics.median(tiny):.4f} "
                     f"({min(tiny):.4f}-{max(tiny):.4f}) | {statistics.median(lru):.4f} ({min(lru):.4f}-{max(lru):.4f})"
                     f" | {ratio:.3f}x | higher: {met} |")
    return lines


# -- main ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3, help="Zipf traces for the hit-ratio figure")
    ap.add_argument("--only", choices=["hit", "redis", "ratio", "miss"], action="append",
                    help="run only these sections (repeatable)")
    args = ap.parse_args()
    sections = set(args.only or ["hit", "redis", "ratio", "miss"])
    command = COMMAND + f" --seconds {args.seconds:g} --rounds {args.rounds} --connections {args.connections}" + \
        f" --seeds {args.seeds}" + "".join(f" --only {s}" for s in sorted(args.only or []))
    out = ["## Response cache benchmarks", "", "Command:", "", command, "",
           f"Machine: {os.cpu_count()} CPUs; load average at start {_load()}", ""]
    same = same_body_lua(BODY)

    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        work = Path(tmp)
        if sections & {"hit", "redis", "miss"}:
            repository = cached_repository(work)
            with TritonServer(repository, work / "triton", models=[MODEL],
                              extra_args=["--cache-config=local,size=16777216"]) as triton:
                if "hit" in sections:
                    out += hit_section(triton, work, args, same)
                if "redis" in sections:
                    out += redis_section(triton, work, args, same)
                if "miss" in sections:
                    out += miss_section(triton, work, args)
    if "ratio" in sections:
        out += hit_ratio_section(args.seeds)
    out += ["", f"Load average at the end: {_load()} (other processes on the machine widen the spreads)"]
    print("\n".join(out))
    return 0


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def hit_section(triton: TritonServer, work: Path, args: argparse.Namespace, same: str) -> list[str]:
    cache_on = ["--set", f"cache.models={MODEL}", *QUIET]
    with (SidecarProcess(triton.url, work, "triton", cache_on) as sidecar,
          SidecarProcess(triton.url, work, "triton", QUIET) as plain):
        # For scale: the sidecar with its cache off, passing every call to Triton's cache.
        targets: Targets = {
            "Triton, its response cache": (triton.url + PATH, lambda r: same, None),
            "sidecar, in-process hit": (sidecar.url + PATH, lambda r: same, sidecar.pid),
            "sidecar, cache off (pass-through to Triton's cache)": (plain.url + PATH, lambda r: same, plain.pid),
        }
        for url, lua, _ in targets.values():  # the first call fills each cache; then warm every path, unmeasured
            run_wrk(url, lua(0), args.connections, 2)
        t0, s0 = triton_stats(triton), cache_counts(sidecar)
        measured = interleaved(targets, args.connections, args.rounds, args.seconds, "hit")
        t1, s1 = triton_stats(triton), cache_counts(sidecar)
    direct, side = measured["Triton, its response cache"].med, measured["sidecar, in-process hit"].med
    through = measured["sidecar, cache off (pass-through to Triton's cache)"].med
    ratio = side.rps / direct.rps
    verdict = "met" if ratio >= 1.0 else ("met (stretch 1x not met)" if ratio >= 0.5 else "NOT met")
    return [f"### 1. Cache-hit throughput, {args.connections} connections, model {MODEL} (HTTP JSON, one call), "
            f"median of {args.rounds} interleaved wrk runs of {args.seconds:g} s", "", *table(measured), "",
            f"- sidecar hit / Triton cached: **{ratio:.2f}x** throughput (goal >= 0.5x, stretch 1x: {verdict}); "
            f"p50 {side.p50 * 1e3:.3f} vs {direct.p50 * 1e3:.3f} ms",
            f"- sidecar hit / sidecar pass-through to Triton's cache: {side.rps / through.rps:.2f}x throughput",
            f"- Triton during the measured runs: {delta(t1, t0)}; sidecar cache counts: {delta(s1, s0)}", ""]


def redis_section(triton: TritonServer, work: Path, args: argparse.Namespace, same: str) -> list[str]:
    with RedisServer(work / "redis") as redis:
        # A Redis read may take up to 50 ms here (not the default 5): on two shared cores a slow read must
        # not turn into a miss that the model server answers, which would measure something else.
        shared = ["--set", f"cache.models={MODEL}", "--set", f"cache.redis={redis.url}",
                  "--set", "cache.redis_timeout=0.05", *QUIET]
        with (SidecarProcess(triton.url, work, "triton", shared) as memory,
              SidecarProcess(triton.url, work, "triton", [*shared, "--set", "cache.max_bytes=1"]) as remote):
            exchange(memory.url, "POST", PATH, BODY, {"Content-Type": "application/json"})  # fills Redis
            targets: Targets = {
                "sidecar, in-process hit": (memory.url + PATH, lambda r: same, memory.pid),
                "sidecar, Redis hit (in-process tier holds nothing)": (remote.url + PATH, lambda r: same, remote.pid),
            }
            for url, lua, _ in targets.values():
                run_wrk(url, lua(0), 1, 2)
            t0, r0 = triton_stats(triton), cache_counts(remote)
            one = interleaved(targets, 1, args.rounds, args.seconds, "redis")
            loaded = interleaved(targets, args.connections, args.rounds, args.seconds, "redis")
            t1, r1 = triton_stats(triton), cache_counts(remote)
    names = list(targets)
    added = (one[names[1]].med.p50 - one[names[0]].med.p50) * 1e3
    added_loaded = (loaded[names[1]].med.p50 - loaded[names[0]].med.p50) * 1e3
    return [f"### 2. Shared-tier (Redis) hit vs in-process hit, median of {args.rounds} interleaved wrk runs of "
            f"{args.seconds:g} s", "", "1 connection:", "", *table(one), "", f"{args.connections} connections:", "",
            *table(loaded), "",
            f"- added p50 of a Redis hit over an in-process hit, 1 connection: **{added:+.3f} ms** (goal <= 1 ms: "
            f"{'met' if added <= 1.0 else 'NOT met'}); at {args.connections} connections: {added_loaded:+.3f} ms",
            f"- Redis-tier sidecar's cache counts during the runs: {delta(r1, r0)}; Triton inferences: "
            f"{delta(t1, t0)['inferences']}", ""]


def miss_section(triton: TritonServer, work: Path, args: argparse.Namespace) -> list[str]:
    with (SidecarProcess(triton.url, work, "triton", [*QUIET, "--set", "cache.models=*"]) as on,
          SidecarProcess(triton.url, work, "triton", QUIET) as off):
        # The Triton response cache is on for this model; every body is unique, so it misses too, for both.
        targets: Targets = {
            "sidecar, cache off": (off.url, lambda r: unique_body_lua(1_000 + r), off.pid),
            "sidecar, cache on, every call a miss": (on.url, lambda r: unique_body_lua(2_000 + r), on.pid),
        }
        for i, (url, _, _) in enumerate(targets.values()):  # warm every path, unmeasured, with bodies of its own
            run_wrk(url, unique_body_lua(3_000 + i), args.connections, 2)
        before = cache_counts(on)
        measured = interleaved(targets, args.connections, args.rounds, args.seconds, "miss")
        counts = delta(cache_counts(on), before)
    off_all, on_all = measured["sidecar, cache off"], measured["sidecar, cache on, every call a miss"]
    off_m, on_m = off_all.med, on_all.med
    ratio = on_m.rps / off_m.rps
    cost = off_m.rps / on_m.rps - 1
    cpu_cost = statistics.median(on_all.cpu) / statistics.median(off_all.cpu) - 1
    return [f"### 4. Miss cost: every body unique (wrk Lua numbers them), {args.connections} connections, median "
            f"of {args.rounds} interleaved wrk runs of {args.seconds:g} s", "", *table(measured), "",
            f"- cache-on-all-misses / cache-off throughput: **{ratio:.3f}x**, i.e. a miss costs {cost:+.1%} "
            f"(goal <= +10 %: {'met' if cost <= 0.10 else 'NOT met'}); p50 {on_m.p50 * 1e3:.3f} vs "
            f"{off_m.p50 * 1e3:.3f} ms",
            f"- sidecar CPU per request, cache on (all misses) vs off: {cpu_cost:+.1%} (the figure least moved by "
            "other load on the machine)",
            f"- cache counts of the cache-on sidecar during the runs: {counts}", ""]


if __name__ == "__main__":
    sys.exit(main())

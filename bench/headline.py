"""The headline benchmark (issue 8, section 3): real MiniLM embeddings, Triton's own batching and cache
against the sidecar's, every case from a fresh Triton process, in one run:

    .venv/bin/python bench/headline.py [--seconds 30] [--record-seconds 60] [--connections 32] [--cases 1,2,...]

Load: wrk, ``--connections`` connections, one text per request drawn Zipf(1.1) over 10,000 distinct
sentences (``bench/minilm.py``); "unique" load makes every text unique, so no cache can help.

1. Triton plain: no dynamic batcher, no cache;
2. Triton's dynamic batcher (max_queue_delay_microseconds 2000);
3. Triton's dynamic batcher + its local response cache (Triton's best);
4. batching alone, unique load: the sidecar batching in front of plain Triton, against Triton's dynamic
   batcher under the same load (4-ref);
5. the headline, from a cold pod: the sidecar (cache + batching) in front of plain Triton, with a store
   recorded earlier by another replica under the same load; it warms up on a sample of each shape's
   recorded calls, turns ready, fills its cache with the rest of the top-N behind readiness and serves
   the load;
6. the Redis tier: replica A (cache + batching, cache.redis) serves the load; then a fresh Triton and a
   fresh sidecar B sharing that Redis (and no traffic memory of their own) serve it;
7. the first minute: a pod launched into waiting traffic, load sent from the moment it says ready until
   60 s after launch, calls served (2xx) and their p99: Triton plain (7a), Triton's best (7b), the sidecar
   with default settings (only cache.models and batch.models) and a store another replica recorded for
   ``--first-record-seconds`` (7c), and the same sidecar sharing a Redis tier with a warm replica (7d).

Time to ready: Triton, from launch until /v2/health/ready says 200 with the model loaded; the sidecar
cases, from launching the pod (sidecar and Triton together) until the sidecar's /readyz says 200. The
load starts at once after ready. Progress goes to stderr, the table to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from bench import minilm  # noqa: E402
from bench.loadgen import WrkResult, run_wrk_script  # noqa: E402
from tests.servers import RedisServer, ServerExited, TritonServer, http_status, wait_until  # noqa: E402
from tests.sidecar_proc import SidecarProcess  # noqa: E402

CASES = ("1", "2", "3", "4", "5", "6", "7")
ORDER = ("1", "2", "3", "4-ref", "4", "5", "6")  # rows of the table
FIRST_ORDER = ("7a", "7b", "7c", "7d")  # rows of the first-minute table
FIRST_MINUTE = 60.0
TRITON_START_TIMEOUT = 300.0
WRK_TIMEOUT = 10.0  # seconds a request may take before wrk counts it as an error (its default is 2 s)
# The sidecar as the bench runs it: quiet, quick to notice Triton, no drain delay when a case ends.
# workers=auto is the product's default, named because the tests' helper pins one process.
SIDECAR_BASE = ("log_level=warning", "shutdown_delay=0", "upstream.health_interval=0.25", "record.flush_interval=0.5",
                "workers=auto")
CACHE_AND_BATCH = (f"cache.models={minilm.MODEL}", f"batch.models={minilm.MODEL}")


def progress(text: str) -> None:
    print(f"[headline {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass
class Measured:
    key: str  # "1".."6", "4-ref"
    name: str
    result: WrkResult
    ready: float  # seconds from launch to the case's readiness signal
    note: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # the sidecar's counters over the load, its warm-up

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "result": dataclasses.asdict(self.result)}


@dataclass(frozen=True)
class Goal:
    case: str
    what: str
    value: float
    bound: float
    at_least: bool  # value >= bound, else value <= bound

    @property
    def met(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    def row(self) -> str:
        sign = ">=" if self.at_least else "<="
        return (f"| {self.case} | {self.what} | {self.value:.2f}x | {sign} {self.bound:g}x | "
                f"{'met' if self.met else '**not met**'} |")


# -- the pieces of a case ---------------------------------------------------------------------------


class PodSidecar(SidecarProcess):
    """``sidecar run`` whose ``start()`` returns once the process is launched, so Triton is launched right
    after it, as the containers of one pod start together; the pod then waits on /readyz."""

    def wait_ready(self, timeout: float) -> None:
        return None


class Bench:
    """The run's settings, its scratch directory and the load scripts; each case is a method."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.out = Path(args.out)
        texts = minilm.corpus()
        self.zipf = minilm.wrk_script(work / "load", texts, unique=False)
        self.unique = minilm.wrk_script(work / "load", texts, unique=True)
        self.texts = texts
        self.results: dict[str, Measured] = {}

    # -- servers
    def triton(self, variant: minilm.Variant, label: str) -> TritonServer:
        return minilm.triton_server(self.work / label, variant)

    def sidecar(self, upstream: str, label: str, settings: Sequence[str], store: str | None = None) -> PodSidecar:
        store = store or str(self.work / label / "traffic.db")
        extra = ["--store", store]
        for setting in (*SIDECAR_BASE, *settings):
            extra += ["--set", setting]
        return PodSidecar(upstream, self.work / label, "triton", extra)

    @contextlib.contextmanager
    def triton_alone(self, variant: minilm.Variant, label: str) -> Iterator[tuple[TritonServer, float]]:
        """A fresh Triton; yields it with its time to ready (launch to ready, the model loaded)."""
        triton = self.triton(variant, label)
        started = time.monotonic()
        with triton.start(TRITON_START_TIMEOUT):
            wait_until(lambda: triton.model_ready(minilm.MODEL), 60, "model ready")
            yield triton, time.monotonic() - started

    @contextlib.contextmanager
    def pod(self, label: str, settings: Sequence[str], store: str | None = None
            ) -> Iterator[tuple[TritonServer, SidecarProcess, float]]:
        """A fresh plain Triton and a fresh sidecar launched together; yields them and the time to /readyz 200.

        On the way out (normal or not) the sidecar stops first, then Triton.
        """
        triton = self.triton("plain", label)
        sidecar = self.sidecar(triton.url, label, settings, store)
        with contextlib.ExitStack() as stack:
            stack.callback(triton.stop)
            stack.callback(sidecar.stop)
            started = time.monotonic()
            sidecar.start()
            triton.start(TRITON_START_TIMEOUT)
            progress(f"  {label}: Triton ready after {time.monotonic() - started:.1f} s, sidecar warming up")
            wait_sidecar_ready(sidecar, self.args.ready_timeout)
            yield triton, sidecar, time.monotonic() - started

    def load(self, url: str, unique: bool = False, seconds: float | None = None) -> WrkResult:
        script = self.unique if unique else self.zipf
        return run_wrk_script(url + minilm.INFER_PATH, script, self.args.connections,
                              self.args.seconds if seconds is None else seconds, timeout=WRK_TIMEOUT)

    def keep(self, measured: Measured) -> Measured:
        self.results[measured.key] = measured
        r = measured.result
        progress(f"  -> {measured.name}: {r.rps:,.0f} req/s, p50 {r.p50 * 1e3:.1f} ms, p99 {r.p99 * 1e3:.1f} ms, "
                 f"{r.errors} errors, ready after {measured.ready:.1f} s {measured.note}")
        return measured

    def serve(self, triton: TritonServer, sidecar: SidecarProcess, key: str, unique: bool = False
              ) -> tuple[WrkResult, dict[str, Any]]:
        """The measured load through a ready sidecar, then a check that its answers are Triton's own; returns
        the load's result and a summary of the sidecar's counters over it and its /status (both saved)."""
        before = counters(fetch(sidecar.admin_url + "/metrics").decode())
        result = self.load(sidecar.url, unique)
        status, metrics = self.snapshot(sidecar, key)
        check_answers(triton.url, sidecar.url, self.texts, cached=not unique)
        return result, summarise(status, before, metrics)

    def snapshot(self, sidecar: SidecarProcess, key: str) -> tuple[dict[str, Any], Counters]:
        """The sidecar's /status (JSON) and /metrics, saved as <--out>-case<key>-{status.json,metrics.txt}."""
        metrics = fetch(sidecar.admin_url + "/metrics")
        status: dict[str, Any] = orjson.loads(fetch(sidecar.admin_url + "/status?format=json"))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        stem = f"{self.out.name}-case{key}"
        (self.out.parent / f"{stem}-status.json").write_bytes(orjson.dumps(status, option=orjson.OPT_INDENT_2))
        (self.out.parent / f"{stem}-metrics.txt").write_bytes(metrics)
        return status, counters(metrics.decode())

    def replica(self, label: str, settings: Sequence[str], key: str, store: str | None = None) -> Counters:
        """A replica (sidecar + Triton) that serves the Zipf load for --record-seconds, unmeasured, then stops;
        returns its counters (also saved, as case <key>)."""
        with self.pod(label, settings, store) as (_, sidecar, _ready):
            served = self.load(sidecar.url, seconds=self.args.record_seconds)
            _, metrics = self.snapshot(sidecar, key)
            computed = total(metrics, "sidecar_cache_requests_total", result="miss")
            progress(f"  {label} served {served.rps:,.0f} req/s ({computed:.0f} answers computed); stopping it "
                     "and its Triton")
        return metrics

    # -- the cases
    def case_triton(self, key: str, variant: minilm.Variant, name: str, unique: bool = False) -> Measured:
        progress(f"case {key}: {name} - fresh Triton ({variant})")
        with self.triton_alone(variant, f"case{key}") as (triton, ready):
            progress(f"  Triton ready after {ready:.1f} s; {self.args.seconds:g} s of load")
            return self.keep(Measured(key, name, self.load(triton.url, unique), ready))

    def case_batching(self) -> None:
        self.case_triton("4-ref", "batcher", "Triton dynamic batcher, unique texts", unique=True)
        progress("case 4: the sidecar batching (no cache) in front of plain Triton, unique texts")
        with self.pod("case4", [f"batch.models={minilm.MODEL}", *self.args.set]) as (triton, sidecar, ready):
            result, stats = self.serve(triton, sidecar, "4", unique=True)
        self.keep(Measured("4", "sidecar batching, unique texts", result, ready, stats=stats))

    def case_headline(self) -> None:
        settings = [*CACHE_AND_BATCH, f"record.top_n={self.args.top_n}", *self.args.set]
        recorded = self.work / "case5-replica" / "traffic.db"
        progress(f"case 5: recording replica (sidecar + Triton) under the Zipf load for {self.args.record_seconds:g} s")
        self.replica("case5-replica", settings, "5-replica", str(recorded))
        store = copy_store(recorded, self.work / "case5" / "traffic.db")
        progress(f"case 5: a cold pod (fresh Triton, fresh sidecar) with the recorded store {store}")
        with self.pod("case5", settings, str(store)) as (triton, sidecar, ready):
            progress(f"  sidecar ready after {ready:.1f} s; {self.args.seconds:g} s of load")
            result, stats = self.serve(triton, sidecar, "5")
        self.keep(Measured("5", "sidecar cache + batching, cold pod, recorded store", result, ready,
                           note=warmup_note(stats), stats=stats))

    def case_redis(self) -> None:
        settings = [*CACHE_AND_BATCH, *self.args.set]
        with RedisServer(self.work / "redis") as redis:
            shared = [*settings, f"cache.redis={redis.url}"]
            progress(f"case 6: replica A (cache.redis) serves the Zipf load for {self.args.record_seconds:g} s")
            replica = self.replica("case6-replica-a", shared, "6-replica-a")
            held = redis_keys(redis.port)
            computed = total(replica, "sidecar_cache_requests_total", result="miss")
            progress(f"  Redis holds {held} answers of the {computed:.0f} replica A computed")
            progress("case 6: fresh Triton + fresh sidecar B, same Redis, no traffic memory of its own")
            with self.pod("case6", shared) as (triton, sidecar, ready):
                progress(f"  sidecar B ready after {ready:.1f} s; {self.args.seconds:g} s of load")
                result, stats = self.serve(triton, sidecar, "6")
        stats.update(replica_a_computed=computed, redis_held=held)
        self.keep(Measured("6", "sidecar B, Redis tier shared with replica A", result, ready, stats=stats,
                           note=f"(Redis held {held} answers of the {computed:.0f} replica A computed; "
                                f"{stats['shared_hits']:.0f} answers from Redis during the load, "
                                f"{stats['redis_errors']:.0f} Redis errors)"))

    # -- the first minute
    def first_minute(self, key: str, name: str, ready: float, url: str) -> Measured:
        """Load from ready until FIRST_MINUTE seconds after launch; the calls served are wrk's 2xx."""
        left = max(1.0, FIRST_MINUTE - ready)
        progress(f"  ready after {ready:.1f} s: {left:.1f} s of load until the minute ends")
        return self.keep(Measured(key, name, self.load(url, seconds=left), ready))

    def case_first_minute(self) -> None:
        for key, variant, name in (("7a", "plain", "Triton plain"), ("7b", "cache", "Triton's best (c)")):
            progress(f"case {key}: first minute, {name}")
            triton = self.triton(variant, f"case{key}")  # type: ignore[arg-type]
            started = time.monotonic()
            with triton.start(TRITON_START_TIMEOUT):
                wait_until(lambda t=triton: t.model_ready(minilm.MODEL), 60, "model ready")
                self.first_minute(key, name, time.monotonic() - started, triton.url)
        defaults = [*CACHE_AND_BATCH, *self.args.set]
        recorded = self.work / "case7-replica" / "traffic.db"
        progress(f"case 7c: a replica records {self.args.first_record_seconds:g} s of the Zipf load")
        with self.pod("case7-replica", defaults, str(recorded)) as (_, sidecar, _ready):
            self.load(sidecar.url, seconds=self.args.first_record_seconds)
        store = copy_store(recorded, self.work / "case7c" / "traffic.db")
        progress("case 7c: first minute, the sidecar with default settings and that store")
        with self.pod("case7c", defaults, str(store)) as (_, sidecar, ready):
            self.first_minute("7c", "sidecar, defaults, another replica's store", ready, sidecar.url)
        with RedisServer(self.work / "redis7") as redis:
            shared = [*defaults, f"cache.redis={redis.url}"]
            progress(f"case 7d: a warm replica shares Redis and serves {self.args.first_record_seconds:g} s")
            self.replica("case7d-replica", shared, "7d-replica", str(self.work / "case7d-replica" / "traffic.db"))
            progress("case 7d: first minute, a new pod sharing that Redis and the replica's store")
            store = copy_store(self.work / "case7d-replica" / "traffic.db", self.work / "case7d" / "traffic.db")
            with self.pod("case7d", shared, str(store)) as (_, sidecar, ready):
                self.first_minute("7d", "sidecar, defaults + Redis shared with a warm replica", ready, sidecar.url)

    def run(self, cases: Sequence[str]) -> None:
        steps: dict[str, Callable[[], object]] = {
            "1": lambda: self.case_triton("1", "plain", "Triton plain (a)"),
            "2": lambda: self.case_triton("2", "batcher", "Triton dynamic batcher (b)"),
            "3": lambda: self.case_triton("3", "cache", "Triton batcher + response cache (c)"),
            "4": self.case_batching,
            "5": self.case_headline,
            "6": self.case_redis,
            "7": self.case_first_minute,
        }
        for key in cases:
            steps[key]()


# -- helpers ----------------------------------------------------------------------------------------


def fetch(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def wait_sidecar_ready(sidecar: SidecarProcess, timeout: float) -> None:
    """Until /readyz says 200; raises at once if the sidecar exits meanwhile."""

    def ready() -> bool:
        if not sidecar.running:
            raise ServerExited(f"sidecar exited with {sidecar.returncode}; log {sidecar.log_path}:\n"
                               f"{sidecar.log_tail()}")
        return http_status(sidecar.admin_port, "/readyz") == 200

    wait_until(ready, timeout, "sidecar /readyz 200")


def redis_keys(port: int) -> int:
    """How many keys the Redis on ``port`` holds (DBSIZE)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"DBSIZE\r\n")
        answer = sock.recv(64)
    if not answer.startswith(b":"):
        raise RuntimeError(f"unexpected DBSIZE answer {answer!r}")
    return int(answer[1:].strip())


def copy_store(source: Path, dest: Path) -> Path:
    """A consistent copy of a (closed) SQLite traffic store, as another replica's volume would hold it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(dest)) as dst:
        src.backup(dst)
    return dest


def check_answers(direct: str, proxied: str, texts: Sequence[str], cached: bool, concurrent: int = 32) -> None:
    """The sidecar's answers are Triton's own: ``concurrent`` new texts sent at once (so the sidecar batches
    them) and, when ``cached``, a frequent, a middling and a rare text of the load (answered from its cache)."""
    fresh = [f"{text} (answer check {i})" for i, text in enumerate(texts[:concurrent])]
    with ThreadPoolExecutor(concurrent) as pool:
        proxied_vectors = list(pool.map(lambda text: minilm.embed(proxied, text), fresh))
    pairs = list(zip(fresh, proxied_vectors, strict=True))
    if cached:
        pairs += [(text, minilm.embed(proxied, text)) for text in (texts[0], texts[len(texts) // 2], texts[-1])]
    for text, vector in pairs:
        expected = minilm.embed(direct, text)
        if vector.shape != expected.shape or not np.allclose(vector, expected, atol=1e-4):
            raise AssertionError(f"the sidecar's embedding of {text!r} differs from Triton's "
                                 f"(max difference {float(np.abs(vector - expected).max()):.2g})")


REDIS_ERRORS = "sidecar_cache_redis_errors_total"
Counters = dict[tuple[str, frozenset[tuple[str, str]]], float]
_SAMPLE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def counters(text: str) -> Counters:
    """Every sample of a Prometheus text page, by (name, labels)."""
    found: Counters = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = frozenset(_LABEL.findall(match.group(2) or ""))
            found[(match.group(1), labels)] = float(match.group(3))
    return found


def total(samples: Counters, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def summarise(status: dict[str, Any], before: Counters, after: Counters) -> dict[str, Any]:
    """What the table notes: over the measured load, the cache's hit ratio and the rows per upstream call
    (warm-up calls excluded); from /status, the last warm-up."""

    def delta(name: str, **labels: str) -> float:
        return total(after, name, model=minilm.MODEL, **labels) - total(before, name, model=minilm.MODEL, **labels)

    results = {r: delta("sidecar_cache_requests_total", result=r) for r in ("hit", "redis_hit", "coalesced", "miss")}
    asked = sum(results.values())
    batches = delta("sidecar_batch_size_count")
    warmup = status.get("last_warmup") or {}
    plan: dict[str, Any] = next((p for p in status.get("plan", []) if p.get("model") == minilm.MODEL), {})
    return {
        "hit_ratio": (asked - results["miss"]) / asked if asked else None,
        "shared_hits": results["redis_hit"], "coalesced": results["coalesced"], "misses": results["miss"],
        "upstream_calls": delta("sidecar_upstream_duration_seconds_count", route="infer"),
        "rows_per_batch": delta("sidecar_batch_size_sum") / batches if batches else None,
        "redis_errors": total(after, REDIS_ERRORS) - total(before, REDIS_ERRORS),
        "status_hit_ratio": status.get("cache", {}).get("models", {}).get(minilm.MODEL, {}).get("hit_ratio"),
        "warmup_passes": warmup.get("passes"), "warmup_complete": warmup.get("complete"),
        "warmup_reason": warmup.get("reason"), "planned_calls": len(plan.get("calls", [])),
        "replayed": total(after, "sidecar_warmup_replayed_total", outcome="ok"),
    }


def warmup_note(stats: dict[str, Any]) -> str:
    return (f"(warm-up: {stats['replayed']:.0f} calls replayed in {stats['warmup_passes']} passes of "
            f"{stats['planned_calls']}, {'complete' if stats['warmup_complete'] else 'incomplete'})")


# -- the report -------------------------------------------------------------------------------------


def ratio(value: float, anchor: Measured | None, attr: str) -> float | None:
    if anchor is None:
        return None
    base = float(getattr(anchor.result, attr))
    return value / base if base else None


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(results: dict[str, Measured]) -> str:
    best, plain = results.get("3"), results.get("1")
    lines = ["| case | req/s | p50 ms | p99 ms | errors | time to ready s | req/s vs (c) | req/s vs (a) | "
             "p99 vs (c) | cache hits | rows per upstream call |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted((k for k in results if k in ORDER), key=ORDER.index):
        m = results[key]
        r = m.result
        hit, rows = m.stats.get("hit_ratio"), m.stats.get("rows_per_batch")
        lines.append(
            f"| {key}. {m.name} | {r.rps:,.0f} | {r.p50 * 1e3:.1f} | {r.p99 * 1e3:.1f} | {r.errors} | {m.ready:.1f} | "
            f"{cell(ratio(r.rps, best, 'rps'))} | {cell(ratio(r.rps, plain, 'rps'))} | "
            f"{cell(ratio(r.p99, best, 'p99'))} | {'-' if hit is None else f'{hit:.1%}'} | "
            f"{'-' if rows is None else f'{rows:.1f}'} |")
    return "\n".join(lines)


def first_minute_table(results: dict[str, Measured]) -> str:
    best = results.get("7b")
    lines = ["| first minute | time to ready s | calls served (2xx) | p99 ms | calls vs Triton's best "
             "| p99 vs Triton's best |", "|---|---|---|---|---|---|"]
    for key in (k for k in FIRST_ORDER if k in results):
        m = results[key]
        served = m.result.requests - m.result.errors
        calls = cell(served / (best.result.requests - best.result.errors)) if best else "-"
        lines.append(f"| {key}. {m.name} | {m.ready:.1f} | {served:,} | {m.result.p99 * 1e3:.1f} | {calls} | "
                     f"{cell(ratio(m.result.p99, best, 'p99'))} |")
    return "\n".join(lines)


def goals(results: dict[str, Measured]) -> list[Goal]:
    found: list[Goal] = []
    ref, batching = results.get("4-ref"), results.get("4")
    if ref and batching:
        found += [Goal("4", "throughput vs Triton's dynamic batcher (unique texts)",
                       batching.result.rps / ref.result.rps, 0.9, True),
                  Goal("4", "p99 vs Triton's dynamic batcher (unique texts)",
                       batching.result.p99 / ref.result.p99, 1.2, False)]
    best, plain, head, redis = results.get("3"), results.get("1"), results.get("5"), results.get("6")
    if head and best:
        found += [Goal("5", "throughput vs Triton's best (c)", head.result.rps / best.result.rps, 1.0, True),
                  Goal("5", "p99 vs Triton's best (c)", head.result.p99 / best.result.p99, 0.5, False)]
    if head and plain:
        found.append(Goal("5", "throughput vs Triton plain (a)", head.result.rps / plain.result.rps, 10.0, True))
    if redis and best:
        found.append(Goal("6", "throughput vs Triton's best (c)", redis.result.rps / best.result.rps, 2.0, True))
    first, sidecar = results.get("7b"), results.get("7c")
    if first and sidecar:
        found += [Goal("7c", "first-minute calls served vs Triton's best",
                       (sidecar.result.requests - sidecar.result.errors) / max(1, first.result.requests
                                                                               - first.result.errors), 1.3, True),
                  Goal("7c", "first-minute p99 vs Triton's best", sidecar.result.p99 / first.result.p99, 0.8, False)]
    return found


def report(results: dict[str, Measured], args: argparse.Namespace) -> str:
    lines = [f"{args.connections} connections, {args.seconds:g} s of load per case, "
             f"recording/replica A {args.record_seconds:g} s, record.top_n {args.top_n}; "
             f"Zipf({minilm.ZIPF_S}) over {minilm.CORPUS_SIZE:,} texts (top {args.top_n}: "
             f"{minilm.top_share(args.top_n):.0%} of calls)"]
    if any(k in results for k in ORDER):
        lines += ["", table(results)]
    if any(k in results for k in FIRST_ORDER):
        lines += ["", first_minute_table(results)]
    found = goals(results)
    if found:
        lines += ["", "| case | goal | measured | bound | |", "|---|---|---|---|---|", *(g.row() for g in found)]
    notes = [f"- {k}: {m.note}" for k, m in sorted(results.items()) if m.note]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def save(results: dict[str, Measured], args: argparse.Namespace, text: str) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    document = {"settings": settings, "cases": [m.as_json() for m in results.values()],
                "goals": [{**dataclasses.asdict(g), "met": g.met} for g in goals(results)]}
    out.with_suffix(".json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    progress(f"saved {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    p.add_argument("--seconds", type=float, default=30, help="seconds of load per measured case")
    p.add_argument("--record-seconds", type=float, default=60,
                   help="seconds the recording replica (case 5) and replica A (case 6) serve before the cold pod")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of 1-6")
    p.add_argument("--top-n", type=int, default=1000, help="record.top_n of case 5's sidecars")
    p.add_argument("--first-record-seconds", type=float, default=20,
                   help="seconds of traffic another replica recorded before case 7's pods launch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra setting for every sidecar (cases 4-6; repeatable), e.g. batch.max_delay=0.5")
    p.add_argument("--ready-timeout", type=float, default=900, help="seconds a pod may take to become ready")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "headline"),
                   help="path stem of the saved table (.md, .json) and of the sidecar snapshots")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="headline-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            bench.run(args.cases)
        except KeyboardInterrupt:
            progress("interrupted: every server has been stopped")
            return 130
        finally:
            if bench.results:
                text = report(bench.results, args)
                print(text)
                save(bench.results, args, text)
    progress(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

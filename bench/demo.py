"""`make demo`: a real Triton, the sidecar in front of it, traffic, and an account of what the sidecar did.

Eight short sections, every number measured in this run (about a minute on two cores, no Redis needed):

1. the proxy: a test model called directly and through the sidecar, and what the sidecar's own part costs;
2. the response cache and batching on a real model, MiniLM sentence embeddings in Triton's python backend
   (plain: no dynamic batcher, no response cache): Zipf traffic direct and through the sidecar, the cache's
   answers, the batches Triton executed (counted by Triton itself), single-flight;
3. one gRPC client (tritonclient.grpc) sharing the HTTP clients' cache, and grpc.health.v1;
4. warmth for load balancers: HAProxy's agent-check, Envoy's ORCA header, the autoscaler gauges;
5. demand forecast: two days of per-minute history imported from CSV, the forecast at now + lead, what the
   pod measured of its own launch-to-warm, what it can serve of MiniLM;
6. admin actions: a cache flush behind the admin token; then SIGTERM and a clean drain;
7. every core: a sidecar with workers=auto (one data-plane process per CPU): one cache for the pod, one
   /metrics, a killed worker replaced while the pod stays ready;
8. the cold-start cliff of a torch.compile model, with and without the sidecar's warm-up (ready once
   measured; the recorded calls it did not need fill the cache behind readiness).

Exit status 0 only if every check passed. Every server runs inside a context manager, so a failure or
Ctrl-C stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

from bench import minilm  # noqa: E402
from bench.coldstart import BATCHES, MODELS_TORCH_DIR, record, run_sidecar, run_triton  # noqa: E402
from sidecar.protogen.grpc.health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from tests.servers import HOST, MODELS_DIR, ServerProcess, TritonServer, free_ports, wait_until  # noqa: E402
from tests.sidecar_proc import SidecarProcess  # noqa: E402
from tests.wire import exchange  # noqa: E402

IDENTITY = "identity_fp32"  # a test model: OUTPUT0 = INPUT0
MINILM = minilm.MODEL
MODEL_COLD = "compiled_mlp"
REQUESTS, CONCURRENCY = 2000, 16  # section 1
LOAD_SECONDS, CALLERS = 3.0, 24  # section 2, each way
SINGLE_FLIGHT = 20
TOKEN = "demo-admin-token"
TRITON_START_TIMEOUT = 180.0


def say(text: str = "") -> None:
    print(text, flush=True)


class Checks:
    """Every claim the demo makes about correctness is checked here; the exit status is theirs."""

    def __init__(self) -> None:
        self.passed: list[str] = []
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> bool:
        (self.passed if ok else self.failed).append(what)
        if not ok:
            say(f"   !! CHECK FAILED: {what}")
        return ok


# -- measuring ----------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Scrape:
    """One reading of the sidecar's /metrics page."""

    def __init__(self, sidecar: SidecarProcess) -> None:
        text = exchange(sidecar.admin_url, "GET", "/metrics").body.decode()
        self.samples = [(m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3)))
                        for m in map(_SAMPLE.match, text.splitlines()) if m]

    def get(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(v for n, have, v in self.samples if n == name and labels.items() <= have.items())

    def since(self, before: Scrape, name: str, **labels: str) -> float:
        return self.get(name, **labels) - before.get(name, **labels)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a process has used so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def triton_counts(triton: TritonServer) -> tuple[int, int]:
    """Triton's own statistics for MiniLM: (inference_count: rows computed, execution_count: executions)."""
    stats = orjson.loads(exchange(triton.url, "GET", f"/v2/models/{MINILM}/stats").body)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Load:
    """What one burst of calls saw, client side."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)  # x-sidecar-cache values
    answers: list[tuple[int, bytes]] = field(default_factory=list)  # (text index, answer body)
    queue_peak: float = 0.0  # highest sidecar_queue_depth read while it ran

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.calls / self.seconds

    def row(self, name: str) -> str:
        return (f"   | {name:<15} | {self.calls:>5} | {self.rps:7.0f} | {percentile(self.latencies, .5) * 1e3:6.1f} | "
                f"{percentile(self.latencies, .99) * 1e3:6.1f} |")


async def identity_burst(url: str, n: int) -> Load:
    """``n`` calls to the identity model, CONCURRENCY at a time; each answer must echo its own call."""
    load, numbers = Load(), iter(range(n))

    async def caller(session: aiohttp.ClientSession) -> None:
        for i in numbers:
            body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32",
                                             "data": [i, i + 1, i + 2, i + 3]}]})
            started = time.perf_counter()
            async with session.post(f"{url}/v2/models/{IDENTITY}/infer", data=body) as resp:
                answer = await resp.read()
            load.latencies.append(time.perf_counter() - started)
            mine = resp.status == 200 and orjson.loads(answer)["outputs"][0]["data"][0] == i
            load.statuses[resp.status if mine else -1] += 1  # -1: someone else's answer

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
        await asyncio.gather(*(caller(session) for _ in range(CONCURRENCY)))
    load.seconds = time.perf_counter() - started
    return load


async def zipf_load(url: str, texts: list[str], ranks: Iterator[int], seconds: float,
                    watch: SidecarProcess | None = None) -> Load:
    """CALLERS callers sending one MiniLM text a call (the next of ``ranks``) for ``seconds``; with ``watch``,
    the sidecar's queue-depth gauge is read every 0.25 s meanwhile."""
    load = Load()
    deadline = time.perf_counter() + seconds

    async def caller(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            index = next(ranks)
            started = time.perf_counter()
            async with session.post(url + minilm.INFER_PATH, data=minilm.infer_body(texts[index])) as resp:
                answer = await resp.read()
            load.latencies.append(time.perf_counter() - started)
            load.statuses[resp.status] += 1
            load.cache[resp.headers.get("x-sidecar-cache", "-")] += 1
            load.answers.append((index, answer))

    async def watcher(sidecar: SidecarProcess) -> None:
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.25)
            depth = (await asyncio.to_thread(Scrape, sidecar)).get("sidecar_queue_depth", model=MINILM)
            load.queue_peak = max(load.queue_peak, depth)

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CALLERS)) as session:
        await asyncio.gather(*(caller(session) for _ in range(CALLERS)), *([watcher(watch)] if watch else []))
    load.seconds = time.perf_counter() - started
    return load


def embedding(answer: bytes) -> np.ndarray:
    output = next(o for o in orjson.loads(answer)["outputs"] if o["name"] == "embedding")
    return np.asarray(output["data"], dtype=np.float32)


def embed_many(url: str, texts: list[str]) -> list[np.ndarray]:
    """Triton's own embeddings of ``texts``, in one call (a batch of up to 64 rows)."""
    body = orjson.dumps({"inputs": [{"name": "text", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}]})
    answer = exchange(url, "POST", minilm.INFER_PATH, body, {"Content-Type": "application/json"})
    return list(embedding(answer.body).reshape(len(texts), minilm.DIMENSIONS))


def infer_minilm(sidecar: SidecarProcess, text: str, headers: dict[str, str] | None = None) -> tuple[str, bytes]:
    """One MiniLM call through the sidecar's HTTP port: (x-sidecar-cache, body); raises unless 200."""
    answer = exchange(sidecar.url, "POST", minilm.INFER_PATH, minilm.infer_body(text),
                      {"Content-Type": "application/json", **(headers or {})})
    if answer.status != 200:
        raise RuntimeError(f"the sidecar answered {answer.status}: {answer.body[:200]!r}")
    return answer.header("x-sidecar-cache") or "-", answer.body


def agent_line(port: int) -> str:
    """What HAProxy's agent-check reads: one line, then the sidecar closes the connection."""
    with socket.create_connection((HOST, port), timeout=2) as sock:
        return sock.makefile("rb").readline().decode().strip()


@contextlib.contextmanager
def running(server: ServerProcess, timeout: float = 60.0) -> Iterator[ServerProcess]:
    """Started, and stopped on the way out; killed at once if the demo fails or is interrupted."""
    server.start(timeout)
    try:
        yield server
    except BaseException as error:
        if not isinstance(error, KeyboardInterrupt):
            say(f"\n   {server.name}'s log, last lines:\n{server.log_tail(15)}")
        server.kill()
        raise
    finally:
        server.stop()


# -- the sections -------------------------------------------------------------------------------------------


def section_proxy(triton: TritonServer, sidecar: SidecarProcess, check: Checks) -> str:
    say(f"\n1. The proxy: {REQUESTS} calls to the test model '{IDENTITY}', {CONCURRENCY} at a time, "
        "direct and through the sidecar")
    asyncio.run(identity_burst(triton.url, 200))  # both paths warmed first, unmeasured
    asyncio.run(identity_burst(sidecar.url, 200))
    direct = asyncio.run(identity_burst(triton.url, REQUESTS))
    before, cpu = Scrape(sidecar), cpu_seconds(sidecar.pid or 0)
    proxied = asyncio.run(identity_burst(sidecar.url, REQUESTS))
    cpu, after = cpu_seconds(sidecar.pid or 0) - cpu, Scrape(sidecar)
    say("   | path            | calls |   req/s | p50 ms | p99 ms |")
    say("   |-----------------|-------|---------|--------|--------|")
    say(direct.row("direct Triton"))
    say(proxied.row("through sidecar"))
    for name, load in (("direct", direct), ("through the sidecar", proxied)):
        check(load.statuses[200] == REQUESTS, f"{name}: every identity call answered 200 with its own result")

    labels = {"route": "infer", "model": IDENTITY}
    answered = after.since(before, "sidecar_requests_total", status="200", **labels)
    untouched = after.since(before, "sidecar_unmodelled_total")
    errors = after.since(before, "sidecar_upstream_errors_total")
    n = after.since(before, "sidecar_request_duration_seconds_count", **labels)
    whole = after.since(before, "sidecar_request_duration_seconds_sum", **labels) / n
    upstream = after.since(before, "sidecar_upstream_duration_seconds_sum", **labels) / n
    own, cpu_per_call = whole - upstream, cpu / REQUESTS
    say(f"   the sidecar counted, over the measured calls only: {answered:.0f} answered 200, {untouched:.0f} "
        f"forwarded untouched (unmodelled), {errors:.0f} upstream errors")
    say(f"   its own part: mean whole call {whole * 1e3:.2f} ms - mean upstream call {upstream * 1e3:.2f} ms "
        f"= {own * 1e3:.2f} ms a call (/metrics);")
    say(f"   CPU of the sidecar process: {cpu_per_call * 1e3:.2f} ms a call (/proc/{sidecar.pid}/stat). The client saw "
        f"p50 {(percentile(proxied.latencies, .5) - percentile(direct.latencies, .5)) * 1e3:+.2f} ms: it (Python), "
        f"Triton and the sidecar share {os.cpu_count()} cores (wrk figures: make bench)")
    check(answered == REQUESTS, "the sidecar's counter shows every measured call answered 200")
    check(untouched == 0 and errors == 0, "no call forwarded untouched, no upstream error")
    return (f"{REQUESTS} calls each way, each answered with its own result; the sidecar's own part "
            f"{own * 1e3:.2f} ms and {cpu_per_call * 1e3:.2f} ms of CPU a call")


def section_cache_and_batching(triton: TritonServer, sidecar: SidecarProcess, check: Checks) -> tuple[str, float]:
    """Returns the summary line and the highest queue depth seen during the burst (shown in section 4)."""
    texts = minilm.corpus()
    ranks = iter(minilm.zipf_ranks(200_000).tolist())
    say(f"\n2. The response cache and batching on a real model: '{MINILM}' (all-MiniLM-L6-v2 sentence embeddings,")
    say("   Triton's python backend, torch on the CPU; plain: no dynamic batcher, no response cache).")
    say(f"   The sidecar has cache.models={MINILM} and batch.models={MINILM}. Load: one text a call, drawn "
        f"Zipf({minilm.ZIPF_S}) over")
    say(f"   {len(texts):,} sentences, {CALLERS} callers, {LOAD_SECONDS:g} s each way, the sidecar's cache empty at "
        "the start.")
    counts = triton_counts(triton)
    direct = asyncio.run(zipf_load(triton.url, texts, ranks, LOAD_SECONDS))
    direct_rows, direct_runs = (a - b for a, b in zip(triton_counts(triton), counts, strict=True))
    before, counts = Scrape(sidecar), triton_counts(triton)
    proxied = asyncio.run(zipf_load(sidecar.url, texts, ranks, LOAD_SECONDS, watch=sidecar))
    rows, runs = (a - b for a, b in zip(triton_counts(triton), counts, strict=True))
    after = Scrape(sidecar)
    say("   | path            | calls |   req/s | p50 ms | p99 ms |")
    say("   |-----------------|-------|---------|--------|--------|")
    say(direct.row("direct Triton"))
    say(proxied.row("through sidecar"))
    speedup = proxied.rps / direct.rps
    p99_ratio = percentile(proxied.latencies, .99) / percentile(direct.latencies, .99)
    say(f"   through the sidecar: {speedup:.1f}x the calls per second, p99 {p99_ratio:.2f}x")
    hits, misses, coalesced = (proxied.cache[k] for k in ("hit", "miss", "coalesced"))
    hit_ratio = (hits + coalesced) / proxied.calls
    say(f"   x-sidecar-cache on the answers: hit {hits}, miss {misses}, coalesced {coalesced}: hit ratio "
        f"{hit_ratio:.1%} (answered without the model)")
    batches = after.since(before, "sidecar_batch_size_count", model=MINILM)
    batch_rows = after.since(before, "sidecar_batch_size_sum", model=MINILM)
    say(f"   the sidecar sent Triton {batches:.0f} calls for {batch_rows:.0f} rows ({batch_rows / batches:.1f} rows a "
        f"call); by size (sidecar_batch_size): {batch_sizes(before, after)}")
    say(f"   Triton's own statistics over the same burst: {rows} rows (inference_count) in {runs} executions "
        f"(execution_count), {rows / runs:.1f} rows each; direct: {direct_rows} rows in {direct_runs} executions")
    for name, load in (("direct", direct), ("through the sidecar", proxied)):
        check(load.statuses[200] == load.calls, f"{name}: every MiniLM call answered 200")
    check(rows == batch_rows == misses and runs == batches,
          "Triton computed exactly the rows and executions the sidecar says it sent (its misses)")
    check(direct_rows == direct_runs == direct.calls, "direct: Triton executed every call alone")

    # Each answer is its own text's embedding: compared with Triton's own, for the texts of the direct burst
    # (the most frequent ones) and one batch of 64 others drawn at random.
    reference = {index: embedding(body) for index, body in direct.answers}
    unseen = sorted({index for index, _ in proxied.answers} - reference.keys())
    others = random.Random(0).sample(unseen, min(64, len(unseen)))
    reference.update(zip(others, embed_many(triton.url, [texts[i] for i in others]), strict=True))
    compared = [(embedding(body), reference[index]) for index, body in proxied.answers if index in reference]
    worst = max(float(np.abs(got - want).max()) for got, want in compared)
    say(f"   answers: {len(compared)} of {proxied.calls} compared with Triton's own embedding of the same text: "
        f"largest difference {worst:.1e}")
    check(worst < 1e-4, "each compared answer is its own text's embedding")
    flight_rows = single_flight(triton, sidecar, check)
    return (f"{speedup:.1f}x req/s, p99 {p99_ratio:.2f}x vs Triton alone; hit ratio {hit_ratio:.0%}; "
            f"{rows / runs:.1f} rows per Triton execution; {SINGLE_FLIGHT} identical calls, {flight_rows} inference",
            proxied.queue_peak)


def single_flight(triton: TritonServer, sidecar: SidecarProcess, check: Checks) -> int:
    """The same new text from SINGLE_FLIGHT callers at once reaches the model server once; returns the rows
    Triton computed for them."""
    text = f"Nobody has asked for this sentence before {time.time_ns()}."
    counts = triton_counts(triton)
    answers = asyncio.run(_same_call(sidecar.url, text, SINGLE_FLIGHT))
    flight_rows, flight_runs = (a - b for a, b in zip(triton_counts(triton), counts, strict=True))
    seen = Counter(header for _, header, _ in answers)
    say(f"   single-flight: {SINGLE_FLIGHT} identical calls at once for a text never seen: "
        + ", ".join(f"{k} {v}" for k, v in seen.most_common()) + f"; Triton computed {flight_rows} row "
        f"in {flight_runs} execution")
    vectors = [embedding(body) for status, _, body in answers if status == 200]
    check(len(vectors) == SINGLE_FLIGHT and all(np.array_equal(v, vectors[0]) for v in vectors),
          "single-flight: every caller got the answer")
    check(flight_rows == 1 and flight_runs == 1, "single-flight: the model server computed the text once")
    return flight_rows


def batch_sizes(before: Scrape, after: Scrape) -> str:
    """Calls the sidecar sent the model server between two readings, by rows (sidecar_batch_size's buckets)."""
    edges = sorted((float(labels["le"]), labels["le"]) for name, labels, _ in after.samples
                   if name == "sidecar_batch_size_bucket" and labels.get("model") == MINILM)
    cells, counted, low = [], 0.0, 1
    for edge, le in edges:
        upto = after.since(before, "sidecar_batch_size_bucket", model=MINILM, le=le)
        if upto > counted:
            rows = f"{low}" if edge == low else f"{low}-{edge:g}" if edge < float("inf") else f">{low - 1}"
            cells.append(f"{rows}: {upto - counted:.0f}")
        counted, low = upto, (int(edge) + 1 if edge < float("inf") else low)
    return ", ".join(cells)


async def _same_call(url: str, text: str, n: int) -> list[tuple[int, str, bytes]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as session:
        async def one() -> tuple[int, str, bytes]:
            async with session.post(url + minilm.INFER_PATH, data=minilm.infer_body(text)) as resp:
                return resp.status, resp.headers.get("x-sidecar-cache", "-"), await resp.read()

        return await asyncio.gather(*(one() for _ in range(n)))


def section_grpc(sidecar: SidecarProcess, check: Checks) -> str:
    text = "A gRPC client and an HTTP client ask the same question."
    say(f"\n3. One gRPC client (tritonclient.grpc) on the sidecar's gRPC port {sidecar.grpc_url} "
        "(upstream.grpc_url: Triton's)")
    header, body = infer_minilm(sidecar, text)
    say(f"   an HTTP client asks for the embedding of {text!r}: x-sidecar-cache: {header}")
    first = embedding(body)

    tensor = grpcclient.InferInput("text", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
    with grpcclient.InferenceServerClient(sidecar.grpc_url) as client:
        same = np.array_equal(client.infer(MINILM, [tensor]).as_numpy("embedding").ravel(), first)
    with grpc.insecure_channel(sidecar.grpc_url) as channel:
        # The same call on the generated stub tritonclient.grpc uses, to read the answer's initial metadata.
        contents = service_pb2.InferTensorContents(bytes_contents=[text.encode()])
        request = service_pb2.ModelInferRequest(model_name=MINILM, inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1, 1],
                                                           contents=contents)])
        _, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request, timeout=10)
        metadata = dict(call.initial_metadata())
        health = health_pb2_grpc.HealthStub(channel)
        serving = {name: health_pb2.HealthCheckResponse.ServingStatus.Name(
            health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status) for name in ("", MINILM)}
    say(f"   tritonclient.grpc infer(), same text: {'the same embedding' if same else 'A DIFFERENT EMBEDDING'}; "
        f"the raw ModelInfer's initial metadata: x-sidecar-cache: {metadata.get('x-sidecar-cache')}")
    say("   grpc.health.v1 Check: " + ", ".join(f"service {k!r} {v}" for k, v in serving.items()))
    check(header == "miss" and same, "gRPC: the HTTP call computed the answer, the gRPC client got the same one")
    check(metadata.get("x-sidecar-cache") == "hit", "gRPC: a cache hit for the call an HTTP client made")
    check(set(serving.values()) == {"SERVING"}, "gRPC health: SERVING")
    return f"a gRPC call answered from the HTTP caller's cached answer; health {serving['']}"


def section_load_balancers(sidecar: SidecarProcess, agent_port: int, queue_peak: float, check: Checks) -> str:
    say("\n4. Warmth for load balancers")
    line = agent_line(agent_port)
    say(f"   HAProxy agent-check (mesh.agent_listen {HOST}:{agent_port}) answers: {line!r}")
    body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    path = f"/v2/models/{IDENTITY}/infer"
    asked = exchange(sidecar.url, "POST", path, body, {"endpoint-load-metrics-format": "TEXT"})
    plain = exchange(sidecar.url, "POST", path, body)
    report = asked.header("endpoint-load-metrics")
    say(f"   Envoy ORCA: a call with endpoint-load-metrics-format: TEXT gets endpoint-load-metrics: {report}")
    say(f"   (a call without it gets {'none' if plain.header('endpoint-load-metrics') is None else 'one too'})")
    metrics = Scrape(sidecar)
    depth, capacity = metrics.get("sidecar_queue_depth", model=MINILM), metrics.get("sidecar_warm_capacity")
    say(f"   autoscaler gauges: sidecar_queue_depth{{model=\"{MINILM}\"}} peaked at {queue_peak:.0f} during "
        f"section 2's burst (read every 0.25 s), {depth:.0f} now; sidecar_warm_capacity {capacity:g}")
    check(line == "up ready 100%", "agent-check: up ready 100% when warm")
    check(report is not None and report.startswith("TEXT ") and "application_utilization=" in report
          and plain.header("endpoint-load-metrics") is None, "ORCA report on the answer only when asked")
    check(queue_peak > 0 and depth == 0 and capacity == 1, "queue depth seen under load, 0 idle; warm capacity 1")
    return f"agent {line!r}; ORCA report when asked; queue depth peaked at {queue_peak:.0f}, warm capacity {capacity:g}"


def import_history(sidecar: SidecarProcess, work: Path) -> int:
    """Two days of MiniLM's calls per minute (a daily cycle, 20 to 60 a second) into the history the sidecar
    will keep, through `sidecar history import`, before it starts."""
    now = int(time.time() // 60)
    rows = ["timestamp,model,requests"]
    for minute in range(now - 2 * 1440, now):
        rate = 40 + 20 * np.sin(2 * np.pi * (minute % 1440) / 1440)
        rows.append(f"{minute * 60},{MINILM},{round(rate * 60)}")
    csv = work / "history.csv"
    csv.write_text("\n".join(rows) + "\n")
    store = sidecar.workdir / f"traffic-{sidecar.port}.db"  # the history lives beside the traffic memory
    done = subprocess.run([sys.executable, "-m", "sidecar", "history", "import", str(csv), "--store", str(store)],
                          capture_output=True, text=True, timeout=120)
    return done.returncode


def section_forecast(sidecar: SidecarProcess, imported: int, check: Checks) -> str:
    say("\n5. Demand forecast (sidecar history import: two days of MiniLM's calls per minute, a daily cycle)")
    status = orjson.loads(exchange(sidecar.admin_url, "GET", "/status?format=json").body)["forecast"]
    lead, measured = status["lead"], status["launch_to_warm"]
    found = (status["models"].get(MINILM) or {}).get("forecast")
    capacity = status["capacity"].get(MINILM)
    say(f"   imported (exit status {imported}); the pod measured its own launch-to-warm: {measured} s; the forecast "
        f"looks {lead['seconds']:.0f} s ahead ({lead['source']})")
    if found:
        say(f"   {MINILM}: {found['requests_per_second']:.1f} calls/s expected at now + lead "
            f"(pattern {found['baseline']:.1f}, level x{found['level']:.2f}, {found['method']})")
    if capacity:
        say(f"   this pod can serve {capacity['requests_per_second']:.0f} calls/s of it ({capacity['source']}): "
            "sidecar_capacity_requests_per_second, the denominator of the shipped forecast HPA")
    metrics = exchange(sidecar.admin_url, "GET", "/metrics").body.decode()
    exported = f'sidecar_forecast_requests_per_second{{model="{MINILM}"}}' in metrics
    check(imported == 0 and measured is not None and found is not None and exported,
          "history imported, launch-to-warm measured, a forecast exported")
    return (f"{found['requests_per_second']:.1f} calls/s expected at now + {lead['seconds']:.0f} s"
            if found else "no forecast") + (f"; capacity {capacity['requests_per_second']:.0f}/s" if capacity else "")


def section_admin(sidecar: SidecarProcess, agent_port: int, check: Checks) -> str:
    say("\n6. Admin actions (the sidecar runs with --set admin_token=...)")
    flush = f"/cache/flush?model={MINILM}"
    refused = exchange(sidecar.admin_url, "POST", flush)
    say(f"   POST {flush} without the token: {refused.status}")
    done = exchange(sidecar.admin_url, "POST", flush, headers={"Authorization": f"Bearer {TOKEN}"})
    say(f"   with Authorization: Bearer <token>: {done.status} {done.body.decode()}")
    header, _ = infer_minilm(sidecar, "A gRPC client and an HTTP client ask the same question.")
    say(f"   section 3's text again: x-sidecar-cache: {header} (a hit before the flush)")
    check(refused.status == 401 and done.status == 200 and orjson.loads(done.body)["flushed"] > 0,
          "cache flush refused without the token, done with it")
    check(header == "miss", "after the flush the next call is a miss")

    say("   SIGTERM to the sidecar (shutdown_delay=2: it keeps serving while load balancers take it out):")

    def agent_changed() -> str | None:
        line = agent_line(agent_port)
        return None if line == "up ready 100%" else line

    started = time.monotonic()
    os.kill(sidecar.pid or 0, signal.SIGTERM)
    line = wait_until(agent_changed, 2.0, "the agent's answer changes")
    ready = exchange(sidecar.admin_url, "GET", "/readyz").status
    capacity = Scrape(sidecar).get("sidecar_warm_capacity")
    wait_until(lambda: not sidecar.running, 30.0, "sidecar exit")
    code = sidecar.stop()
    say(f"   agent-check {line!r}, /readyz {ready}, sidecar_warm_capacity {capacity:g}; exit status {code} after "
        f"{time.monotonic() - started:.1f} s")
    check(line == "drain" and ready == 503 and capacity == 0 and code == 0, "SIGTERM: drain, not ready, exit 0")
    return f"flush 401 without the token, 200 with it, then a miss; SIGTERM: {line!r}, exit {code}"


def section_workers(triton: TritonServer, work: Path, check: Checks) -> str:
    """A second sidecar with the product's default, ``workers=auto``: one data-plane process per CPU."""
    say("\n7. Every core: a second sidecar with workers=auto (one data-plane worker per CPU this container may use,")
    say("   on shared ports, behind one control process; the sidecar above ran workers=1 so its CPU figure is one")
    say("   process's)")
    args = ["--set", "workers=auto", "--set", f"cache.models={IDENTITY}", "--set", "log_level=warning",
            "--set", "shutdown_delay=0"]
    pod = SidecarProcess(triton.url, work / "workers", "triton", args)
    with running(pod):
        workers = orjson.loads(exchange(pod.admin_url, "GET", "/status?format=json").body)["workers"]
        say(f"   /status: {workers['running']} of {workers['count']} workers running, pids {workers['pids']} "
            f"(control process {pod.pid})")
        body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": "FP32",
                                         "data": [7.0, 8.0, 9.0]}]})
        path = f"/v2/models/{IDENTITY}/infer"
        before = Scrape(pod).get("sidecar_requests_total", route="infer", model=IDENTITY, status="200")
        kinds: Counter[str] = Counter()
        calls = 0

        def everyone_served() -> bool:
            nonlocal calls
            for _ in range(10):  # each on a new connection: the kernel spreads them over the workers
                kinds[exchange(pod.url, "POST", path, body).header("x-sidecar-cache") or "none"] += 1
                calls += 1
            served = orjson.loads(exchange(pod.admin_url, "GET", "/status?format=json").body)["workers"]["calls"]
            return len(served) == workers["count"] and all(n > 0 for n in served.values())

        wait_until(everyone_served, 30.0, "every worker answered")
        counted = Scrape(pod).get("sidecar_requests_total", route="infer", model=IDENTITY, status="200") - before
        say(f"   {calls} identical calls on new connections, answered by every worker: "
            + ", ".join(f"{k} {v}" for k, v in kinds.most_common()) + "; one cache for the pod")
        say(f"   /metrics counts {counted:.0f} of them (the workers' counters merged at each scrape)")
        check(kinds["miss"] == 1 and kinds["hit"] == calls - 1, "workers: an answer one worker stored is a hit in "
                                                                 "the others")
        check(counted == calls, "workers: /metrics counts every call whichever worker answered it")
        killed = workers["pids"][0]
        started = time.monotonic()
        os.kill(killed, signal.SIGKILL)

        def replaced() -> bool:
            now = orjson.loads(exchange(pod.admin_url, "GET", "/status?format=json").body)["workers"]
            return now["running"] == workers["count"] and killed not in now["pids"]

        wait_until(replaced, 10.0, "the worker replaced")
        took = time.monotonic() - started
        ready = exchange(pod.admin_url, "GET", "/readyz").status
        restarts = Scrape(pod).get("sidecar_worker_restarts_total")
        say(f"   SIGKILL to worker {killed}: a new one served {took:.2f} s later; /readyz {ready} meanwhile; "
            f"sidecar_worker_restarts_total {restarts:g}")
        check(took <= 2.0 and ready == 200 and restarts == 1, "workers: a killed worker is replaced within 2 s, "
                                                               "the pod stays ready")
    return (f"{workers['count']} workers; {calls} calls, 1 miss; a killed worker replaced in {took:.2f} s, "
            "the pod ready throughout")


def section_cold_start(work: Path, check: Checks) -> str:
    say(f"\n8. The cold-start cliff. Model '{MODEL_COLD}': torch.compile on CPU, so the first call at every batch")
    say("   size compiles kernels. A sidecar records a short burst of real traffic (batch sizes "
        f"{', '.join(map(str, BATCHES))}); then the model")
    say("   server restarts cold (new process, empty compile cache), twice: alone, clients sent traffic once Triton")
    say("   says ready; behind a new sidecar with that traffic memory, clients sent traffic once its /readyz says 200.")
    store = str(work / "traffic.db")
    record(work, store, per_batch=2)
    alone = run_triton("alone", MODELS_TORCH_DIR, work, per_batch=1, steady=10, concurrency=1)
    warmed = run_sidecar(work, store, per_batch=1, steady=10, concurrency=1, name="sidecar")
    say("\n   | first call at batch size | " + " | ".join(f"{b:>7}" for b in BATCHES) + " | ready after |")
    say("   |--------------------------|" + "---------|" * len(BATCHES) + "-------------|")
    for label, case in (("Triton alone", alone), ("behind the sidecar", warmed)):
        cells = " | ".join(f"{case.first_at(b).latency * 1e3:5.0f}ms" for b in BATCHES)
        say(f"   | {label:<24} | {cells} | {case.ready:9.1f} s |")
    cliff = max(alone.first_at(b).latency for b in BATCHES)
    worst, p99 = max(warmed.first_at(b).latency for b in BATCHES), warmed.steady_p99()
    say(f"\n   Alone, Triton said ready after {alone.ready:.1f} s, and its first users then waited up to {cliff:.1f} s "
        "each.")
    say(f"   The sidecar said ready {warmed.ready - alone.ready:.1f} s later, having replayed what it had recorded; "
        f"after that no first call\n   took more than {worst * 1e3:.0f} ms ({worst / p99:.1f}x the steady p99 of "
        f"{p99 * 1e3:.1f} ms).")
    check(not (alone.errors() or warmed.errors()), "cold start: every call answered 200")
    return (f"first calls up to {cliff * 1e3:.0f} ms alone, at most {worst * 1e3:.0f} ms behind the sidecar "
            f"(ready {warmed.ready - alone.ready:.1f} s later)")


# -- the demo -----------------------------------------------------------------------------------------------


def main() -> int:
    check, summary = Checks(), {}
    t0 = time.monotonic()
    say("warm-sidecar demo: real servers on this machine (Triton on the CPU), the sidecar in front, traffic.")
    with tempfile.TemporaryDirectory(prefix="demo-") as tmp:
        work = Path(tmp)
        os.environ["TMPDIR"] = tmp  # the servers' scratch files (torch.compile's cache) go with this directory
        repo = minilm.model_repository(work / "models", "plain")
        shutil.copytree(MODELS_DIR / IDENTITY, repo / IDENTITY, ignore=shutil.ignore_patterns("__pycache__"))
        say(f"\nStarting Triton with two models: '{IDENTITY}' (a test model) and '{MINILM}' (a real one) ...")
        triton = TritonServer(repo, work / "triton")
        with running(triton, TRITON_START_TIMEOUT):
            say(f"   Triton ready in {time.monotonic() - t0:.1f} s: HTTP {triton.url}, gRPC {triton.grpc_url}")
            (agent_port,) = free_ports(1)
            settings = [f"cache.models={MINILM}", f"batch.models={MINILM}", f"upstream.grpc_url={triton.grpc_url}",
                        f"mesh.agent_listen={HOST}:{agent_port}", f"admin_token={TOKEN}", "shutdown_delay=2",
                        "log_level=warning"]
            sidecar = SidecarProcess(triton.url, work, "triton", [a for s in settings for a in ("--set", s)])
            imported = import_history(sidecar, work)
            t1 = time.monotonic()
            with running(sidecar):
                say(f"   the sidecar: /readyz 200 {time.monotonic() - t1:.2f} s after its process started (Triton "
                    f"ready, nothing recorded yet to warm up);\n   data port {sidecar.url}, gRPC {sidecar.grpc_url}, "
                    f"admin {sidecar.admin_url}; with --set " + " ".join(settings[:5]))
                summary["1. proxy"] = section_proxy(triton, sidecar, check)
                summary["2. cache + batching"], queue_peak = section_cache_and_batching(triton, sidecar, check)
                summary["3. gRPC"] = section_grpc(sidecar, check)
                summary["4. load balancers"] = section_load_balancers(sidecar, agent_port, queue_peak, check)
                summary["5. forecast"] = section_forecast(sidecar, imported, check)
                summary["6. admin"] = section_admin(sidecar, agent_port, check)
            summary["7. workers"] = section_workers(triton, work, check)
        say("   Triton stopped.")
        summary["8. cold start"] = section_cold_start(work, check)
    say(f"\nSummary ({time.monotonic() - t0:.0f} s, every number measured in this run):")
    for name, line in summary.items():
        say(f"   {name:<20} {line}")
    if check.failed:
        say(f"\nSOMETHING WENT WRONG: {len(check.failed)} of {len(check.passed) + len(check.failed)} checks failed:")
        for what in check.failed:
            say(f"   - {what}")
        return 1
    say(f"\nAll {len(check.passed)} checks passed: every call answered with its own answer.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

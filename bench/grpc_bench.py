"""gRPC data port: direct Triton vs through the sidecar, unary ModelInfer, and cache hits.

    .venv/bin/python bench/grpc_bench.py [--seconds 5] [--rounds 3] [--concurrency 16] [--procs 2]

The load generator is a few processes of grpc.aio clients (uvloop), each sending one pre-serialized
ModelInferRequest from ``concurrency / procs`` coroutines over one channel. Its own ceiling shows in the
table: it drives Triton's response-cache hits (C++, almost no work per call) far faster than anything
else here. A trivial Python grpc.aio server (canned answer, no work) is measured too: that is the most any
Python gRPC server, the sidecar included, can answer on this machine. Targets run in interleaved rounds,
order rotated each round; each figure is the median over rounds, with the spread. Everything shares the
machine's cores, so a hop that costs CPU shows as lost throughput even where, in a pod with its own
CPU, it would show as latency only.

- throughput: identity_fp32 (not cached anywhere), direct to Triton's gRPC port vs through the sidecar;
- cache hits: the same call repeated, Triton's own response cache (a copy of identity_fp32 with
  ``response_cache { enable: true }``, Triton started with ``--cache-config local,size=...``) vs the
  sidecar's cache (``cache.models=identity_cached``) in front of the same model.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from tests.servers import MODELS_DIR, TritonServer, free_ports  # noqa: E402
from tests.sidecar_proc import SidecarProcess  # noqa: E402
from tests.wire import exchange  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
CACHED = "identity_cached"


def infer_message(model: str) -> bytes:
    from tritonclient.grpc import service_pb2

    msg = service_pb2.ModelInferRequest(model_name=model)
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    msg.raw_input_contents.append(np.arange(4, dtype="<f4").tobytes())
    return bytes(msg.SerializeToString())


# -- the load generator: processes of grpc.aio clients -----------------------------------------------------


def _worker(target: str, message: bytes, concurrency: int, start_at: float, seconds: float, out: Any) -> None:
    import uvloop

    out.put(uvloop.run(_drive(target, message, concurrency, start_at, seconds)))


async def _drive(target: str, message: bytes, concurrency: int, start_at: float,
                 seconds: float) -> tuple[int, int, list[float]]:
    import grpc.aio

    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(INFER)
        await call(message, timeout=30)  # connected and warm before the clock starts
        latencies: list[float] = []
        errors = 0
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end = time.perf_counter() + seconds

        async def one_caller() -> None:
            nonlocal errors
            while (started := time.perf_counter()) < end:
                try:
                    await call(message, timeout=10)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one_caller() for _ in range(concurrency)))
    return len(latencies), errors, latencies


@dataclass
class Run:
    rps: float
    p50: float
    p99: float
    errors: int


def load(target: str, message: bytes, concurrency: int, procs: int, seconds: float) -> Run:
    ctx = multiprocessing.get_context("spawn")  # no grpc state inherited from this process
    out = ctx.Queue()
    start_at = time.time() + 1.5  # every process connected before any starts
    workers = [ctx.Process(target=_worker, args=(target, message, concurrency // procs + (i < concurrency % procs),
                                                 start_at, seconds, out)) for i in range(procs)]
    for w in workers:
        w.start()
    results = [out.get(timeout=seconds + 60) for _ in workers]
    for w in workers:
        w.join(10)
    latencies = sorted(x for _, _, lat in results for x in lat)
    done = sum(n for n, _, _ in results)
    return Run(done / seconds, _quantile(latencies, 0.5), _quantile(latencies, 0.99), sum(e for _, e, _ in results))


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- a trivial gRPC server: the load generator's own ceiling ---------------------------------------------------


def _trivial_server(port: int, ready: Any) -> None:
    import grpc
    import grpc.aio
    import uvloop
    from tritonclient.grpc import service_pb2

    answer = service_pb2.ModelInferResponse(model_name="x").SerializeToString()

    async def infer(_message: bytes, _context: Any) -> bytes:
        return bytes(answer)

    async def serve() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(infer)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    uvloop.run(serve())


def _bare_relay(port: int, upstream: str, ready: Any) -> None:
    """A Python grpc.aio proxy with nothing but the hop: raw bytes both ways, metadata forwarded and one
    initial-metadata op, as the sidecar does (no decoding, no stages). The floor of any Python gRPC hop."""
    import grpc
    import grpc.aio
    import uvloop

    options = [("grpc.optimization_target", "throughput")]

    async def serve() -> None:
        channel = grpc.aio.insecure_channel(upstream, options=options)
        forward = channel.unary_unary(INFER)

        async def infer(message: bytes, context: Any) -> bytes:
            metadata = tuple((k, v) for k, v in context.invocation_metadata() or () if not k.startswith(":"))
            call = forward(message, timeout=30, metadata=metadata)
            response = await call
            await context.send_initial_metadata((("x-relay", "1"),))
            return bytes(response)

        server = grpc.aio.server(options=options)
        handler = grpc.unary_unary_rpc_method_handler(infer)
        server.add_registered_method_handlers("inference.GRPCInferenceService", {"ModelInfer": handler})
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    uvloop.run(serve())


# -- the run --------------------------------------------------------------------------------------------------


def cached_repository(work: Path) -> Path:
    repository = work / "models"
    shutil.copytree(MODELS_DIR / "identity_fp32", repository / "identity_fp32")
    shutil.copytree(MODELS_DIR / "identity_fp32", repository / CACHED)
    config = repository / CACHED / "config.pbtxt"
    config.write_text(config.read_text() + "\nresponse_cache { enable: true }\n")
    return repository


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args()
    plain, cached = infer_message("identity_fp32"), infer_message(CACHED)
    ctx = multiprocessing.get_context("spawn")
    (trivial_port,) = free_ports(1)
    ready = ctx.Event()
    trivial = ctx.Process(target=_trivial_server, args=(trivial_port, ready), daemon=True)
    trivial.start()
    ready.wait(30)
    helpers = [trivial]
    with tempfile.TemporaryDirectory(prefix="grpc-bench-") as tmp:
        work = Path(tmp)
        with (
            TritonServer(cached_repository(work), work, models=["identity_fp32", CACHED],
                         extra_args=["--cache-config=local,size=16777216"]) as triton,
            SidecarProcess(triton.url, work, "triton", ["--set", "log_level=warning", "--set",
                                                        f"upstream.grpc_url={triton.grpc_url}",
                                                        "--set", f"cache.models={CACHED}"]) as sidecar,
        ):
            (relay_port,) = free_ports(1)
            relay_ready = ctx.Event()
            helpers.append(ctx.Process(target=_bare_relay, args=(relay_port, triton.grpc_url, relay_ready),
                                       daemon=True))
            helpers[-1].start()
            relay_ready.wait(30)
            targets = {
                "trivial Python grpc.aio server (no work)": (f"127.0.0.1:{trivial_port}", plain),
                "direct Triton": (triton.grpc_url, plain),
                "bare Python grpc.aio relay to Triton (no stages)": (f"127.0.0.1:{relay_port}", plain),
                "sidecar": (sidecar.grpc_url, plain),
                "direct Triton, response-cache hits": (triton.grpc_url, cached),
                "sidecar, cache hits": (sidecar.grpc_url, cached),
            }
            runs = measure(targets, args)
            stats = orjson.loads(exchange(triton.url, "GET", f"/v2/models/{CACHED}/stats").body)
            hits = sum(int(s["inference_stats"]["cache_hit"]["count"]) for s in stats["model_stats"])
    for helper in helpers:
        helper.terminate()
    report(runs, args, hits)
    return 0


def measure(targets: dict[str, tuple[str, bytes]], args: argparse.Namespace) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {name: [] for name in targets}
    names = list(targets)
    for r in range(args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            target, message = targets[name]
            runs[name].append(load(target, message, args.concurrency, args.procs, args.seconds))
            print(f"round {r + 1} {name}: {runs[name][-1].rps:,.0f} calls/s", file=sys.stderr)
    return runs


def report(runs: dict[str, list[Run]], args: argparse.Namespace, triton_cache_hits: int) -> None:
    med = {name: statistics.median(r.rps for r in rs) for name, rs in runs.items()}
    print(f"\n    .venv/bin/python bench/grpc_bench.py --seconds {args.seconds:g} --rounds {args.rounds} "
          f"--concurrency {args.concurrency} --procs {args.procs}\n")
    print(f"unary ModelInfer, FP32 [1,4], {args.concurrency} concurrent callers in {args.procs} processes, "
          f"median of {args.rounds} interleaved rounds of {args.seconds:g} s\n")
    print("| target | calls/s (median) | spread (min-max) | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for name, rs in runs.items():
        lo, hi = min(r.rps for r in rs), max(r.rps for r in rs)
        print(f"| {name} | {med[name]:,.0f} | {lo:,.0f}-{hi:,.0f} | {statistics.median(r.p50 for r in rs) * 1e3:.2f}"
              f" | {statistics.median(r.p99 for r in rs) * 1e3:.2f} | {sum(r.errors for r in rs)} |")
    print()
    print(f"sidecar / direct Triton: {med['sidecar'] / med['direct Triton']:.2f}x   (goal >= 0.5x)")
    relay = med["bare Python grpc.aio relay to Triton (no stages)"]
    print(f"bare relay / direct Triton: {relay / med['direct Triton']:.2f}x; sidecar / bare relay: "
          f"{med['sidecar'] / relay:.2f}x")
    print(f"sidecar cache hits / Triton response-cache hits: "
          f"{med['sidecar, cache hits'] / med['direct Triton, response-cache hits']:.2f}x   (goal >= 0.3x)")
    print(f"Triton's own cache_hit count for {CACHED}: {triton_cache_hits:,}")


if __name__ == "__main__":
    sys.exit(main())

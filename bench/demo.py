"""`make demo`: a real Triton, the sidecar in front, traffic, and an account of what happened."""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from bench.coldstart import BATCHES, MODELS_TORCH_DIR, record, run_sidecar, run_triton  # noqa: E402
from tests.servers import MODELS_DIR, TritonServer  # noqa: E402
from tests.sidecar_proc import SidecarProcess  # noqa: E402

MODEL = "identity_fp32"
MODEL_COLD = "compiled_mlp"
REQUESTS = 2000
CONCURRENCY = 16


def say(text: str = "") -> None:
    print(text, flush=True)


async def burst(base: str, n: int, concurrency: int) -> tuple[list[float], dict[int, int]]:
    """Send ``n`` inference calls, ``concurrency`` at a time; latencies (s) and status counts."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = iter(range(n))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in queue:
            body = orjson.dumps({"id": str(i), "inputs": [
                {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [i, i + 1, i + 2, i + 3]}]})
            started = time.perf_counter()
            async with session.post(f"{base}/v2/models/{MODEL}/infer", data=body) as resp:
                answer = await resp.read()
            latencies.append(time.perf_counter() - started)
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            if resp.status == 200 and orjson.loads(answer)["outputs"][0]["data"][0] != i:
                raise AssertionError("an answer came back to the wrong caller")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return latencies, statuses


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def metric(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    say("warm-sidecar demo: a real Triton Inference Server (CPU), the sidecar in front of it, traffic.\n")
    with tempfile.TemporaryDirectory(prefix="demo-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        say(f"1. Starting Triton with the demo model '{MODEL}' ...")
        with TritonServer(MODELS_DIR, work / "triton", models=[MODEL]) as triton:
            say(f"   Triton ready in {time.monotonic() - t0:.1f} s at {triton.url}")

            say("2. Starting the sidecar in front of it ...")
            sidecar = SidecarProcess(triton.url, work, "triton", ["--set", "log_level=warning"], wait="listening")
            t1 = time.monotonic()
            sidecar.start()
            sidecar.wait_until_ready()
            say(f"   data port {sidecar.url}, admin port {sidecar.admin_url}")
            say(f"   process start to /readyz 200: {time.monotonic() - t1:.2f} s "
                "(Triton ready, and nothing recorded yet to warm up)")

            say(f"3. Traffic: {REQUESTS} inference calls, {CONCURRENCY} at a time, direct and through the sidecar")
            asyncio.run(burst(triton.url, 200, CONCURRENCY))  # warm both paths, unmeasured
            asyncio.run(burst(sidecar.url, 200, CONCURRENCY))
            direct, d_status = asyncio.run(burst(triton.url, REQUESTS, CONCURRENCY))
            proxied, p_status = asyncio.run(burst(sidecar.url, REQUESTS, CONCURRENCY))
            say("   | path            | ok   | p50 ms | p99 ms | mean ms |")
            say("   |-----------------|------|--------|--------|---------|")
            for name, lat, st in (("direct Triton", direct, d_status), ("through sidecar", proxied, p_status)):
                say(f"   | {name:<15} | {st.get(200, 0):>4} | {percentile(lat, 0.5) * 1e3:6.2f} | "
                    f"{percentile(lat, 0.99) * 1e3:6.2f} | {statistics.mean(lat) * 1e3:7.2f} |")
            say(f"   added by the sidecar: p50 {(percentile(proxied, .5) - percentile(direct, .5)) * 1e3:+.2f} ms "
                "(this demo's client is Python; see `make bench` for wrk figures)")

            text = asyncio.run(_get(sidecar.admin_url + "/metrics"))
            say("4. What the sidecar counted (/metrics):")
            ok_calls = metric(text, "sidecar_requests_total", 'status="200"')
            say(f"   inference calls answered 200: {ok_calls:.0f}")
            say(f"   upstream errors: {metric(text, 'sidecar_upstream_errors_total'):.0f}; "
                f"malformed calls rejected: {metric(text, 'sidecar_decode_errors_total'):.0f}")
            hist_sum = metric(text, "sidecar_upstream_duration_seconds_sum")
            hist_n = metric(text, "sidecar_upstream_duration_seconds_count")
            whole_sum = metric(text, "sidecar_request_duration_seconds_sum")
            whole_n = metric(text, "sidecar_request_duration_seconds_count")
            if hist_n and whole_n:
                upstream, whole = hist_sum / hist_n, whole_sum / whole_n
                say(f"   mean upstream call {upstream * 1e3:.2f} ms, mean whole call {whole * 1e3:.2f} ms: the "
                    f"sidecar's own work is {(whole - upstream) * 1e3:.2f} ms a call; the rest of the added time "
                    "is waiting for the machine's 2 cores")
            status = orjson.loads(asyncio.run(_get(sidecar.admin_url + "/status?format=json")))
            say(f"   state: {status['state']} ({status['reason']}); upstream {status['upstream']['protocol']}")

            say("5. Shutting down: SIGTERM to the sidecar (it drains in-flight calls), then Triton")
            code = sidecar.terminate()
            say(f"   sidecar exited with status {code}")
        say("   Triton stopped.")
        warm_ok = cold_start(work)
        say(f"\nDemo took {time.monotonic() - t0:.0f} s.")
    ok = d_status.get(200) == REQUESTS and p_status.get(200) == REQUESTS and code == 0 and warm_ok
    say("\nAll calls answered, each with its own result." if ok else "\nSOMETHING WENT WRONG: see above.")
    return 0 if ok else 1


def cold_start(work: Path) -> bool:
    """Part two: the cold-start cliff of a torch.compile model, without and with the sidecar's warm-up."""
    say(f"\n6. The cold-start cliff. Model '{MODEL_COLD}': torch.compile on CPU, so the first call at every")
    say("   batch size compiles kernels. Recording a short burst of real traffic (batch sizes "
        f"{', '.join(map(str, BATCHES))}) through a sidecar ...")
    store = str(work / "traffic.db")
    record(work, store, per_batch=2)
    say("7. Restarting the model server cold (new process, empty compile cache), twice:")
    say("   - alone: clients are sent traffic once Triton says ready;")
    alone = run_triton("alone", MODELS_TORCH_DIR, work, per_batch=1, steady=10, concurrency=1)
    say("   - behind the sidecar: clients are sent traffic once the sidecar's /readyz says 200.")
    warmed = run_sidecar(work, store, per_batch=1, steady=10, concurrency=1, name="sidecar")
    say("\n   | first call at batch size | " + " | ".join(f"{b:>7}" for b in BATCHES) + " | ready after |")
    say("   |--------------------------|" + "---------|" * len(BATCHES) + "-------------|")
    for label, case in (("Triton alone", alone), ("behind the sidecar", warmed)):
        cells = " | ".join(f"{case.first_at(b).latency * 1e3:5.0f}ms" for b in BATCHES)
        say(f"   | {label:<24} | {cells} | {case.ready:9.1f} s |")
    p99 = warmed.steady_p99()
    worst = max(warmed.first_at(b).latency for b in BATCHES)
    say(f"\n   Alone, Triton said ready after {alone.ready:.1f} s, and its first users then waited up to "
        f"{max(alone.first_at(b).latency for b in BATCHES):.1f} s each.")
    say(f"   The sidecar said ready {warmed.ready - alone.ready:.1f} s later, having replayed what it had recorded; "
        f"after that no first call\n   took more than {worst * 1e3:.0f} ms ({worst / p99:.1f}x the steady p99 of "
        f"{p99 * 1e3:.1f} ms).")
    return not (alone.errors() or warmed.errors())


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return await resp.text()


if __name__ == "__main__":
    sys.exit(main())

"""The cold-start scenario shared by the benchmark and the demo: a real Triton serving a torch.compile
model (tests/models_torch/compiled_mlp) that compiles on the first call at every batch size.

Three ways to start a pod, each from nothing (a new Triton process, a fresh Inductor cache):

- ``triton``: Triton alone, no warm-up; traffic starts when Triton reports ready;
- ``model_warmup``: Triton with its own ``model_warmup`` (batch 1, random data);
- ``sidecar``: Triton behind the sidecar, which replays what it recorded earlier; traffic
  starts when the sidecar's /readyz says 200.

Traffic is the same in every case: a few concurrent clients cycling through the batch sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import orjson

from tests.servers import REPO_ROOT, TritonServer
from tests.sidecar_proc import SidecarProcess

MODEL = "compiled_mlp"
MODELS_TORCH_DIR = REPO_ROOT / "tests" / "models_torch"
FEATURES = 64
BATCHES = (1, 2, 4, 8)
FAST = ["--set", "record.flush_interval=0.2", "--set", "upstream.health_interval=0.25",
        "--set", "shutdown_delay=0", "--set", "log_level=warning"]
TRITON_START_TIMEOUT = 180.0


@dataclass(frozen=True)
class Sample:
    sent: float  # seconds since the case started (the model server was launched)
    batch: int
    latency: float  # seconds
    status: int


@dataclass
class Case:
    name: str
    ready: float = 0.0  # seconds from launch to the readiness signal traffic waits for
    samples: list[Sample] = field(default_factory=list)
    steady: list[Sample] = field(default_factory=list)

    def first(self) -> Sample:
        return min(self.samples, key=lambda s: s.sent)

    def first_at(self, batch: int) -> Sample:
        return min((s for s in self.samples if s.batch == batch), key=lambda s: s.sent)

    def worst(self, batch: int) -> float:
        return max(s.latency for s in self.samples if s.batch == batch)

    def steady_p99(self) -> float:
        return statistics.quantiles([s.latency for s in self.steady], n=100, method="inclusive")[98]

    def errors(self) -> int:
        return sum(s.status != 200 for s in self.samples + self.steady)


def body(batch: int, seed: int) -> bytes:
    rows = np.random.default_rng(seed).standard_normal((batch, FEATURES), dtype=np.float32)
    return orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [batch, FEATURES], "datatype": "FP32",
                                     "data": rows.ravel().tolist()}]})


async def traffic(url: str, per_batch: int, concurrency: int, started: float,
                  batches: Sequence[int] = BATCHES, until: float | None = None) -> list[Sample]:
    """``per_batch`` calls at each batch size, interleaved, ``concurrency`` at a time; with ``until`` (a
    ``time.monotonic()`` instant) the batch sizes cycle until then instead, whatever the count."""
    cycle = itertools.cycle(batches) if until is not None else itertools.chain.from_iterable(
        itertools.repeat(tuple(batches), per_batch))
    plan = itertools.takewhile(lambda _: until is None or time.monotonic() < until, cycle)
    bodies = {b: [body(b, seed) for seed in range(8)] for b in batches}
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=120)

    async def worker(session: aiohttp.ClientSession) -> None:
        for i, batch in enumerate(plan):
            sent = time.monotonic()
            async with session.post(f"{url}/v2/models/{MODEL}/infer", data=bodies[batch][i % 8],
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
            samples.append(Sample(sent - started, batch, time.monotonic() - sent, resp.status))

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return sorted(samples, key=lambda s: s.sent)


def triton_warmup_repo(work: Path) -> Path:
    """A copy of the model with Triton's own ``model_warmup``: batch 1, random data."""
    repo = work / "repo-model-warmup"
    model_dir = shutil.copytree(MODELS_TORCH_DIR / MODEL, repo / MODEL)
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text() + """
model_warmup [
  {
    name: "random_batch_1"
    batch_size: 1
    inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 64 ] random_data: true } }
  }
]
""")
    return repo


def record(work: Path, store: str, per_batch: int = 5) -> None:
    """Real traffic through a sidecar, so the store holds the batch sizes clients use."""
    with (TritonServer(MODELS_TORCH_DIR, work / "record", models=[MODEL]).start(TRITON_START_TIMEOUT) as triton,
          SidecarProcess(triton.url, work, "triton", ["--store", store, *FAST]) as sidecar):
        asyncio.run(traffic(sidecar.url, per_batch, 1, time.monotonic()))


def run_triton(name: str, repo: Path, work: Path, per_batch: int, steady: int, concurrency: int,
               minute: float | None = None) -> Case:
    """``minute``: the window is every call sent from ready until that many seconds after launch."""
    case = Case(name)
    started = time.monotonic()
    with TritonServer(repo, work / name, models=[MODEL]).start(TRITON_START_TIMEOUT) as triton:
        case.ready = time.monotonic() - started
        case.samples = asyncio.run(traffic(triton.url, per_batch, concurrency, started,
                                           until=None if minute is None else started + minute))
        case.steady = asyncio.run(traffic(triton.url, steady, concurrency, started))
    return case


def run_sidecar(work: Path, store: str, per_batch: int, steady: int, concurrency: int,
                name: str = "sidecar", minute: float | None = None) -> Case:
    case = Case(name)
    triton = TritonServer(MODELS_TORCH_DIR, work / name, models=[MODEL])
    sidecar = SidecarProcess(triton.url, work, "triton", ["--store", store, *FAST], wait="listening")
    with contextlib.ExitStack() as stack:
        # The sidecar stops first: Triton's graceful exit waits (--exit-timeout-secs, 30 s) for every open
        # HTTP connection, and the sidecar's pooled ones stay open while it runs.
        stack.callback(triton.stop)
        stack.callback(sidecar.stop)
        started = time.monotonic()
        sidecar.start()
        triton.start(TRITON_START_TIMEOUT)
        sidecar.wait_until_ready(timeout=600)
        case.ready = time.monotonic() - started
        case.samples = asyncio.run(traffic(sidecar.url, per_batch, concurrency, started,
                                           until=None if minute is None else started + minute))
        case.steady = asyncio.run(traffic(sidecar.url, steady, concurrency, started))
    return case

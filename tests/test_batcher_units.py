"""The batcher in-process, against a scripted upstream: who batches with whom, who gets which rows.

Property tests for merging and splitting rows; the stage's invariants under random concurrency,
cancellation and upstream faults: every caller gets exactly its own rows, or the error it would have
got alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import BatchConfig
from sidecar.errors import UpstreamUnavailable
from sidecar.metrics import Metrics
from sidecar.pipeline.batcher import Batcher
from sidecar.pipeline.latency import LatencyModel
from sidecar.pipeline.stage import Call, HttpAnswer, HttpWire, Reply
from sidecar.protocols.request import InferenceRequest, InferenceResponse, Protocol, Tensor, pack_bytes_elements
from sidecar.protocols.rows import batch_signature, merge, rows_of, split
from sidecar.upstream.models import ModelInfo

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fp32(name: str, rows: np.ndarray) -> Tensor:
    return Tensor(name, "FP32", rows.shape, rows.astype("<f4").tobytes())


def request(values: np.ndarray, model: str = "m", **params: str) -> InferenceRequest:
    return InferenceRequest(Protocol.KSERVE_HTTP, model, inputs=(fp32("X", values),),
                            parameters=tuple(sorted(params.items())))


def identity(req: InferenceRequest) -> InferenceResponse:
    """What an identity model answers: every input as an output of the same name."""
    return InferenceResponse(req.protocol, req.model, "1", tuple(dataclasses.replace(t, name="Y" + t.name)
                                                                 for t in req.inputs))


# -- merge and split ------------------------------------------------------------------------------------


@SETTINGS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=6), st.integers(1, 3), st.booleans())
def test_each_caller_gets_exactly_its_own_rows_back(sizes: list[int], width: int, with_bytes: bool) -> None:
    rng = np.random.default_rng(sum(sizes) * 31 + width)
    requests = []
    for n in sizes:
        inputs = [fp32("X", rng.random((n, width)))]
        if with_bytes:
            elements = [bytes(rng.integers(0, 255, rng.integers(0, 5), dtype=np.uint8)) for _ in range(n * width)]
            inputs.append(Tensor("S", "BYTES", (n, width), pack_bytes_elements(elements)))
        requests.append(InferenceRequest(Protocol.KSERVE_HTTP, "m", inputs=tuple(inputs)))
    assert len({batch_signature(r) for r in requests}) == 1
    merged = merge(requests)
    assert rows_of(merged) == sum(sizes)
    for req, part in zip(requests, split(identity(merged), sizes), strict=True):
        assert part.outputs == identity(req).outputs


def test_callers_that_could_differ_never_share_a_signature() -> None:
    base = request(np.zeros((1, 2)))
    assert batch_signature(request(np.zeros((3, 2)))) == batch_signature(base)  # only the batch size differs
    assert batch_signature(request(np.zeros((1, 3)))) != batch_signature(base)  # another non-batch dimension
    assert batch_signature(request(np.zeros((1, 2)), model="n")) != batch_signature(base)
    assert batch_signature(request(np.zeros((1, 2)), custom="1")) != batch_signature(base)
    assert batch_signature(request(np.zeros((1, 2)), priority="1")) == batch_signature(base)  # a hint only
    assert batch_signature(InferenceRequest(Protocol.KSERVE_HTTP, "m", inputs=(fp32("X", np.zeros(())),))) is None


def test_an_answer_that_is_not_per_row_cannot_be_split() -> None:
    summary = InferenceResponse(Protocol.KSERVE_HTTP, "m", "1", (fp32("Y", np.zeros((1,))),))
    with pytest.raises(ValueError):
        split(summary, [1, 2])


# -- the latency model -----------------------------------------------------------------------------------


def test_latency_model_caps_the_batch_within_the_target() -> None:
    lm = LatencyModel()
    assert lm.cap("m", 0.05, 32) == 32  # nothing learned yet
    for batch, seconds in ((1, 0.010), (4, 0.020), (8, 0.040)):
        lm.observe("m", batch, seconds)
    assert lm.predict("m", 6) == pytest.approx(0.030)
    assert lm.predict("m", 16) == pytest.approx(0.080)
    assert lm.cap("m", 0.030, 32) == 6
    assert lm.cap("m", 0.001, 32) == 1
    assert lm.cap("m", 0.0, 32) == 32  # no target: the model's maximum


# -- the stage --------------------------------------------------------------------------------------------


class Catalog:
    def __init__(self, info: ModelInfo) -> None:
        self.value = info

    async def info(self, model: str, protocol: Protocol) -> ModelInfo:
        return self.value


class Upstream:
    """Answers as an identity model, one call at a time per instance; records every call it gets."""

    def __init__(self, refuse: float | None = None, unavailable: bool = False) -> None:
        self.calls: list[Call] = []
        self.refuse = refuse
        self.unavailable = unavailable
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, call: Call) -> Reply:
        self.calls.append(call)
        await self.release.wait()
        await asyncio.sleep(0)
        if self.unavailable:
            raise UpstreamUnavailable("model server unavailable")
        data = np.frombuffer(call.request.inputs[0].data, dtype="<f4")
        if self.refuse is not None and self.refuse in data:
            return Reply(400, wire=HttpAnswer(400, b"Bad", (), b'{"error":"poisoned"}'), for_call=call)
        return Reply(200, wire=HttpAnswer(200, b"OK", (), b""), for_call=call, response=identity(call.request))


def batcher(instances: int = 1, **cfg: object) -> Batcher:
    config = dataclasses.replace(BatchConfig(), **{"models": ("*",), "max_delay": 0.05, **cfg})  # type: ignore[arg-type]
    return Batcher(config, Catalog(ModelInfo(8, instances=instances)), LatencyModel(), Metrics())  # type: ignore[arg-type]


def call(value: float, width: int = 2) -> Call:
    loop = asyncio.get_running_loop()
    req = request(np.full((1, width), value))
    return Call(req, f"r{value}", loop.time() + 10, HttpWire(b"/v2/models/m/infer", (), b"{}"))


def own_rows(reply: Reply, value: float) -> bool:
    return bool(np.all(np.frombuffer(reply.response().outputs[0].data, dtype="<f4") == np.float32(value)))


async def test_low_load_goes_at_once_alone_and_untouched() -> None:
    stage, upstream = batcher(), Upstream()
    reply = await stage(call(1.0), upstream)
    assert len(upstream.calls) == 1 and upstream.calls[0].wire is not None  # the caller's own bytes
    assert own_rows(reply, 1.0)


async def test_busy_server_gathers_arrivals_into_one_call() -> None:
    stage, upstream = batcher(), Upstream()
    upstream.release.clear()
    first = asyncio.create_task(stage(call(0.0), upstream))
    await asyncio.sleep(0)
    others = [asyncio.create_task(stage(call(float(i)), upstream)) for i in range(1, 8)]
    await asyncio.sleep(0)
    upstream.release.set()
    replies = await asyncio.gather(first, *others)
    assert len(upstream.calls) == 2  # the first alone, then the seven gathered behind it
    assert rows_of(upstream.calls[1].request) == 7 and upstream.calls[1].wire is None
    assert all(own_rows(r, float(i)) for i, r in enumerate(replies))


async def test_a_poisoned_member_fails_alone() -> None:
    stage, upstream = batcher(), Upstream(refuse=3.0)
    upstream.release.clear()
    blocker = asyncio.create_task(stage(call(0.0), upstream))
    await asyncio.sleep(0)
    members = [asyncio.create_task(stage(call(float(i)), upstream)) for i in range(1, 6)]
    await asyncio.sleep(0)
    upstream.release.set()
    replies = await asyncio.gather(blocker, *members)
    assert [r.status for r in replies] == [200, 200, 200, 400, 200, 200]
    assert all(own_rows(r, float(i)) for i, r in enumerate(replies) if r.ok)
    assert stage.models["m"].retried_alone == 5


async def test_an_unavailable_server_fails_every_member_as_it_would_alone() -> None:
    stage, upstream = batcher(), Upstream(unavailable=True)
    upstream.release.clear()
    tasks = [asyncio.create_task(stage(call(float(i)), upstream)) for i in range(4)]
    await asyncio.sleep(0)
    upstream.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, UpstreamUnavailable) for r in results)


async def test_different_non_batch_dimensions_never_mix() -> None:
    stage, upstream = batcher(), Upstream()
    upstream.release.clear()
    blocker = asyncio.create_task(stage(call(0.0), upstream))
    await asyncio.sleep(0)
    narrow = [asyncio.create_task(stage(call(float(i), width=2), upstream)) for i in range(1, 4)]
    wide = [asyncio.create_task(stage(call(float(i), width=3), upstream)) for i in range(4, 6)]
    await asyncio.sleep(0)
    upstream.release.set()
    replies = await asyncio.gather(blocker, *narrow, *wide)
    for c in upstream.calls:
        assert len({t.shape[1:] for t in c.request.inputs}) == 1
    widths = {c.request.inputs[0].shape[1] for c in upstream.calls[1:]}
    assert widths == {2, 3}
    assert all(own_rows(r, float(i)) for i, r in enumerate(replies))


async def test_a_caller_that_leaves_before_dispatch_leaves_the_batch() -> None:
    stage, upstream = batcher(), Upstream()
    upstream.release.clear()
    blocker = asyncio.create_task(stage(call(0.0), upstream))
    await asyncio.sleep(0)
    staying = [asyncio.create_task(stage(call(float(i)), upstream)) for i in (1, 2)]
    leaving = asyncio.create_task(stage(call(9.0), upstream))
    await asyncio.sleep(0)
    leaving.cancel()
    upstream.release.set()
    replies = await asyncio.gather(blocker, *staying)
    assert all(own_rows(r, float(i)) for i, r in enumerate(replies))
    sent = np.concatenate([np.frombuffer(c.request.inputs[0].data, dtype="<f4") for c in upstream.calls])
    assert 9.0 not in sent
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_max_delay_bounds_the_wait_when_the_server_stays_busy() -> None:
    stage, upstream = batcher(max_delay=0.02), Upstream()
    upstream.release.clear()
    stuck = asyncio.create_task(stage(call(0.0), upstream))
    await asyncio.sleep(0)
    second_sent = asyncio.Event()
    original = upstream.__call__

    async def watching(c: Call) -> Reply:
        if len(upstream.calls) == 1:
            second_sent.set()
        return await original(c)

    waiting = asyncio.create_task(stage(call(1.0), watching))
    async with asyncio.timeout(2):
        await second_sent.wait()  # dispatched past the in-flight limit once its wait reached max_delay
    upstream.release.set()
    assert own_rows(await waiting, 1.0) and own_rows(await stuck, 0.0)


async def test_every_caller_gets_its_own_rows_under_random_concurrency() -> None:
    rng = random.Random(5)
    stage = batcher(instances=2)

    class Flaky(Upstream):
        async def __call__(self, call: Call) -> Reply:
            await asyncio.sleep(rng.random() * 0.004)
            if rng.random() < 0.1:
                raise UpstreamUnavailable("fault")
            return await super().__call__(call)

    upstream = Flaky(refuse=13.0)

    async def one(i: int) -> tuple[float, Reply | BaseException]:
        value = float(i % 40)
        task = asyncio.create_task(stage(call(value, width=rng.choice((2, 3))), upstream))
        if rng.random() < 0.15:
            await asyncio.sleep(rng.random() * 0.003)
            task.cancel()
        try:
            return value, await task
        except (asyncio.CancelledError, UpstreamUnavailable) as e:
            return value, e

    results = await asyncio.gather(*(one(i) for i in range(400)))
    for value, outcome in results:
        if isinstance(outcome, Reply):
            if value == 13.0:
                assert outcome.status == 400
            else:
                assert outcome.ok and own_rows(outcome, value)
    assert sum(len(m.pending) for m in stage.models.values()) == 0

"""The batcher in-process, against a scripted upstream: who batches with whom, who gets which rows.

Property tests for merging and splitting rows; the stage's invariants under random concurrency,
cancellation and upstream faults: every caller gets exactly its own rows, or the error it would have
got alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.calls import Call, HttpAnswer, HttpWire, Reply
from sidecar.config import BatchConfig
from sidecar.errors import AnswerTooLarge, SidecarError, UpstreamTimeout, UpstreamUnavailable
from sidecar.latency import LatencyModel
from sidecar.metrics import Metrics
from sidecar.pipeline.batcher import CONFIRM, Batcher
from sidecar.protocols.forwarded import Context
from sidecar.protocols.request import InferenceRequest, InferenceResponse, Protocol, Tensor, pack_bytes_elements
from sidecar.protocols.rows import batch_signature, merge, rows_of, split
from sidecar.upstream.models import ModelInfo, tf_variable_outputs, triton_info
from tests.servers import wait_until_async

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
    # Options go to the server with the batch: priority and timeout must agree, wire forms need not.
    with_priority = dataclasses.replace(base, options=(("priority", "1"),))
    assert batch_signature(with_priority) != batch_signature(base)
    as_binary = dataclasses.replace(base, options=(("binary_data_output", "true"),))
    assert batch_signature(as_binary) == batch_signature(base)
    merged = merge([with_priority, dataclasses.replace(with_priority, id="x")])
    assert dict(merged.options) == {"priority": "1", "binary_data_output": "true"}
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


def test_the_default_cap_is_the_smallest_batch_near_the_best_throughput() -> None:
    lm = LatencyModel()
    assert lm.knee("m", 32) == 32  # nothing learned yet: the model's maximum
    # 100 rows/s alone, 400 at 8, 410 at 16, 420 at 32: past 8 a batch adds wait, hardly throughput.
    for batch, seconds in ((1, 0.010), (8, 0.020), (16, 16 / 410), (32, 32 / 420)):
        lm.observe("m", batch, seconds)
    assert lm.knee("m", 32) == 8
    assert lm.knee("m", 4) == 4  # what is measured past the model's maximum does not count
    lm.observe("m", 64, 64 / 1000)  # a large batch that really pays: it is the knee now
    assert lm.knee("m", 64) == 64


# -- the stage --------------------------------------------------------------------------------------------


class Catalog:
    def __init__(self, info: ModelInfo) -> None:
        self.value = info

    async def info(self, model: str, protocol: Protocol) -> ModelInfo:
        return self.value


class Upstream:
    """Answers as an identity model (or ``answer``), one call at a time per instance; records every call it
    gets. ``refuse``: a value whose calls get 400; ``huge``: a value whose calls' answers are over the answer
    limit, as is any answer of more than ``max_rows`` rows. Calls the sidecar built (batches) also wait for
    ``batches``; calls cancelled while held are recorded."""

    def __init__(self, refuse: float | None = None, unavailable: bool = False, huge: float | None = None,
                 max_rows: int | None = None,
                 answer: Callable[[InferenceRequest], InferenceResponse] = identity) -> None:
        self.calls: list[Call] = []
        self.cancelled: list[Call] = []
        self.refuse = refuse
        self.unavailable = unavailable
        self.huge = huge
        self.max_rows = max_rows
        self.answer = answer
        self.release = asyncio.Event()
        self.release.set()
        self.batches = asyncio.Event()
        self.batches.set()

    async def __call__(self, call: Call) -> Reply:
        self.calls.append(call)
        try:
            await self.release.wait()
            if call.wire is None:
                await self.batches.wait()
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled.append(call)
            raise
        if self.unavailable:
            raise UpstreamUnavailable("model server unavailable")
        data = np.frombuffer(call.request.inputs[0].data, dtype="<f4")
        if (self.huge is not None and self.huge in data) or (self.max_rows is not None
                                                              and (rows_of(call.request) or 0) > self.max_rows):
            raise AnswerTooLarge("model server answer exceeds 100 bytes")
        if self.refuse is not None and self.refuse in data:
            return Reply(400, wire=HttpAnswer(400, b"Bad", (), b'{"error":"poisoned"}'), for_call=call)
        return Reply(200, wire=HttpAnswer(200, b"OK", (), b""), for_call=call, response=self.answer(call.request))


def batcher(instances: int = 1, info: ModelInfo | None = None, **cfg: object) -> Batcher:
    config = dataclasses.replace(BatchConfig(), **{"models": ("*",), "max_delay": 0.05, **cfg})  # type: ignore[arg-type]
    catalog = Catalog(info or ModelInfo(8, instances=instances))
    return Batcher(config, catalog, LatencyModel(), Metrics())  # type: ignore[arg-type]


def call(value: float, width: int = 2, deadline: float = 10, context: Context = (), scope: bytes = b"",
         private: bool = False, rows: int = 1) -> Call:
    loop = asyncio.get_running_loop()
    req = request(np.full((rows, width), value))
    return Call(req, f"r{value}", loop.time() + deadline, HttpWire(b"/v2/models/m/infer", (), b"{}"),
                context=context, scope=scope, private=private)


async def until(predicate: Callable[[], object], within: float = 2.0) -> None:
    """Let the loop run until ``predicate()`` holds; fails after ``within`` seconds."""
    async def holds() -> object:
        return predicate()

    await wait_until_async(holds, within)


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


async def test_the_cache_fill_rides_only_where_callers_leave_rows() -> None:
    """Calls filling the cache behind readiness wait behind every caller's call, older or not."""
    stage, upstream = batcher(info=ModelInfo(4, instances=1)), Upstream()
    upstream.release.clear()
    blocker = asyncio.create_task(stage(call(0.0), upstream))
    await until(lambda: len(upstream.calls) == 1)
    fills = [dataclasses.replace(call(float(10 + i)), origin="fill") for i in range(6)]
    filling = [asyncio.create_task(stage(c, upstream)) for c in fills]
    await asyncio.sleep(0)
    callers = [asyncio.create_task(stage(call(float(i)), upstream)) for i in (1, 2)]
    await asyncio.sleep(0)
    upstream.release.set()
    replies = await asyncio.gather(blocker, *callers, *filling)
    second = np.frombuffer(upstream.calls[1].request.inputs[0].data, dtype="<f4").reshape(-1, 2)[:, 0]
    assert list(second) == [1.0, 2.0, 10.0, 11.0]  # both callers first, then fill calls up to the cap of 4
    assert all(own_rows(r, v) for r, v in zip(replies, [0.0, 1.0, 2.0, *range(10, 16)], strict=True))


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


# -- deadlines: each member's own ---------------------------------------------------------------------------


async def test_a_short_deadline_fails_only_its_own_caller() -> None:
    stage, upstream = batcher(), Upstream()
    upstream.release.clear()
    upstream.batches.clear()
    blocker = asyncio.create_task(stage(call(0.0), upstream))
    await asyncio.sleep(0)
    hasty_call, patient_call = call(1.0, deadline=0.05), call(2.0, deadline=10)
    hasty = asyncio.create_task(stage(hasty_call, upstream))
    patient = asyncio.create_task(stage(patient_call, upstream))
    await asyncio.sleep(0)
    upstream.release.set()  # the blocker is answered; the batch of both goes out and is held there
    await until(lambda: len(upstream.calls) == 2)
    batch = upstream.calls[1]
    assert rows_of(batch.request) == 2 and batch.wire is None
    assert batch.deadline == patient_call.deadline  # it lives as long as its most patient member
    with pytest.raises(UpstreamTimeout):
        await hasty  # at its own deadline, while the batch is still out
    assert asyncio.get_running_loop().time() >= hasty_call.deadline
    upstream.batches.set()
    assert own_rows(await patient, 2.0) and own_rows(await blocker, 0.0)
    assert not upstream.cancelled  # the batch went on for the member still waiting


async def test_a_deadline_reached_while_waiting_leaves_the_batch() -> None:
    stage, upstream = batcher(), Upstream()
    upstream.release.clear()
    blocker = asyncio.create_task(stage(call(0.0), upstream))
    await asyncio.sleep(0)
    hasty = asyncio.create_task(stage(call(9.0, deadline=0.02), upstream))
    patient = asyncio.create_task(stage(call(2.0), upstream))
    with pytest.raises(UpstreamTimeout):
        await hasty
    upstream.release.set()
    assert own_rows(await patient, 2.0) and own_rows(await blocker, 0.0)
    sent = np.concatenate([np.frombuffer(c.request.inputs[0].data, dtype="<f4") for c in upstream.calls])
    assert 9.0 not in sent


async def test_a_batch_nobody_waits_for_any_more_is_cancelled() -> None:
    stage, upstream = batcher(), Upstream()
    upstream.release.clear()
    upstream.batches.clear()
    blocker = asyncio.create_task(stage(call(0.0), upstream))
    await asyncio.sleep(0)
    members = [asyncio.create_task(stage(call(float(i), deadline=0.05), upstream)) for i in (1, 2)]
    await asyncio.sleep(0)
    upstream.release.set()
    for task in members:
        with pytest.raises(UpstreamTimeout):
            await task
    await until(lambda: len(upstream.cancelled) == 1)
    assert rows_of(upstream.cancelled[0].request) == 2
    assert own_rows(await blocker, 0.0)
    await until(lambda: stage.models["m"].in_flight == 0)  # its place is free for the next batch
    assert own_rows(await stage(call(3.0), upstream), 3.0)


# -- a joined answer over the limit ---------------------------------------------------------------------------


async def test_a_batch_answer_too_large_is_retried_member_by_member() -> None:
    stage, upstream = batcher(), Upstream(huge=7.0, max_rows=2)  # each member's own answer fits, but 7's
    upstream.release.clear()
    blocker = asyncio.create_task(stage(call(0.0), upstream))
    await asyncio.sleep(0)
    members = [asyncio.create_task(stage(call(float(v)), upstream)) for v in (1, 2, 7, 4, 5)]
    await asyncio.sleep(0)
    upstream.release.set()
    results = await asyncio.gather(blocker, *members, return_exceptions=True)
    for value, outcome in zip((0, 1, 2, 7, 4, 5), results, strict=True):
        if value == 7:
            assert isinstance(outcome, AnswerTooLarge)
        else:
            assert isinstance(outcome, Reply) and own_rows(outcome, float(value))
    assert stage.models["m"].retried_alone == 5
    assert [rows_of(c.request) for c in upstream.calls] == [1, 5, 1, 1, 1, 1, 1]


# -- who may share a batch ---------------------------------------------------------------------------------


async def test_only_callers_with_the_same_forwarded_headers_share_a_batch() -> None:
    stage, upstream = batcher(), Upstream()
    upstream.release.clear()
    blocker = asyncio.create_task(stage(call(0.0), upstream))
    await asyncio.sleep(0)
    red: Context = ((b"x-tenant", b"red"),)
    blue: Context = ((b"x-tenant", b"blue"),)
    contexts = {1.0: red, 2.0: blue, 3.0: red, 4.0: blue, 5.0: ()}
    scopes = {1.0: b"a", 3.0: b"b"}  # the cache's scope is no concern of the model's: red still shares
    tasks = [asyncio.create_task(stage(call(v, context=c, scope=scopes.get(v, b"")), upstream))
             for v, c in contexts.items()]
    private = asyncio.create_task(stage(call(6.0, private=True), upstream))
    await asyncio.sleep(0)
    upstream.release.set()
    replies = await asyncio.gather(blocker, *tasks, private)
    assert all(own_rows(r, float(i)) for i, r in enumerate(replies))
    for c in upstream.calls:
        values = set(np.frombuffer(c.request.inputs[0].data, dtype="<f4").tolist())
        assert len({contexts.get(v, ()) for v in values}) == 1
        assert c.context == contexts.get(values.pop(), ())  # the batch carries its members' headers
    merged = [c for c in upstream.calls if c.wire is None]
    assert sorted(rows_of(c.request) or 0 for c in merged) == [2, 2]  # red together, blue together
    assert sum(1 for c in upstream.calls if 6.0 in np.frombuffer(c.request.inputs[0].data, dtype="<f4")) == 1


def test_which_models_are_batched() -> None:
    def limits(models: tuple[str, ...], info: ModelInfo) -> int | None:
        config = dataclasses.replace(BatchConfig(), models=models)
        model = Batcher(config, Catalog(info), LatencyModel(), Metrics())._new_model("m", info)  # type: ignore[arg-type]
        return None if model is None else model.max_batch

    triton = ModelInfo(8, authoritative=True)
    assert limits(("auto",), triton) == 8
    assert limits(("auto",), dataclasses.replace(triton, variable_outputs=True)) is None
    assert limits(("m",), dataclasses.replace(triton, variable_outputs=True)) == 8  # the operator's statement
    for named in (("auto",), ("m",), ("m=4",), ("*",)):
        assert limits(named, dataclasses.replace(triton, sequence_batching=True, server_batching=True)) is None
    # Triton's max_batch_size 0 is no batch dimension at all; a larger NAME=MAX would only be refused.
    assert limits(("m=4",), ModelInfo(0, authoritative=True)) is None
    assert limits(("m=16",), triton) == 8 and limits(("m=4",), triton) == 4
    # TF Serving's metadata gives no maximum: NAME=MAX as configured.
    assert limits(("m=4",), ModelInfo(0)) == 4 and limits(("m=4",), ModelInfo(32)) == 4


def test_model_facts_from_the_servers_configuration() -> None:
    def config(outputs: object, **more: object) -> dict[str, object]:
        return {"max_batch_size": 8, "output": outputs, **more}

    fixed = triton_info(config([{"name": "Y", "dims": [3]}, {"name": "Z", "dims": ["4", 2]}]))
    assert fixed.authoritative and not fixed.variable_outputs and not fixed.sequence_batching
    assert triton_info(config([{"name": "Y", "dims": [3]}, {"name": "Z", "dims": [-1]}])).variable_outputs
    assert triton_info(config([{"name": "Y", "dims": [6], "reshape": {"shape": [2, -1]}}])).variable_outputs
    assert triton_info(config([{"name": "Y"}, "junk"])).variable_outputs  # unreadable: assumed variable
    sequence = triton_info(config([], sequence_batching={}))
    assert sequence.sequence_batching and sequence.server_batching
    assert not triton_info({"max_batch_size": 0}).variable_outputs and triton_info({}).authoritative is False

    def tf(*dims: str, unknown: bool = False) -> dict[str, object]:
        shape = {"dim": [{"size": d} for d in dims], "unknown_rank": unknown}
        sig = {"inputs": {}, "outputs": {"y": {"dtype": "DT_FLOAT", "tensor_shape": shape}}}
        return {"metadata": {"signature_def": {"signature_def": {"serving_default": sig}}}}

    assert not tf_variable_outputs(tf("-1", "3"))
    assert tf_variable_outputs(tf("-1", "-1")) and tf_variable_outputs(tf(unknown=True))
    assert tf_variable_outputs({"metadata": None})


# -- the latency model learns only what a batch costs the server -----------------------------------------------


async def test_a_call_sent_alone_past_capacity_does_not_teach_latency() -> None:
    stage, upstream = batcher(), Upstream()
    upstream.release.clear()
    first = asyncio.create_task(stage(call(0.0), upstream))
    await asyncio.sleep(0)
    full = asyncio.create_task(stage(call(1.0, rows=8), upstream))  # a whole batch: alone, at once, while busy
    await until(lambda: len(upstream.calls) == 2)
    upstream.release.set()
    assert own_rows(await first, 0.0) and own_rows(await full, 1.0)
    assert set(stage.latency.known("m")) == {1}  # its latency included the server's own queue
    await stage(call(2.0, rows=8), upstream)
    assert set(stage.latency.known("m")) == {1, 8}


# -- models whose output shapes may follow the batch ------------------------------------------------------------


def padding(req: InferenceRequest) -> InferenceResponse:
    """A model padding each row to the longest in its batch: row (n, v) answers [v] * n, then zeros."""
    rows = np.frombuffer(req.inputs[0].data, dtype="<f4").reshape(req.inputs[0].shape)
    longest = int(max(r[0] for r in rows))
    out = np.zeros((len(rows), longest), np.float32)
    for i, r in enumerate(rows):
        out[i, : int(r[0])] = r[1]
    return InferenceResponse(req.protocol, req.model, "1", (fp32("Y", out),))


def padded_call(length: int, value: float, deadline: float = 10) -> Call:
    loop = asyncio.get_running_loop()
    req = request(np.array([[length, value]]))
    return Call(req, f"r{value}", loop.time() + deadline, HttpWire(b"/v2/models/m/infer", (), b"{}"))


def alone_answer(c: Call) -> tuple[int, ...]:
    return padding(c.request).outputs[0].shape


def checked_batcher() -> Batcher:
    return batcher(info=ModelInfo(8, variable_outputs=True, authoritative=True))


async def gather_behind_a_blocker(stage: Batcher, upstream: Upstream, calls: list[Call]) -> list[Reply]:
    upstream.release.clear()
    tasks = [asyncio.create_task(stage(c, upstream)) for c in calls]
    await asyncio.sleep(0)
    upstream.release.set()
    return list(await asyncio.gather(*tasks))


async def test_a_checked_signature_is_batched_only_once_calls_alone_agree() -> None:
    stage, upstream = checked_batcher(), Upstream(answer=padding)
    calls = [padded_call(3, float(v)) for v in range(1, 7)]
    replies = await gather_behind_a_blocker(stage, upstream, calls)
    for c, r in zip(calls, replies, strict=True):
        assert r.response().outputs == padding(c.request).outputs
    # Distinct calls went alone until their shape was trusted; the rest shared a batch.
    assert [rows_of(c.request) for c in upstream.calls] == [1] * CONFIRM + [len(calls) - CONFIRM]
    assert stage.report()["m"]["shapes_confirmed"] == 1 and stage.report()["m"]["variable_outputs"] is True


async def test_a_signature_whose_shapes_differ_alone_is_never_batched() -> None:
    stage, upstream = checked_batcher(), Upstream(answer=padding)
    calls = [padded_call(1 + v % 3, float(v)) for v in range(1, 9)]
    replies = await gather_behind_a_blocker(stage, upstream, calls)
    for c, r in zip(calls, replies, strict=True):
        assert r.response().outputs == padding(c.request).outputs
    assert all(rows_of(c.request) == 1 for c in upstream.calls)
    more = [padded_call(1 + v % 3, float(v)) for v in range(10, 18)]
    for c, r in zip(more, await gather_behind_a_blocker(stage, upstream, more), strict=True):
        assert r.response().outputs == padding(c.request).outputs
    assert all(rows_of(c.request) == 1 for c in upstream.calls)


async def test_a_batch_that_changes_a_callers_shape_is_retried_alone_and_ends_batching() -> None:
    stage, upstream = checked_batcher(), Upstream(answer=padding)
    for v in range(CONFIRM):  # every call alone so far answered in 2 columns
        await stage(padded_call(2, float(v)), upstream)
    calls = [padded_call(2, 10.0), padded_call(1, 11.0), padded_call(5, 12.0), padded_call(2, 13.0)]
    replies = await gather_behind_a_blocker(stage, upstream, calls)
    for c, r in zip(calls, replies, strict=True):
        assert r.response().outputs[0].shape == alone_answer(c)
        assert r.response().outputs == padding(c.request).outputs
    report = stage.report()["m"]
    assert report["stopped"] is True and report["shape_mismatches"] == 1 and report["retried_alone"] == 3
    sent = len(upstream.calls)
    later = [padded_call(4, float(v)) for v in range(20, 26)]
    for c, r in zip(later, await gather_behind_a_blocker(stage, upstream, later), strict=True):
        assert r.response().outputs == padding(c.request).outputs
    assert all(rows_of(c.request) == 1 and c.wire is not None for c in upstream.calls[sent:])  # untouched


# -- the invariant: one settlement each, its own ------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from([0.004, 0.02, 5.0, 5.0]),
                          st.sampled_from([False, False, False, True]), st.sampled_from([None, None, None, 0.0, 0.002]),
                          st.sampled_from([0, 0, 0, 1, 2])), min_size=2, max_size=16),
       st.integers(1, 2), st.lists(st.floats(0, 0.006), min_size=1, max_size=8), st.sampled_from([None, 3]))
def test_every_member_gets_one_settlement_its_own(plan: list[tuple[int, float, bool, float | None, int]],
                                                  instances: int, latencies: list[float],
                                                  max_rows: int | None) -> None:
    """Whatever the deadlines, cancellations, refusals and oversize answers: each caller gets its own rows,
    or the error its call would get alone, or its own timeout at its own deadline; nothing stays queued."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_one_settlement_each(plan, instances, latencies, max_rows))
    finally:
        loop.close()


async def _one_settlement_each(plan: list[tuple[int, float, bool, float | None, int]], instances: int,
                               latencies: list[float], max_rows: int | None) -> None:
    turn = iter(range(10**6))

    class Timed(Upstream):
        async def __call__(self, call: Call) -> Reply:
            await asyncio.sleep(latencies[next(turn) % len(latencies)])
            return await super().__call__(call)

    stage, upstream = batcher(instances=instances, max_delay=0.003), Timed(refuse=13.0, huge=7.0,
                                                                              max_rows=max_rows)
    context: dict[int, Context] = {0: (), 1: ((b"x-a", b"1"),), 2: ((b"x-a", b"2"),)}
    loop = asyncio.get_running_loop()

    async def one(value: int, deadline: float, wide: bool, cancel_after: float | None,
                  ctx: int) -> tuple[Call, float, object]:
        c = call(float(value), width=3 if wide else 2, deadline=deadline, context=context[ctx])
        task = asyncio.create_task(stage(c, upstream))
        if cancel_after is not None:
            await asyncio.sleep(cancel_after)
            task.cancel()
        try:
            return c, loop.time(), await task
        except (asyncio.CancelledError, SidecarError) as e:
            return c, loop.time(), e

    async with asyncio.timeout(10):
        results = await asyncio.gather(*(one(*p) for p in plan))
    for (value, _, _, cancel_after, _), (c, ended, outcome) in zip(plan, results, strict=True):
        if isinstance(outcome, Reply):
            if value == 13:
                assert outcome.status == 400
            else:
                assert outcome.ok and own_rows(outcome, float(value))
                assert outcome.response().outputs[0].shape == c.request.inputs[0].shape
        elif isinstance(outcome, UpstreamTimeout):
            assert ended >= c.deadline - 0.001  # never before its own deadline
        elif isinstance(outcome, AnswerTooLarge):
            assert value == 7
        else:
            assert isinstance(outcome, asyncio.CancelledError) and cancel_after is not None, outcome
    for c in upstream.calls:  # a batch lives as long as its most patient member, and holds one context
        assert len({c.context}) == 1
    await until(lambda: all(m.in_flight == 0 and not m.pending for m in stage.models.values()))

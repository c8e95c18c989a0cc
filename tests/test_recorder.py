"""The recorder stage in-process, over a real SQLite traffic store: what it keeps, and that it never waits."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.calls import Call, GrpcWire, HttpAnswer, HttpWire, Reply
from sidecar.config import RecordConfig, load
from sidecar.control.warmer import own_headers
from sidecar.errors import DecodeError
from sidecar.identity import batch_size, is_stateful, request_key, shape_signature
from sidecar.metrics import Metrics
from sidecar.pipeline.recorder import Recorder
from sidecar.pipeline.stage import Next
from sidecar.protocols import dispatch, kserve_grpc, kserve_http, tfserving_grpc, tfserving_rest
from sidecar.protocols.request import InferenceRequest, Protocol, Tensor, freeze_params
from sidecar.warmup import payload
from sidecar.warmup.planner import Planner, secret_headers
from sidecar.warmup.recording import TrafficRecorder
from sidecar.warmup.replayer import Replayer
from sidecar.warmup.store import Sample, StoreLimits, TrafficStore, open_store
from tests.strategies import tensor_data

JSON = ((b"Content-Type", b"application/json"),)


def call(model: str, value: float, batch: int = 1) -> Call:
    body = orjson.dumps({"inputs": [{"name": "X", "shape": [batch, 2], "datatype": "FP32",
                                     "data": [value, value] * batch}]})
    request = kserve_http.decode_request(model, "", body, None)
    return Call(request, "rid", 0.0, HttpWire(f"/v2/models/{model}/infer".encode(), JSON, body))


def answer(status: int) -> object:
    async def next_(_call: Call) -> Reply:
        return Reply(status, wire=HttpAnswer(status, b"", (), b"{}"), for_call=_call)

    return next_


class Recording:
    """The recorder stage of a data plane, with the control plane's traffic recorder behind it (one process)."""

    def __init__(self, traffic: TrafficRecorder) -> None:
        self.traffic = traffic
        self.stage = Recorder(self)  # type: ignore[arg-type]  # the stage only calls seen()

    def seen(self, call: Call) -> None:
        self.traffic.offer(call)

    async def __call__(self, call: Call, next_: Next) -> Reply:
        return await self.stage(call, next_)

    async def _drain(self) -> None:
        await self.traffic._drain()

    async def close(self) -> None:
        await self.traffic.close()


def recorder(tmp_path: Path, **cfg: object) -> tuple[Recording, TrafficStore, Metrics]:
    store = open_store(str(tmp_path / "t.db"), StoreLimits())
    metrics = Metrics()
    config = dataclasses.replace(RecordConfig(), **cfg)  # type: ignore[arg-type]
    return Recording(TrafficRecorder(config, store, metrics, capacity=64)), store, metrics


async def test_counts_shapes_and_payloads_reach_the_store(tmp_path: Path) -> None:
    rec, store, _ = recorder(tmp_path)
    for c in [call("m", 1.0)] * 3 + [call("m", 2.0, batch=4), call("other", 1.0)]:
        assert (await rec(c, answer(200))).status == 200  # type: ignore[arg-type]
    await rec.close()  # drains the queue and flushes, as on SIGTERM
    top = await store.top("m", 10)
    assert [(round(r.weight, 3), r.batch) for r in top] == [(3.0, 1), (1.0, 4)]  # real clock: a hair of decay
    replay = payload.decode(top[0].payload)
    # What the identity says, in its canonical HTTP form (binary tensors), never the caller's own bytes.
    target, headers, body = dispatch.encode_http(call("m", 1.0).request)
    assert (replay.path.encode(), replay.body) == (target, body)
    assert tuple((k.encode(), v.encode()) for k, v in replay.headers) == headers
    assert replay.to_request() == call("m", 1.0).request
    assert payload.check(replay, top[0].key) == call("m", 1.0).request
    assert {m: round(w, 3) for m, w in await store.models()} == {"m": 4.0, "other": 1.0}
    await store.close()


async def test_repeats_a_worker_folded_count_as_the_calls_they_were(tmp_path: Path) -> None:
    rec, store, metrics = recorder(tmp_path)
    rec.traffic.offer(call("m", 1.0), 5)  # what a data-plane worker sends for 5 identical calls in one batch
    rec.traffic.offer(call("m", 2.0))
    await rec.close()
    assert [round(r.weight, 3) for r in await store.top("m", 10)] == [5.0, 1.0]
    assert metrics.recorded._value.get() == 6
    await store.close()


async def test_only_answered_calls_of_allowed_models_are_recorded(tmp_path: Path) -> None:
    rec, store, _ = recorder(tmp_path, models=("m",))
    await rec(call("m", 1.0), answer(400))  # type: ignore[arg-type]
    await rec(call("skipped", 1.0), answer(200))  # type: ignore[arg-type]
    await rec(call("m", 2.0), answer(200))  # type: ignore[arg-type]
    await rec.close()
    assert [m for m, _ in await store.models()] == ["m"]
    assert len(await store.top("m", 10)) == 1
    await store.close()


async def test_a_full_queue_is_counted_never_waited_for(tmp_path: Path) -> None:
    rec, store, metrics = recorder(tmp_path, queue_size=2)
    async with asyncio.timeout(5):  # nothing consumes the queue: a put that waited would hang here
        for i in range(5):
            await rec(call("m", float(i)), answer(200))  # type: ignore[arg-type]
    assert metrics.record_dropped._value.get() == 3
    await rec.close()
    assert len(await store.top("m", 10)) == 2
    await store.close()


async def test_the_queue_is_bounded_in_bytes_too(tmp_path: Path) -> None:
    one = len(call("m", 0.0).wire.body)  # type: ignore[union-attr]
    rec, store, metrics = recorder(tmp_path, queue_bytes=2 * one + 1)
    for i in range(5):
        await rec(call("m", float(i)), answer(200))  # type: ignore[arg-type]
    assert metrics.record_dropped._value.get() == 3
    await rec.close()
    assert len(await store.top("m", 10)) == 2
    await store.close()


async def test_a_call_that_cannot_be_recorded_is_dropped_and_counted(tmp_path: Path) -> None:
    rec, store, metrics = recorder(tmp_path)
    broken = call("m", 1.0)
    broken.request = None  # type: ignore[assignment]  # whatever goes wrong with one call
    await rec(broken, answer(200))  # type: ignore[arg-type]
    await rec(call("m", 2.0), answer(200))  # type: ignore[arg-type]
    await rec.close()
    assert metrics.record_errors._value.get() == 1
    assert len(await store.top("m", 10)) == 1
    await store.close()


async def test_bodies_over_the_limit_are_counted_but_not_kept(tmp_path: Path) -> None:
    rec, store, _ = recorder(tmp_path, max_payload_bytes=16)
    await rec(call("m", 1.0), answer(200))  # type: ignore[arg-type]
    await rec.close()
    assert await store.top("m", 10) == []  # nothing to replay
    assert [(shape, batch, round(w, 3)) for shape, batch, w in await store.shapes("m")] == [("X:FP32[1,2]", 1, 1.0)]
    await store.close()


async def test_memory_between_flushes_is_bounded_by_the_sketch(tmp_path: Path) -> None:
    rec, store, _ = recorder(tmp_path)
    for i in range(500):  # 500 distinct calls, capacity 64, no flush in between
        await rec(call("m", float(i)), answer(200))  # type: ignore[arg-type]
        await rec._drain()
    memory = rec.traffic._models["m"]
    assert len(memory.meta) <= 64 and set(memory.meta) == {k for k, _, _ in memory.sketch.items()}
    await rec.close()
    await store.close()


# -- what is kept, over random traffic ---------------------------------------------------------------------

SECRET = b"zqSECRETzq"  # in every credential a caller sends: it must never reach the store
OWN_KEY = "zqOWNKEYzq"  # the sidecar's own restricted_api value: sent with replayed calls, never stored
# record.coverage 1: every call that may be kept is planned (at 0.9 one call with 10 of 11 calls' share would leave
# the other out: coverage has its own test in test_replay_units.py).
_LOADED = load({}, {}, {})
CONFIG = dataclasses.replace(_LOADED, restricted_api=f"inference:x-api-key={OWN_KEY}",
                             record=dataclasses.replace(_LOADED.record, coverage=1.0))
INFER = "/inference.GRPCInferenceService/ModelInfer"
ORIGINS = ("json", "binary", "grpc", "tf_rest", "tf_grpc")
# Headers that reach the model, as a forward pattern would pick them (the first two hold credentials).
FORWARDED = ((b"Authorization", b"Bearer " + SECRET), (b"x-api-key", SECRET), (b"X-User", b"alice"),
             (b"X-User", b"bob"), (b"x-hint", b"fast"))
LEARNED_KEY = (b"\0x-api-key", SECRET)  # a restriction key learned from the server's refusals
NOT_FOR_THE_MODEL = frozenset({b"authorization", b"cookie", b"x-api-key"})


@st.composite
def kserve_requests(draw: st.DrawFn) -> InferenceRequest:
    """A small pool's worth of calls: repeats are likely, so one key is seen with different flags."""
    rows = draw(st.integers(1, 2))
    datatype = draw(st.sampled_from(["FP32", "INT32", "BYTES"]))
    tensor = Tensor("INPUT0", datatype, (rows, 2), draw(tensor_data(datatype, (rows, 2))))
    options: dict[str, object] = {}
    if draw(st.booleans()):
        options["sequence_id"] = draw(st.integers(1, 3))
        if draw(st.booleans()):
            options["sequence_start"] = True
    if draw(st.booleans()):
        options["priority"] = draw(st.integers(1, 3))
    choices: list[dict[str, object]] = [{}, {"mood": "calm"}, {"n": 3}]
    params = draw(st.sampled_from(choices))
    return InferenceRequest(Protocol.KSERVE_HTTP, draw(st.sampled_from(["m", "n"])), "", "infer", (tensor,), (),
                            freeze_params(params), freeze_params(options))


@dataclasses.dataclass
class Sent:
    call: Call
    origin: str
    may_keep: bool  # the test's own reading of the rules: whether its payload may be stored


@st.composite
def sent_calls(draw: st.DrawFn, pool: list[InferenceRequest]) -> Sent:
    req = draw(st.sampled_from(pool))
    origin = draw(st.sampled_from(ORIGINS))
    private, scope = draw(st.booleans()), draw(st.sampled_from([b"", b"tenant-a"]))
    context = list(draw(st.lists(st.sampled_from(FORWARDED), max_size=2, unique=True)))
    if draw(st.booleans()):
        context.append(LEARNED_KEY)
    grpc = origin in ("grpc", "tf_grpc")
    if grpc:  # gRPC metadata keys are lower case
        context = [(k.lower(), v) for k, v in context]
    headers = [(b"Content-Type", b"application/json"), (b"X-Tenant", scope)]
    if private:
        headers += [(b"Authorization", b"Bearer " + SECRET), (b"Cookie", b"session=" + SECRET)]
    headers += [(k.lstrip(b"\0"), v) for k, v in context]
    modelled = True
    wire: HttpWire | GrpcWire
    try:
        if origin in ("json", "binary"):
            body, length = kserve_http.encode_request(req, origin == "binary")
            request = kserve_http.decode_request(req.model, "", body, length)
            wire = HttpWire(f"/v2/models/{req.model}/infer".encode(), tuple(headers), body)
        elif origin == "grpc":
            message = kserve_grpc.encode_request(dataclasses.replace(req, protocol=Protocol.KSERVE_GRPC))
            request = kserve_grpc.decode_request(message)
            wire = GrpcWire(INFER, message, tuple((k.decode().lower(), v) for k, v in headers))
        else:
            rows = [[float(r), 2.0 * r] for r in range(req.inputs[0].shape[0])]
            body = orjson.dumps({"instances": rows})
            request = tfserving_rest.decode_request(req.model, "", "", "predict", body)
            if origin == "tf_rest":
                wire = HttpWire(f"/v1/models/{req.model}:predict".encode(), tuple(headers), body)
            else:
                message = tfserving_grpc.encode_request(dataclasses.replace(request, protocol=Protocol.TFSERVING_GRPC))
                request = tfserving_grpc.decode_request(message)
                wire = GrpcWire("/tensorflow.serving.PredictionService/Predict", message, ())
    except (DecodeError, ValueError):
        # What the front does with a call the codecs cannot model: forwarded untouched, never recorded.
        request, modelled = InferenceRequest(Protocol.KSERVE_HTTP, req.model), False
        wire = HttpWire(f"/v2/models/{req.model}/infer".encode(), tuple(headers), b"{}")
    call = Call(request, "rid", 0.0, wire, modelled, origin="grpc" if grpc else "http", private=private,
                scope=scope, context=tuple(context))
    for_model = [(k, v) for k, v in context if not k.startswith(b"\0")]
    may_keep = (modelled and not is_stateful(request) and not (private and not scope)
                and not any(k.lower() in NOT_FOR_THE_MODEL for k, _ in for_model)
                and not (grpc and context) and origin != "tf_grpc")
    return Sent(call, origin, may_keep)


@st.composite
def traffic(draw: st.DrawFn) -> list[Sent]:
    pool = draw(st.lists(kserve_requests(), min_size=1, max_size=4))
    return draw(st.lists(sent_calls(pool), min_size=1, max_size=12))


def identity(request: InferenceRequest, context: tuple[tuple[bytes, bytes], ...]) -> tuple[str, object]:
    return request_key(request), tuple((k, v) for k, v in context if not k.startswith(b"\0"))


def older_payloads(sent: list[Sent]) -> list[Sample]:
    """Payloads as older versions wrote them (the caller's own JSON bytes), of a model this version never
    records: each sequence call among the traffic, and one payload stored under another call's key."""
    samples = []
    for s in sent:
        req = dataclasses.replace(s.call.request, model="old")
        if not s.call.modelled or req.protocol is not Protocol.KSERVE_HTTP:
            continue
        body, length = kserve_http.encode_request(req, False)
        if length is not None:
            continue
        old = payload.encode(payload.RecordedCall.of("/v2/models/old/infer", (("Content-Type", "application/json"),),
                                                     body))
        samples.append(Sample("old", request_key(req), shape_signature(req), batch_size(req), 1, old))
        samples.append(Sample("old", "0" * 32, shape_signature(req), batch_size(req), 1, old))  # not its key
    return samples


async def record_and_replay(sent: list[Sent], directory: str) -> None:
    store = open_store(f"{directory}/t.db", StoreLimits())
    metrics = Metrics()
    rec = Recording(TrafficRecorder(CONFIG.record, store, metrics, capacity=64, secret_headers=secret_headers(CONFIG)))
    for s in sent:
        await rec(s.call, answer(200))  # type: ignore[arg-type]
    await rec.close()

    recordable = [s for s in sent if s.call.modelled and not is_stateful(s.call.request)]
    weights = dict(await store.models())
    assert round(sum(weights.values())) == len(recordable)  # counted, stateful calls not at all
    may_keep = {identity(s.call.request, s.call.context) for s in sent if s.may_keep}
    stored = set()
    for model in ("m", "n"):
        for item in await store.top(model, 1000):
            assert SECRET not in item.payload and OWN_KEY.encode() not in item.payload
            recorded = payload.decode(item.payload)
            assert not any(k.startswith(b"\0") or k.lower() in NOT_FOR_THE_MODEL for k, _ in recorded.context_bytes())
            request = payload.check(recorded, item.key)  # decodes, not stateful, exactly the call its key names
            assert not is_stateful(request)
            if not recorded.context:
                assert request_key(request) == item.key
            stored.add(identity(request, recorded.context_bytes()))
    assert stored == may_keep

    older = older_payloads(sent)
    await store.add(older)
    plan = await Planner(CONFIG, store, no_batch_dimension).build("triton")
    planned = [c for m in plan.models for c in m.calls]
    assert not any(is_stateful(c.request) for c in planned)
    assert {identity(c.request, c.context) for c in planned if c.model != "old"} == may_keep
    # Older payloads: the first stored under each key is kept; sequence calls and the one under another call's
    # key are left out, counted by reason.
    first: dict[str, InferenceRequest] = {}
    for sample in older:
        first.setdefault(sample.key, payload.decode(sample.payload).to_request())
    reasons = [payload.STATEFUL if is_stateful(r) else payload.MISMATCH if k == "0" * 32 else "" for k, r in
               first.items()]
    assert plan.skipped == {r: reasons.count(r) for r in set(reasons) if r}
    assert len([c for c in planned if c.model == "old"]) == reasons.count("")

    replayed: list[Call] = []

    async def upstream(call: Call) -> Reply:
        replayed.append(call)
        return Reply(200, wire=HttpAnswer(200, b"", (), b"{}"), for_call=call)

    replayer = Replayer(CONFIG.warmup, upstream, metrics, 5.0, own_headers=own_headers(CONFIG.restricted_api))
    await replayer.run(plan)
    assert {id(c.request) for c in replayed} == {id(c.request) for c in planned}
    for call in replayed:
        assert not is_stateful(call.request)
        assert isinstance(call.wire, HttpWire) and SECRET not in call.wire.body
        assert not any(SECRET in v for _, v in call.wire.headers)
        assert [v for k, v in call.wire.headers if k.lower() == b"x-api-key"] == [OWN_KEY.encode()]
    await store.close()


async def no_batch_dimension(model: str, protocol: object) -> int:
    return 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traffic())
def test_the_store_and_the_plan_hold_only_calls_that_may_be_replayed(sent: list[Sent]) -> None:
    """Over random traffic (stateful or not, credentials with or without a scope, forwarded headers and learned
    restriction keys, HTTP JSON and binary, gRPC and TF Serving callers): the store holds no payload of a
    stateful call, none with a credential or restriction key, every payload is exactly the call its key names,
    and warm-up plans and sends no stateful call, with the sidecar's own restriction header."""
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(record_and_replay(sent, directory))

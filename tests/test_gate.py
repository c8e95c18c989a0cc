"""The state gate in-process: hold until warm, bounded; reject with Retry-After; what a warm-up gates."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from sidecar.calls import Call, HttpAnswer, HttpWire, Reply
from sidecar.config import GateConfig, load
from sidecar.control.warmer import Warmer
from sidecar.errors import Overloaded
from sidecar.identity import request_key
from sidecar.loading.book import ModelBook, ModelState
from sidecar.metrics import Metrics
from sidecar.pipeline.gate import Gate
from sidecar.planes import Snapshot, View
from sidecar.protocols import kserve_http
from sidecar.protocols.request import InferenceRequest, Protocol
from sidecar.state import State, StateMachine
from sidecar.upstream.http import HttpUpstream
from sidecar.warmup import payload
from sidecar.warmup.store import Sample, StoreLimits, TrafficStore, open_store

CALL = Call(InferenceRequest(Protocol.KSERVE_HTTP, "m"), "rid", 0.0, HttpWire(b"/v2/models/m/infer", (), b"{}"))


async def upstream(call: Call) -> Reply:
    return Reply(200, wire=HttpAnswer(200, b"OK", (), call.request_id.encode()), for_call=call)


def warming() -> StateMachine:
    machine = StateMachine()
    machine.to(State.WARMING, "test")
    return machine


class Plane:
    """The control plane's part the gate sees, and nothing more: the pod's state and the model book, published
    as a snapshot into a view at each change; the gate's observations go to the book."""

    def __init__(self, machine: StateMachine, book: ModelBook | None = None) -> None:
        self.machine, self.book, self.view = machine, book or ModelBook(lambda: False), View()
        machine.subscribe(lambda _state: self.publish())
        self.book.subscribe(self.publish)
        self.publish()

    def publish(self) -> None:
        models = {n: ready for n in self.book.models if (ready := self.book.ready(n)) is not None}
        self.view.apply(Snapshot(state=self.machine.state, models=models))

    def touched(self, model: str) -> None:
        self.book.touch(model)

    def wanted(self, model: str) -> None:
        self.book.want(model)


def gate_for(cfg: GateConfig, machine: StateMachine, book: ModelBook | None = None) -> Gate:
    plane = Plane(machine, book)
    return Gate(cfg, plane.view, plane, Metrics())  # type: ignore[arg-type]  # only touched/wanted are called


async def test_hold_answers_once_warm_and_bounds_how_many_wait() -> None:
    machine = warming()
    gate = gate_for(dataclasses.replace(GateConfig(), policy="hold", max_held=2), machine)
    held = [asyncio.create_task(gate(CALL, upstream)) for _ in range(2)]
    await asyncio.sleep(0)  # let both reach the gate (no timing involved: they wait on the state)
    assert gate.held == 2 and not any(t.done() for t in held)
    with pytest.raises(Overloaded) as refused:
        await gate(CALL, upstream)
    assert refused.value.retry_after == 5.0
    held[0].cancel()  # a caller that gives up frees its place at once
    await asyncio.gather(held[0], return_exceptions=True)
    assert gate.held == 1
    machine.to(State.WARM, "test")
    assert (await held[1]).status == 200 and gate.held == 0


async def test_hold_times_out_into_forwarding() -> None:
    gate = gate_for(dataclasses.replace(GateConfig(), policy="hold", hold_timeout=0.05), warming())
    assert (await gate(CALL, upstream)).status == 200


async def test_reject_while_warming_forward_when_warm() -> None:
    machine = warming()
    gate = gate_for(dataclasses.replace(GateConfig(), policy="reject"), machine)
    with pytest.raises(Overloaded, match="warming, not warm yet"):
        await gate(CALL, upstream)
    machine.to(State.WARM, "test")
    assert (await gate(CALL, upstream)).status == 200


# -- warm-up behind the gate ------------------------------------------------------------------------------


def _warmer_for(tmp_path: Path, machine: StateMachine, book: ModelBook, gate: Gate,
                outcomes: list[str]) -> tuple[Warmer, TrafficStore]:
    """A warmer over a store holding one recorded call of model m; each call it replays first sends a
    caller's call of m through ``gate`` and notes what the caller got."""
    cfg = load({}, {}, {})
    store = open_store(str(tmp_path / "t.db"), StoreLimits())
    caller = Call(kserve_http.decode_request("m", "", BODY, None), "caller", 0.0)

    async def replay(call: Call) -> Reply:
        try:
            outcomes.append(str((await gate(caller, upstream)).status))
        except Overloaded:
            outcomes.append("503")
        return Reply(200, wire=HttpAnswer(200, b"OK", (), b"{}"), for_call=call)

    async def no_batch_dimension(model: str, protocol: object) -> int:
        return 0

    warmer = Warmer(cfg, store, HttpUpstream(cfg.upstream, Metrics(), 1 << 20), machine, Metrics(), send=replay,
                    book=book)
    warmer.planner.max_batch_of = no_batch_dimension
    return warmer, store


BODY = b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,2],"data":[1,2]}]}'


async def _record(store: TrafficStore) -> None:
    request = kserve_http.decode_request("m", "", BODY, None)
    await store.add([Sample("m", request_key(request), "INPUT0:FP32[1,2]", 1, 3,
                            payload.encode(payload.RecordedCall.canonical(request)))])


async def test_a_rewarm_of_a_warm_pod_leaves_it_and_its_models_ready(tmp_path: Path) -> None:
    """POST /warmup on a warm pod replays behind readiness: under reject, no caller sees a 503 meanwhile."""
    machine = warming()
    machine.to(State.WARM, "test")
    book = ModelBook(lambda: machine.state in (State.WARMING, State.WARM))
    book.set("m", ModelState.WARM)
    gate = gate_for(dataclasses.replace(GateConfig(), policy="reject"), machine, book)
    outcomes: list[str] = []
    warmer, store = _warmer_for(tmp_path, machine, book, gate, outcomes)
    await _record(store)
    assert await warmer("tfserving")
    await store.close()
    assert outcomes and set(outcomes) == {"200"}  # the replay ran, and m stayed open all along
    assert machine.state is State.WARM and machine.progress == 1.0
    assert book.models["m"].state is ModelState.WARM
    assert warmer.report is not None and warmer.report.complete


async def test_a_warm_up_after_a_restart_still_gates_each_model_until_warm(tmp_path: Path) -> None:
    machine = warming()  # the model server came back: the pod warms again from WARMING
    book = ModelBook(lambda: machine.state in (State.WARMING, State.WARM))
    gate = gate_for(dataclasses.replace(GateConfig(), policy="reject"), machine, book)
    outcomes: list[str] = []
    warmer, store = _warmer_for(tmp_path, machine, book, gate, outcomes)
    await _record(store)
    assert await warmer("tfserving")
    await store.close()
    assert outcomes and set(outcomes) == {"503"}
    assert book.models["m"].state is ModelState.WARM


async def test_a_rewarm_finishes_a_model_a_finished_warm_up_left_not_warm(tmp_path: Path) -> None:
    """A model left warming (its warm-up did not converge) is not ready before the re-warm either; the re-warm
    warms it, and it turns ready."""
    machine = warming()
    machine.to(State.WARM, "test")
    book = ModelBook(lambda: machine.state in (State.WARMING, State.WARM))
    book.set("m", ModelState.WARMING, "not converged")
    gate = gate_for(dataclasses.replace(GateConfig(), policy="reject"), machine, book)
    outcomes: list[str] = []
    warmer, store = _warmer_for(tmp_path, machine, book, gate, outcomes)
    await _record(store)
    assert await warmer("tfserving")
    await store.close()
    assert outcomes and set(outcomes) == {"503"}
    assert book.models["m"].state is ModelState.WARM and book.ready("m")

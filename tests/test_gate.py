"""The state gate in-process: hold until warm, bounded; reject with Retry-After."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from sidecar.config import GateConfig
from sidecar.errors import Overloaded
from sidecar.metrics import Metrics
from sidecar.pipeline.gate import Gate
from sidecar.pipeline.stage import Call, HttpAnswer, HttpWire, Reply
from sidecar.protocols.request import InferenceRequest, Protocol
from sidecar.state import State, StateMachine

CALL = Call(InferenceRequest(Protocol.KSERVE_HTTP, "m"), "rid", 0.0, HttpWire(b"/v2/models/m/infer", (), b"{}"))


async def upstream(call: Call) -> Reply:
    return Reply(200, wire=HttpAnswer(200, b"OK", (), call.request_id.encode()), for_call=call)


def warming() -> StateMachine:
    machine = StateMachine()
    machine.to(State.WARMING, "test")
    return machine


async def test_hold_answers_once_warm_and_bounds_how_many_wait() -> None:
    machine = warming()
    gate = Gate(dataclasses.replace(GateConfig(), policy="hold", max_held=2), machine, Metrics())
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
    gate = Gate(dataclasses.replace(GateConfig(), policy="hold", hold_timeout=0.05), warming(), Metrics())
    assert (await gate(CALL, upstream)).status == 200


async def test_reject_while_warming_forward_when_warm() -> None:
    machine = warming()
    gate = Gate(dataclasses.replace(GateConfig(), policy="reject"), machine, Metrics())
    with pytest.raises(Overloaded, match="warming, not warm yet"):
        await gate(CALL, upstream)
    machine.to(State.WARM, "test")
    assert (await gate(CALL, upstream)).status == 200

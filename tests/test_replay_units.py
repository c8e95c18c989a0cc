"""Warm-up's plan and replay in-process: coverage picks the calls, readiness waits only for measuring, and the
rest is handed back to fill the cache."""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
from hypothesis import given
from hypothesis import strategies as st

from sidecar.calls import Call, HttpAnswer, Reply
from sidecar.config import WarmupConfig
from sidecar.metrics import Metrics
from sidecar.protocols import kserve_http
from sidecar.warmup.planner import ModelPlan, Plan, PlannedCall, covering
from sidecar.warmup.replayer import _SAMPLE, Replayer


def planned(i: int, weight: float = 1.0, shape: str = "X:FP32[1,2]") -> PlannedCall:
    body = orjson.dumps({"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [i, i]}]})
    request = kserve_http.decode_request("m", "", body, None)
    return PlannedCall("m", "recorded", "/v2/models/m/infer", (("Content-Type", "application/json"),), body,
                       request, shape, 1, weight)


@given(st.lists(st.floats(0.001, 1000), min_size=1, max_size=40), st.floats(0.01, 1.0), st.floats(0, 500))
def test_coverage_takes_the_shortest_prefix_that_carries_the_share(weights: list[float], coverage: float,
                                                                   unseen: float) -> None:
    calls = [planned(i, w) for i, w in enumerate(sorted(weights, reverse=True))]
    total = sum(weights) + unseen  # calls without a payload count in the model's traffic too
    chosen = covering(calls, total, coverage)
    assert chosen == calls[:len(chosen)]
    carried = sum(c.weight for c in chosen)
    assert carried >= coverage * total or chosen == calls  # enough, or all there is
    if len(chosen) > 1:
        assert carried - chosen[-1].weight < coverage * total  # and not one more than needed


async def test_readiness_measures_samples_and_hands_the_rest_back() -> None:
    sent: list[Call] = []

    async def send(call: Call) -> Reply:
        sent.append(call)
        await asyncio.sleep(0)
        return Reply(200, wire=HttpAnswer(200, b"OK", (), b"{}"), for_call=call)

    calls = [planned(i, 100 - i) for i in range(100)] + [planned(1000 + i, shape="X:FP32[2,2]") for i in range(3)]
    # Any two passes agree (the fake's microsecond latencies are scheduling noise): this is about what is sent.
    cfg = dataclasses.replace(WarmupConfig(), min_passes=2, max_passes=4, convergence_ratio=1e9)
    report = await Replayer(cfg, send, Metrics(), timeout=5).run(Plan([ModelPlan("m", 1.0, 0, calls)]))
    assert report.complete and report.passes == 2
    assert len(sent) == 2 * (_SAMPLE + 3)  # each pass: a sample of the big group, every call of the small one
    assert {c.request_id for c in sent} == {"warmup-recorded"} and all(c.no_cache for c in sent)
    assert [c.request for c in report.unsent] == [c.request for c in calls[_SAMPLE:100]]  # the most frequent measured

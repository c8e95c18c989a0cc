"""The upstream monitor's decisions, in-process: which health answers move the state machine where.

The probes themselves run against real servers in test_warmup.py; here the monitor is handed the
outcome of a probe, so each rule is checked on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sidecar.config import UpstreamConfig
from sidecar.control.monitor import Health, UpstreamMonitor, available_versions, ready_versions
from sidecar.errors import UpstreamUnavailable
from sidecar.metrics import Metrics
from sidecar.state import State, StateMachine
from sidecar.upstream.http import HttpUpstream
from tests.servers import wait_until_async


def monitor() -> tuple[UpstreamMonitor, list[str], list[str]]:
    """A monitor whose warm-ups succeed at once; ``warmed`` lists them, ``changes`` the transitions."""
    warmed: list[str] = []
    changes: list[str] = []

    async def warmer(protocol: str, on_ready: object = None) -> bool:
        warmed.append(protocol)
        return True

    cfg = UpstreamConfig()
    metrics = Metrics()
    machine = StateMachine(on_change=lambda state: changes.append(f"{state.value}: {machine.reason}"))
    return UpstreamMonitor(HttpUpstream(cfg, metrics, 1 << 20), cfg, machine, metrics, warmer), warmed, changes


async def settle(m: UpstreamMonitor) -> None:
    if m._warming is not None:
        await m._warming


async def test_a_newly_loaded_version_makes_a_warm_pod_rewarm() -> None:
    m, warmed, changes = monitor()
    m._observe_loaded(frozenset({("a", "1")}))
    m.apply(Health.READY)
    await settle(m)
    assert m.machine.state is State.WARM and len(warmed) == 1
    m._observe_loaded(frozenset({("a", "1")}))  # nothing new: stays warm
    m.apply(Health.READY)
    assert m.machine.state is State.WARM
    m._observe_loaded(frozenset({("a", "2")}))  # version 2 rolled in, version 1 out
    changes.clear()
    m.apply(Health.READY)
    assert changes == ["cold: model server loaded a version 2", "warming: model server ready"]
    await settle(m)
    assert m.machine.state is State.WARM and len(warmed) == 2
    m._observe_loaded(frozenset())  # an unload makes nothing cold
    m.apply(Health.READY)
    assert m.machine.state is State.WARM and len(warmed) == 2


async def test_after_a_restart_what_loads_is_not_counted_twice() -> None:
    m, warmed, _ = monitor()
    m._observe_loaded(frozenset({("a", "1")}))
    m.apply(Health.READY)
    await settle(m)
    m.apply(Health.DOWN)
    assert m.machine.state is State.COLD
    m._observe_loaded(frozenset({("a", "1"), ("b", "1")}))
    m.apply(Health.READY)
    await settle(m)
    assert m.machine.state is State.WARM and len(warmed) == 2  # one re-warm for the restart, not two


def test_version_lists_from_the_servers_own_documents() -> None:
    index = [{"name": "a", "version": "1", "state": "READY"}, {"name": "b", "version": "1", "state": "UNAVAILABLE"},
             {"name": "c", "state": "READY"}, "junk"]
    assert ready_versions(index) == {("a", "1"), ("c", "")}
    assert ready_versions({"error": "x"}) == frozenset()
    status = {"model_version_status": [{"version": "2", "state": "AVAILABLE"}, {"version": "1", "state": "END"}]}
    assert available_versions(status) == ["2"]
    assert available_versions({"name": "m", "ready": True}) == []


class CountingUpstream(HttpUpstream):
    """Probes answered from ``self.up`` without a network: counts them."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        super().__init__(cfg, Metrics(), 1 << 20)
        self.up = False
        self.asked = 0

    async def probe(self, path: str, timeout: float, method: str = "GET") -> tuple[int, Any]:
        self.asked += 1
        if not self.up:
            raise UpstreamUnavailable("model server unavailable: connection refused")
        return 200, []


def counting_monitor(interval: float, unready: float | None = None) -> tuple[UpstreamMonitor, CountingUpstream]:
    cfg = UpstreamConfig(health_interval=interval, unready_interval=interval if unready is None else unready,
                         protocol="triton")
    client = CountingUpstream(cfg)
    return UpstreamMonitor(client, cfg, StateMachine(), client.metrics), client


async def poke_for(m: UpstreamMonitor, seconds: float) -> None:
    """Every failing call pokes: a thousand callers a second."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        m.poke()
        await asyncio.sleep(0.001)


async def test_pokes_never_make_the_monitor_probe_a_dead_server_back_to_back() -> None:
    m, client = counting_monitor(0.2)
    task = asyncio.create_task(m.run())
    try:
        await poke_for(m, 1.0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert m.last is Health.DOWN
    assert client.asked <= 1.0 / 0.2 + 2  # one check per interval, pokes or not


async def test_a_server_coming_up_is_checked_every_unready_interval_and_a_ready_one_every_health_interval() -> None:
    m, client = counting_monitor(30.0, unready=0.05)
    task = asyncio.create_task(m.run())
    try:
        await poke_for(m, 0.5)  # down: pokes change nothing, the unready interval paces the checks
        assert 0.5 / 0.05 - 3 <= client.asked <= 0.5 / 0.05 + 2
        client.up = True
        await wait_until_async(lambda: _true(m.last is Health.READY), 1, "found ready within the unready interval")
        before = client.asked
        await asyncio.sleep(0.3)
        assert client.asked == before  # ready: the next check is health_interval (30 s) away
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_poke_checks_a_ready_server_at_once_and_a_burst_checks_it_once() -> None:
    m, client = counting_monitor(30.0)
    client.up = True
    task = asyncio.create_task(m.run())
    try:
        await wait_until_async(lambda: _true(m.last is Health.READY), 5, "ready")
        before = client.asked
        client.up = False  # the server died: the data path sees it first
        await poke_for(m, 0.5)
        await wait_until_async(lambda: _true(m.last is Health.DOWN), 5, "down after a poke")
        assert client.asked - before <= 2  # ready: probe at once; then down, not once per poke
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _true(value: bool) -> bool:
    return value

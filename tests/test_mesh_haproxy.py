"""HAProxy with agent-check in front of two real replicas (each its own Triton and sidecar), run
from the shipped k8s/haproxy/haproxy.cfg.

Mid-traffic, replica 1's Triton is killed (-9) and started again: its sidecar goes cold, then warms
up for a few seconds (a seeded `slow` model call makes each pass take time), then is warm. The test
reads HAProxy's own view (``show stat``: each server's status, weight, dispatches and 2xx answers)
next to the sidecar's state and progress, and shows that HAProxy takes the replica out while cold,
brings it back with a weight that follows its warm-up progress, and that no client sees an error.

Both gate policies are run: ``reject`` (a warming replica bounces what HAProxy sends it, HAProxy
retries it on the other: no client waits on a cold model) and ``forward`` (a warming replica
serves its growing share).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.balancers import HAPROXY_CFG, HAProxyLB, Replica, Traffic, replicas, warming_args
from tests.servers import wait_until


def agent_percent(progress: float) -> int:
    return max(1, min(100, round(progress * 100)))


@dataclass(frozen=True)
class Sample:
    """One look at HAProxy's stats and replica 1's sidecar, stats first (see `served_while_warming`)."""

    status: str  # HAProxy's status of server r1
    weight: int
    weight2: int
    dispatched: int  # lbtot: times HAProxy chose the server
    dispatched2: int
    ok: int  # hrsp_2xx: 2xx answers that server gave
    ok2: int
    agent: str  # last agent answer, as HAProxy shows it
    state: str  # replica 1's sidecar
    progress: float

    @classmethod
    def take(cls, lb: HAProxyLB, r1: Replica) -> Sample:
        stats = lb.stats()
        one, two = stats["r1"], stats["r2"]
        state, progress = r1.state()
        return cls(one["status"], int(one["weight"]), int(two["weight"]), int(one["lbtot"]), int(two["lbtot"]),
                   int(one["hrsp_2xx"]), int(two["hrsp_2xx"]), one["last_agt"], state, progress)


def phases(samples: list[Sample]) -> list[tuple[int, int, int, int]]:
    """(r1 weight, r2 weight, r1 dispatches, r2 dispatches) over each run of samples where r1 was UP
    with one weight: only dispatches between two samples of the same run count."""
    out: dict[tuple[int, int], list[int]] = {}
    for a, b in itertools.pairwise(samples):
        if a.status == b.status == "UP" and (a.weight, a.weight2) == (b.weight, b.weight2):
            counts = out.setdefault((a.weight, a.weight2), [0, 0])
            counts[0] += b.dispatched - a.dispatched
            counts[1] += b.dispatched2 - a.dispatched2
    return [(w1, w2, d1, d2) for (w1, w2), (d1, d2) in out.items()]


@pytest.mark.parametrize("policy", ["reject", "forward"])
def test_a_restarted_replica_rejoins_with_its_warm_up_progress(policy: str, tmp_path: Path) -> None:
    samples: list[Sample] = []

    def look_until(lb: HAProxyLB, r1: Replica, done: Callable[[Sample], bool], timeout: float, what: str) -> Sample:
        """Looks (keeping every sample) until ``done``; the sample that satisfied it."""
        def look() -> bool:
            samples.append(Sample.take(lb, r1))
            return done(samples[-1])

        wait_until(look, timeout, what)
        return samples[-1]

    with replicas(tmp_path, 2, warming_args(policy, tmp_path)) as (r1, r2), HAProxyLB(tmp_path / "lb", [r1, r2]) as lb:
        wait_until(lambda: all("up" in s["last_agt"] and s["weight"] == "100" for s in lb.stats().values()), 10,
                   "both replicas UP, said so by their agents")
        with Traffic(lb.port) as traffic:
            wait_until(lambda: r1.served() > 50 and r2.served() > 50, 30, "traffic on both replicas")
            r1.triton.kill()
            down = look_until(lb, r1, lambda s: s.status.startswith("DOWN"), 10, "HAProxy takes r1 out")
            r1.triton.start()
            rejoined = look_until(lb, r1, lambda s: s.state == "warm" and s.weight == 100, 60, "r1 warm, full weight")
            look_until(lb, r1, lambda s: s.dispatched - rejoined.dispatched >= 300, 30, "traffic at full weight")
        warming_answers = sum(1 for _, _, state in traffic.answers if state == "warming")
        total, errors = traffic.count(), traffic.errors()

    # No client saw an error: every call reaching a replica that could not take it was retried.
    assert total > 1000 and errors == [], errors[:5]
    assert down.agent.startswith("via agent : down (cold: "), down.agent

    # Out while down: HAProxy sent r1 nothing between two looks that both saw it DOWN.
    for a, b in itertools.pairwise(samples):
        if a.status.startswith("DOWN") and b.status.startswith("DOWN"):
            assert b.dispatched == a.dispatched

    # Back with a weight from the agent that ramps with the warm-up progress, not a switch.
    ramp = sorted({s.weight for s in samples if s.status == "UP" and s.weight < 100})
    said = {agent_percent(s.progress) for s in samples if s.state == "warming"}
    assert len(ramp) >= 2 and set(ramp) <= said, (ramp, said)

    # HAProxy's share of dispatches to r1 is its weight's share, in every phase since it came back
    # (before the kill was noticed, r2's count also holds the retries of what r1 refused).
    shares = []
    for w1, w2, d1, d2 in phases(samples[samples.index(down):]):
        if d1 + d2 >= 100:
            share, expected = d1 / (d1 + d2), w1 / (w1 + w2)
            shares.append((w1, w2, d1 + d2, round(share, 3), round(expected, 3)))
            assert abs(share - expected) <= 0.06, shares
    assert {w1 for w1, *_ in shares} >= {ramp[-1], 100}, shares

    served_while_warming = sum(b.ok - a.ok for a, b in itertools.pairwise(samples)
                               if a.state == b.state == "warming")
    if policy == "reject":
        # A warming replica answered nobody: what HAProxy sent it bounced (503) and went to r2.
        assert served_while_warming == 0 and warming_answers == 0
    else:
        # A warming replica served its share of real calls.
        assert served_while_warming > 0 and warming_answers > 0
    print(f"\n[{policy}] {total} calls, 0 errors; r1 share by phase (w1, w2, dispatches, share, expected): "
          f"{shares}; answers from r1 while warming: {warming_answers}")


def test_the_shipped_file_is_valid_as_it_is(tmp_path: Path) -> None:
    """The part the live test replaces (DNS discovery of the pods) parses too."""
    env = {**os.environ, "HAPROXY_STATS_SOCKET": str(tmp_path / "admin.sock")}
    check = subprocess.run([shutil.which("haproxy") or "/usr/sbin/haproxy", "-c", "-f", str(HAPROXY_CFG)],
                           capture_output=True, text=True, timeout=30, env=env)
    assert check.returncode == 0, check.stdout + check.stderr

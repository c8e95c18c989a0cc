"""Open-source Nginx in front of two real replicas (each its own Triton and sidecar), run from the
shipped k8s/nginx/nginx.conf: the fast-fail recipe.

Nginx has no active health checks and no weights from outside, so the sidecars answer in a way it
understands: `gate.policy=reject` refuses an inference call with a fast 503 while the model server
is not warm, and Nginx (`proxy_next_upstream ... http_502 http_503 non_idempotent`) sends the call
to the other replica and leaves the refusing one out for `fail_timeout`. Mid-traffic, replica 1's
Triton is killed (-9) and started again; no client sees an error, every answer a client gets comes
from a warm replica, and replica 1 serves again once warm.
"""

from __future__ import annotations

from pathlib import Path

from tests.balancers import NginxLB, Traffic, replicas, warming_args
from tests.servers import wait_until


def test_fast_fail_keeps_every_client_answer_warm(tmp_path: Path) -> None:
    with replicas(tmp_path, 2, warming_args("reject", tmp_path)) as (r1, r2), NginxLB(tmp_path / "lb", [r1, r2]) as lb:
        with Traffic(lb.port) as traffic:
            wait_until(lambda: r1.served() > 50 and r2.served() > 50, 30, "traffic on both replicas")
            r1.triton.kill()
            wait_until(lambda: r1.state()[0] == "cold", 10, "replica 1 cold")
            served_before = r1.served()
            r1.triton.start()
            wait_until(lambda: r1.state()[0] == "warming", 30, "replica 1 warming")
            wait_until(lambda: r1.ready(), 60, "replica 1 warm again")
            served_when_warm = r1.served()
            wait_until(lambda: r1.served() - served_when_warm >= 200, 30, "replica 1 serving again")
        answers, errors = traffic.count(), traffic.errors()
        states = {state for _, status, state in traffic.answers if status == 200}
        bounced = int(r1.metric("sidecar_gated_total", action="rejected"))
        refused = int(r1.metric("sidecar_requests_total", route="infer", status="502"))

    assert answers > 1000 and errors == [], errors[:5]
    assert states == {"warm"}  # no client answer came from a replica that was not warm
    # While cold and warming, replica 1 served nobody: it refused (503, or 502 while its Triton was
    # gone) and Nginx, leaving it out for fail_timeout after each refusal, sent it little.
    assert served_when_warm == served_before
    assert 0 < bounced + refused < answers / 20, (bounced, refused, answers)
    print(f"\n[nginx] {answers} calls, 0 errors, every answer from a warm replica; replica 1 refused "
          f"{bounced} calls with 503 and {refused} with 502 while not warm")

"""Warmth in each load balancer's own language.

The state machine says how warm the pod is; this package says it the way each balancer
listens: an HAProxy agent-check port (``agent``), ORCA load reports for Envoy's weighted
round robin (``orca``), and the per-pod load the autoscaler gauges and ORCA both read
(``load``). Nothing here decides readiness: every answer is read from ``StateMachine``.
"""

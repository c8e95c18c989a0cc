"""Envoy's headers, stamped on the data port's answers and on the admin port's /readyz.

- ``endpoint-load-metrics`` (or ``-bin``): an ORCA load report, only on answers to requests that
  ask for one with ``endpoint-load-metrics-format``; a request without it costs one dict lookup.
- ``x-envoy-immediate-health-check-fail`` on every answer while draining: Envoy marks the host
  failed at once instead of waiting for its next health check.
- ``x-envoy-degraded`` on a 200 /readyz while warming, when ``mesh.degraded_while_warming`` is on:
  Envoy then treats the pod as degraded and sends it only what healthy pods cannot take.
"""

from __future__ import annotations

from ..config import MeshConfig
from ..headers import Header
from ..planes import View
from ..state import State
from . import orca
from .load import LoadTracker

HEALTH_CHECK_FAIL: Header = (b"x-envoy-immediate-health-check-fail", b"true")
DEGRADED = "x-envoy-degraded"
ORCA_FORMAT = orca.FORMAT_HEADER


class DataPortSignals:
    """Both data ports' Envoy headers, from the control plane's latest snapshot and this data plane's load."""

    def __init__(self, cfg: MeshConfig, view: View, load: LoadTracker) -> None:
        self.capacity = cfg.capacity
        self.view = view
        self.load = load

    def __repr__(self) -> str:
        return f"<DataPortSignals {self.view.snapshot.state} {self.load!r} capacity={self.capacity}>"

    def stamp(self, headers: list[Header], orca_format: bytes | None) -> None:
        """Our Envoy headers on one answer; ``orca_format``: the request's endpoint-load-metrics-format."""
        snapshot = self.view.snapshot
        if orca_format is not None:
            load = orca.report(snapshot.state, snapshot.progress, self.load.total, self.capacity, self.load.rate())
            header = orca.encode(load, orca_format)
            if header is not None:
                headers.append(header)
        if snapshot.state is State.DRAINING:
            headers.append(HEALTH_CHECK_FAIL)

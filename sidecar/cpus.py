"""How many CPUs this container may use: the ``workers: auto`` count.

Not the host's core count: a pod on a 64-core node limited to 4 CPUs gets 4 (the cgroup's CPU quota, v2
``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), and a process pinned to 2 cores gets 2
(its affinity). A fractional quota rounds up (1.5 CPUs: 2 workers, each busy part of the time).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = _CGROUP) -> float | None:
    """CPUs the cgroup's quota allows, or None when it sets none."""
    try:
        quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
        if quota != "max":
            return int(quota) / int(period or "100000")
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def available(root: Path = _CGROUP) -> int:
    """CPUs this process may use: the smaller of its affinity and its cgroup's quota; at least 1."""
    quota = cgroup_quota(root)
    cpus = affinity()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def workers(setting: str, root: Path = _CGROUP) -> int:
    """The number of data-plane workers ``workers`` asks for (``auto``: the CPUs available)."""
    return available(root) if setting == "auto" else max(1, int(setting))

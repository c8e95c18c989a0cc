"""The pod's /status from the workers' reports, and its demand from theirs.

Counts add up; what every worker reads from the one pod-wide tier (entries, bytes) is the same in each and is
taken once; hit ratios are computed again from the summed counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..planes import Demand

_POD_WIDE = frozenset({"entries", "bytes", "max_bytes", "max_batch", "cap", "max_concurrent"})
# Subtrees that are each worker's own reading of one fact, not counts: the first worker's is shown.
_FIRST = frozenset({"latency_ms", "fingerprints"})


def merge_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for report in reports:
        merged = _merge(merged, report)
    for stats in merged.get("cache", {}).get("models", {}).values():
        asked = stats.get("hits", 0) + stats.get("redis_hits", 0) + stats.get("misses", 0) + stats.get("coalesced", 0)
        found = stats.get("hits", 0) + stats.get("redis_hits", 0) + stats.get("coalesced", 0)
        stats["hit_ratio"] = round(found / asked, 4) if asked else 0.0
    return merged


def _merge(into: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(into)
    for key, value in other.items():
        mine = out.get(key)
        if key not in out:
            out[key] = value
        elif key in _FIRST:
            continue
        elif isinstance(mine, Mapping) and isinstance(value, Mapping):
            out[key] = _merge(mine, value)
        elif isinstance(mine, bool) or isinstance(value, bool):
            out[key] = mine or value
        elif isinstance(mine, int | float) and isinstance(value, int | float):
            out[key] = max(mine, value) if key in _POD_WIDE else mine + value
    return out


def merge_demand(demands: Sequence[Demand]) -> Demand:
    totals: dict[str, float] = {}
    rates: dict[str, float] = {}
    for demand in demands:
        for model, n in demand.totals.items():
            totals[model] = totals.get(model, 0.0) + n
        for model, r in demand.rates.items():
            rates[model] = rates.get(model, 0.0) + r
    return Demand(totals, rates)

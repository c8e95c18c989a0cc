"""``forecast.*``: the demand history, the forecast's horizon and its model, in the configuration tree.

Plugged into :class:`sidecar.config.Config` as ``forecast: ForecastConfig``; every key has its help line
and validator as the rest of the tree does (``SIDECAR_FORECAST_HISTORY`` and so on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..config import _at_least, _key, _non_negative, _positive, _share

DAY = 86400.0


def _model_rates(v: Any) -> str | None:
    for item in v:
        model, sep, rate = item.rpartition("=")
        try:
            if not sep or not model or float(rate) <= 0:
                raise ValueError
        except ValueError:
            return "MODEL=REQUESTS_PER_SECOND pairs, comma-separated, rates > 0"
    return None


def _namespace(v: Any) -> str | None:
    # Braces would end the Redis Cluster hash tag the keys are built with.
    return None if re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", v) else "letters, digits, '.', '_', ':' or '-', 1 to 64"


@dataclass(frozen=True)
class ForecastConfig:
    history: float = field(
        default=14 * DAY,
        metadata=_key("seconds of per-model, per-minute call counts kept for the forecast (default 14 days); "
                      "0: no history and no forecast", _non_negative),
    )
    store: str = field(
        default="",
        metadata=_key("where the history lives: a SQLite file path or a redis:// URL; empty: the traffic store's "
                      "Redis (fleet-wide), or history.db beside its SQLite file"),
    )
    namespace: str = field(
        default="warm-sidecar",
        metadata=_key("Redis key namespace of the history and the lead samples: replicas sharing it pool their "
                      "counts (one per Service, kept across rollouts)", _namespace),
    )
    max_models: int = field(
        default=1000, metadata=_key("models the history keeps at most (the least recently seen go first)",
                                    _positive),
    )
    flush_interval: float = field(
        default=1.0,
        metadata=_key("seconds between the history's writes: each is one Redis round trip or SQLite transaction, "
                      "whatever the traffic", _at_least(1)),
    )
    min_history: float = field(
        default=DAY,
        metadata=_key("seconds a model must have been seen before it gets a forecast (AWS asks 24 h); a newer "
                      "model has none, never a forecast of zero", _positive),
    )
    lead: float = field(
        default=0.0,
        metadata=_key("seconds ahead the forecast looks; 0: the fleet's measured launch-to-warm time "
                      "(forecast.lead_percentile) plus forecast.extra_lead", _non_negative),
    )
    extra_lead: float = field(
        default=0.0,
        metadata=_key("seconds added to the measured launch-to-warm time for what the pod cannot measure: node "
                      "provisioning, scheduling, image pull, the metrics pipeline and the autoscaler's period",
                      _non_negative),
    )
    lead_percentile: float = field(
        default=0.9, metadata=_key("share of measured launch-to-warm times the lead covers", _share),
    )
    lead_samples: int = field(
        default=100, metadata=_key("launch-to-warm measurements the fleet keeps (the newest)", _positive),
    )
    default_lead: float = field(
        default=120.0,
        metadata=_key("seconds of lead (before forecast.extra_lead) while no launch-to-warm time has been "
                      "measured yet", _positive),
    )
    level_window: float = field(
        default=1800.0,
        metadata=_key("seconds of recent traffic compared with the pattern to correct its level (today "
                      "against the same minutes of past days)", _at_least(60)),
    )
    smoothing: float = field(
        default=120.0,
        metadata=_key("seconds either side of a past minute averaged into its seasonal sample (noise)",
                      _non_negative),
    )
    capacity: tuple[str, ...] = field(
        default=(),
        metadata=_key("what one pod serves, MODEL=REQUESTS_PER_SECOND pairs, overriding what the sidecar learns "
                      "from the batcher's latencies and the observed peak", _model_rates),
    )

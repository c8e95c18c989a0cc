"""The forecast's Prometheus families, read at scrape time from the forecaster (never kept twice):

    sidecar_forecast_requests_per_second{model}   demand expected at now + lead (fleet-wide with Redis)
    sidecar_forecast_lead_seconds                 that lead
    sidecar_capacity_requests_per_second{model}   what this pod can serve of the model
    sidecar_forecast_error_ratio{model}           MAPE of yesterday's forecasts against what came

A model without a forecast (too new, pattern unknown) or without a capacity has no series: an
autoscaler reading a missing series neither scales in on it nor invents a number. Only models whose
label is their own name (``label``: the registry's ``model_label``, which maps caller-given names the
server does not have to ``other``) are exported, so no caller can mint series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from .capacity import Capacity
from .service import Forecaster

__all__ = ["NAMES", "ForecastCollector"]

NAMES = (
    "sidecar_forecast_requests_per_second",
    "sidecar_forecast_lead_seconds",
    "sidecar_capacity_requests_per_second",
    "sidecar_forecast_error_ratio",
)


def _identity(model: str) -> str:
    return model


class ForecastCollector:
    def __init__(self, forecaster: Forecaster | None, capacities: Callable[[], Mapping[str, Capacity]] = dict,
                 label: Callable[[str], str] = _identity) -> None:
        self.forecaster = forecaster
        self.capacities = capacities
        self.label = label

    def describe(self) -> Iterator[Metric]:
        return iter(self._families(None, {}))  # names only: registering must not read anything

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.forecaster, self.capacities()))

    def _families(self, forecaster: Forecaster | None, capacities: Mapping[str, Capacity]) -> list[Metric]:
        rate = GaugeMetricFamily(NAMES[0], "Requests per second expected at now + lead, by model",
                                 labels=["model"])
        lead = GaugeMetricFamily(NAMES[1], "Seconds ahead the forecast looks: launch-to-warm p90 + extra_lead")
        capacity = GaugeMetricFamily(NAMES[2], "Requests per second this pod can serve, by model", labels=["model"])
        error = GaugeMetricFamily(NAMES[3], "Mean absolute percentage error of yesterday's forecasts, by model",
                                  labels=["model"])
        if forecaster is not None:
            lead.add_metric([], forecaster.lead.seconds)
            for model, f in sorted(forecaster.forecasts.items()):
                if self.label(model) == model:
                    rate.add_metric([model], round(f.rate, 3))
            for model, e in sorted(forecaster.errors.items()):
                if self.label(model) == model:
                    error.add_metric([model], round(e.mape, 4))
        for model, c in sorted(capacities.items()):
            if self.label(model) == model:
                capacity.add_metric([model], round(c.rate, 3))
        return [rate, lead, capacity, error]

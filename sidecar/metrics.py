"""Prometheus metrics, held in one registry object (no module globals).

The per-call families (requests, their latency, the upstream's latency) are lock-free
(``fastmetrics``); the rest are prometheus_client's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from .fastmetrics import FastCollector, FastCounter, FastHistogram

# Sub-millisecond buckets matter: the sidecar's own overhead is measured in them.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

# With workers, the pod's families are the control process's and every worker's, merged: counters and histograms
# summed, these gauges summed (each worker holds its own share), every other gauge by its largest value (the same
# fact seen from each process: state, readiness, the pod-wide cache tier's size). The pod-wide tier's counter is
# the same in every worker: its largest value, not the sum.
SUMMED_GAUGES = frozenset({"sidecar_in_flight_requests", "sidecar_queue_depth", "sidecar_model_requests_per_second"})
POD_WIDE_COUNTERS = frozenset({"sidecar_cache_evictions"})

MAX_MODEL_LABELS = 1000
OTHER = "other"
HTTP_EVENTS = ("disconnect", "timeout", "malformed", "too_many_connections")
_STATUS = {code: str(code) for code in range(100, 600)}


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The per-call families are lock-free (fastmetrics): observed on every call, on one loop.
        self.requests = FastCounter("sidecar_requests", "Requests answered, by route, model and HTTP status",
                                    ["route", "model", "status"])
        self.request_seconds = FastHistogram("sidecar_request_duration_seconds", "Whole call as the client sees it",
                                             ["route", "model"], LATENCY_BUCKETS)
        self.upstream_seconds = FastHistogram("sidecar_upstream_duration_seconds", "The upstream call alone",
                                              ["route", "model"], LATENCY_BUCKETS)
        r.register(FastCollector(self.requests, self.request_seconds, self.upstream_seconds))
        self.in_flight = Gauge("sidecar_in_flight_requests", "Requests being handled now", registry=r)
        self.upstream_errors = Counter(
            "sidecar_upstream_errors", "Upstream failures by kind (unavailable, timeout)",
            ["kind"], registry=r,
        )
        self.upstream_ready = Gauge(
            "sidecar_upstream_ready", "1 when the model server reports itself ready", registry=r,
        )
        self.state = Gauge("sidecar_state", "1 for the current state of the sidecar's state machine", ["state"],
                           registry=r)
        self.warmup_progress = Gauge("sidecar_warmup_progress", "Warm-up progress, 0..1", registry=r)
        self.replayed = Counter(
            "sidecar_warmup_replayed", "Warm-up calls replayed, by model and outcome", ["model", "outcome"], registry=r,
        )
        self.warmup_incomplete = Counter(
            "sidecar_warmup_incomplete", "Warm-ups that ran out of budget or passes before converging", registry=r,
        )
        self.recorded = Counter("sidecar_recorded", "Calls seen by the recorder", registry=r)
        self.record_dropped = Counter(
            "sidecar_record_dropped", "Calls not recorded because the recorder's queue was full", registry=r,
        )
        self.record_store_dropped = Counter(
            "sidecar_record_store_dropped", "Recorded calls whose counts the traffic store could not take (Redis "
            "down, failing over, or its breaker open): lost, not retried", registry=r,
        )
        self.gated = Counter("sidecar_gated", "Calls held or rejected while not warm", ["action"], registry=r)
        self.unmodelled = Counter(
            "sidecar_unmodelled", "Inference calls the codecs could not model, forwarded untouched", ["protocol"],
            registry=r,
        )
        self.http_events = Counter(
            "sidecar_http_connection_events",
            "Data-port connection events: disconnect (client left before its answer), timeout (slow client), "
            "malformed (refused request), too_many_connections", ["event"], registry=r,
        )
        self.record_errors = Counter(
            "sidecar_record_errors", "Calls the recorder could not record (dropped, counted)", registry=r,
        )
        self.batch_size = Histogram(
            "sidecar_batch_size", "Rows per call the batcher sends the model server (1: a call sent alone)",
            ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256), registry=r,
        )
        self.batch_delay = Histogram(
            "sidecar_batch_queue_delay_seconds", "Time a call waited for its batch to leave",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_retried = Counter(
            "sidecar_batch_retried_alone", "Members of a refused batch sent again one by one", ["model"], registry=r,
        )
        self.task_restarts = Counter(
            "sidecar_task_restarts", "Background tasks restarted after a failure", ["task"], registry=r,
        )
        # For autoscalers (k8s/monitoring, the HPA, KEDA): read at scrape time, never kept twice.
        self.warm_capacity = Gauge(
            "sidecar_warm_capacity", "1 when this pod can take full traffic, else the warm-up progress (0 draining)",
            registry=r,
        )
        self.workers = Gauge("sidecar_workers", "Data-plane worker processes serving now (1: a single process)",
                             registry=r)
        self.worker_restarts = Counter("sidecar_worker_restarts", "Data-plane workers started again after one died",
                                       registry=r)
        self.worker_dropped = Counter(
            "sidecar_worker_observations_dropped", "What workers observed (calls seen, batch shapes) and could not "
            "hand the control process: its channel was full", registry=r,
        )
        self.load = _LoadCollector(self)
        r.register(self.load)
        self._event_children = {e: self.http_events.labels(e) for e in HTTP_EVENTS}
        # Model label values: only models the model server has (its repository index, configuration).
        self.known_models: set[str] = set()
        # Told of each model learnt here (a worker tells the control process, which tells every worker).
        self.on_learn: Callable[[str], None] | None = None
        # Other processes' families (the workers'), merged into this registry's at each scrape.
        self.sources: list[Callable[[], Iterable[Iterable[Metric]]]] = []

    def watch_state(self, states: list[str], current: Callable[[], str], progress: Callable[[], float]) -> None:
        """The state gauges are read from the state machine at scrape time: no second copy to keep in step."""
        def one_if(name: str) -> Callable[[], float]:
            return lambda: 1.0 if current() == name else 0.0

        for name in states:
            self.state.labels(name).set_function(one_if(name))
        self.warmup_progress.set_function(progress)

    def watch_load(self, in_flight: Callable[[], Mapping[str, int]], rates: Callable[[], Mapping[str, float]],
                   warm_capacity: Callable[[], float]) -> None:
        """The autoscaler gauges, read at scrape time: per-model calls in flight and per second (from the
        data port), and how much of full traffic the pod can take (from the state machine)."""
        self.load.in_flight, self.load.rates = in_flight, rates
        self.warm_capacity.set_function(warm_capacity)

    def model_label(self, model: str) -> str:
        """Model names come from callers, so only models the server has become label values: no caller
        can mint series. Everything else is ``other``."""
        if not model or model in self.known_models:
            return model
        return OTHER

    def learn_model(self, model: str) -> None:
        """A model the server answered an inference call for exists (TF Serving has no index to list)."""
        if model not in self.known_models and len(self.known_models) < MAX_MODEL_LABELS:
            self.known_models.add(model)
            if self.on_learn is not None:
                self.on_learn(model)

    def count_http_event(self, event: str) -> None:
        child = self._event_children.get(event)
        if child is not None:
            child.inc()

    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        model = self.model_label(model)
        self.requests.inc((route, model, _STATUS.get(status) or str(status)))
        self.request_seconds.observe((route, model), seconds)

    def observe_upstream(self, route: str, model: str, seconds: float) -> None:
        self.upstream_seconds.observe((route, self.model_label(model)), seconds)

    def render(self) -> bytes:
        if not self.sources:
            return generate_latest(self.registry)
        families: list[Iterable[Metric]] = [list(self.registry.collect())]
        for source in self.sources:
            families.extend(source())
        return generate_latest(_Families(merge_families(families)))


class _Families:
    """Merged families, in the shape ``generate_latest`` reads."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_families(sources: Iterable[Iterable[Metric]]) -> list[Metric]:
    """One family per name from several processes' families (see SUMMED_GAUGES for the rule)."""
    merged: dict[str, Metric] = {}
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Any]] = {}
    for families in sources:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                samples[family.name] = {}
            table = samples[family.name]
            summed = (family.type in ("counter", "histogram", "summary") and family.name not in POD_WIDE_COUNTERS) \
                or family.name in SUMMED_GAUGES
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = table.get(key)
                if old is None:
                    table[key] = sample
                elif sample.name.endswith("_created"):
                    table[key] = sample._replace(value=min(old.value, sample.value))
                elif summed:
                    table[key] = sample._replace(value=old.value + sample.value)
                else:
                    table[key] = sample._replace(value=max(old.value, sample.value))
    for name, family in merged.items():
        family.samples = list(samples[name].values())
    return list(merged.values())


def lasting(families: Iterable[Metric]) -> list[Metric]:
    """What of a process's families outlives it: its counters and histograms (a dead worker's calls still
    happened), never its gauges."""
    return [f for f in families if f.type in ("counter", "histogram", "summary") and f.name not in POD_WIDE_COUNTERS]


class _LoadCollector:
    """``sidecar_queue_depth{model}`` and ``sidecar_model_requests_per_second{model}``.

    A series for every model the server has (0 when idle, so a sum over pods always has data)
    and for every model with calls now; caller-given names map through ``model_label``.
    The rate is a gauge over the data port's 10 s sliding window, not a counter for ``rate()``:
    prometheus-adapter and KEDA then read a per-pod number without PromQL of their own, and ORCA
    reports to Envoy carry the same number (``rate(sidecar_requests_total[1m])`` is the counter way).
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.in_flight: Callable[[], Mapping[str, int]] = dict
        self.rates: Callable[[], Mapping[str, float]] = dict

    def describe(self) -> Iterator[Metric]:
        return iter(self._families({}, {}, set()))  # names only: registering must not read the data port

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.in_flight(), self.rates(), self.metrics.known_models))

    def _families(self, in_flight: Mapping[str, int], rates: Mapping[str, float], known: set[str]) -> list[Metric]:
        label = self.metrics.model_label
        depth = dict.fromkeys(known, 0.0)
        rps = dict.fromkeys(known, 0.0)
        for model, n in in_flight.items():
            depth[label(model)] = depth.get(label(model), 0.0) + n
        for model, r in rates.items():
            rps[label(model)] = rps.get(label(model), 0.0) + r
        queue = GaugeMetricFamily("sidecar_queue_depth", "Inference calls waiting or in flight, by model",
                                  labels=["model"])
        rate = GaugeMetricFamily("sidecar_model_requests_per_second",
                                 "Inference calls per second by model, over the last 10 s", labels=["model"])
        for model in sorted(depth):
            queue.add_metric([model], depth[model])
        for model in sorted(rps):
            rate.add_metric([model], round(rps[model], 3))
        return [queue, rate]

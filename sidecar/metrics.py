"""Prometheus metrics, held in one registry object (no module globals).

Label children are cached so the hot path does a dict lookup, not a
``labels()`` call with its lock and tuple building.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Sub-millisecond buckets matter: the sidecar's own overhead is measured in them.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

MAX_MODEL_LABELS = 1000
OTHER = "other"
HTTP_EVENTS = ("disconnect", "timeout", "malformed", "too_many_connections")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sidecar_requests", "Requests answered, by route, model and HTTP status",
            ["route", "model", "status"], registry=r,
        )
        self.request_seconds = Histogram(
            "sidecar_request_duration_seconds", "Whole call as the client sees it",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.upstream_seconds = Histogram(
            "sidecar_upstream_duration_seconds", "The upstream call alone",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
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
        self.task_restarts = Counter(
            "sidecar_task_restarts", "Background tasks restarted after a failure", ["task"], registry=r,
        )
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._upstream_children: dict[tuple[str, str], Any] = {}
        self._event_children = {e: self.http_events.labels(e) for e in HTTP_EVENTS}
        # Model label values: only models the model server has (its repository index, configuration).
        self.known_models: set[str] = set()

    def watch_state(self, states: list[str], current: Callable[[], str], progress: Callable[[], float]) -> None:
        """The state gauges are read from the state machine at scrape time: no second copy to keep in step."""
        def one_if(name: str) -> Callable[[], float]:
            return lambda: 1.0 if current() == name else 0.0

        for name in states:
            self.state.labels(name).set_function(one_if(name))
        self.warmup_progress.set_function(progress)

    def model_label(self, model: str) -> str:
        """Model names come from callers, so only models the server has become label values: no caller
        can mint series. Everything else is ``other``."""
        if not model or model in self.known_models:
            return model
        return OTHER

    def learn_model(self, model: str) -> None:
        """A model the server answered an inference call for exists (TF Serving has no index to list)."""
        if len(self.known_models) < MAX_MODEL_LABELS:
            self.known_models.add(model)

    def count_http_event(self, event: str) -> None:
        child = self._event_children.get(event)
        if child is not None:
            child.inc()

    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        model = self.model_label(model)
        key = (route, model, status)
        child = self._request_children.get(key)
        if child is None:
            child = (
                self.requests.labels(route, model, str(status)),
                self.request_seconds.labels(route, model),
            )
            self._request_children[key] = child
        counter, hist = child
        counter.inc()
        hist.observe(seconds)

    def observe_upstream(self, route: str, model: str, seconds: float) -> None:
        model = self.model_label(model)
        key = (route, model)
        hist = self._upstream_children.get(key)
        if hist is None:
            hist = self._upstream_children[key] = self.upstream_seconds.labels(route, model)
        hist.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

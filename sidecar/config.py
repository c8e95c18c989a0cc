"""One typed configuration tree, read from YAML, then environment, then flags.

Each leaf is a dataclass field whose metadata carries a help line and, where the
type alone is not enough, a validator. Keys are dotted paths (``upstream.url``);
the environment variable for a key is ``SIDECAR_`` + the path upper-cased with
dots as underscores (``SIDECAR_UPSTREAM_URL``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlsplit

from .errors import ConfigError

ENV_PREFIX = "SIDECAR_"

Validator = Callable[[Any], str | None]  # returns what is allowed, if the value is not


def _positive(v: Any) -> str | None:
    return None if v > 0 else "a number > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "a number >= 0"


def _one_of(*choices: str) -> Validator:
    return lambda v: None if v in choices else "one of " + ", ".join(choices)


def _host_port(v: Any) -> str | None:
    try:
        split_host_port(v)
    except ValueError:
        return "HOST:PORT with a port from 0 to 65535"
    return None


def _http_url(v: Any) -> str | None:
    parts = urlsplit(v)
    if parts.scheme in ("http", "https") and parts.hostname and not parts.query:
        return None
    return "an http:// or https:// URL with a host"


def _restricted(v: Any) -> str | None:
    from .protocols.restrict import parse

    try:
        parse(v)
    except ValueError as e:
        return f"API[,API...]:HEADER=VALUE separated by ';' ({e})"
    return None


def _forward_pattern(v: Any) -> str | None:
    from .protocols.forwarded import compile_pattern

    try:
        compile_pattern(v)
    except ValueError as e:
        return f"a regular expression ({e})"
    return None


# Every Redis URL the sidecar takes (sidecar/redis/urls.py reads them; a URL it cannot read stops start-up).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://", "redis+sentinel://",
                 "rediss+sentinel://")


def _redis_or_off(v: Any) -> str | None:
    if v in ("", "off") or v.lower().startswith(REDIS_SCHEMES):
        return None
    return "'off' or a Redis URL: " + ", ".join(REDIS_SCHEMES)


def _store_location(v: Any) -> str | None:
    if v.lower().startswith(("redis", "unix:")) and not v.lower().startswith(REDIS_SCHEMES):
        return "a file path or a Redis URL: " + ", ".join(REDIS_SCHEMES)
    return None


def _workers(v: Any) -> str | None:
    if str(v) == "auto" or (str(v).isdigit() and 1 <= int(v) <= 256):
        return None
    return "auto or a count from 1 to 256"


def _key(help: str, check: Validator | None = None) -> dict[str, Any]:
    return {"help": help, "check": check}


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = field(
        default="http://127.0.0.1:8000",
        metadata=_key("model server HTTP base URL (Triton :8000, TF Serving :8501)", _http_url),
    )
    protocol: str = field(
        default="auto",
        metadata=_key(
            "triton, tfserving, or auto (detect by probing /v2/health/live)",
            _one_of("auto", "triton", "tfserving"),
        ),
    )
    connect_timeout: float = field(
        default=2.0, metadata=_key("seconds to open a connection to the model server", _positive)
    )
    timeout: float = field(
        default=60.0,
        metadata=_key("seconds a whole upstream call may take before the caller gets 504", _positive),
    )
    pool_size: int = field(
        default=256, metadata=_key("most concurrent connections to the model server", _positive)
    )
    health_interval: float = field(
        default=1.0, metadata=_key("seconds between readiness probes of the model server while it is ready", _positive)
    )
    unready_interval: float = field(
        default=0.1,
        metadata=_key("seconds between readiness probes while the model server is not ready (starting, loading, "
                      "restarting): how late the pod finds it come up; at most health_interval", _positive),
    )
    models: tuple[str, ...] = field(
        default=(),
        metadata=_key("TF Serving models whose status decides readiness (comma-separated); "
                      "Triton uses /v2/health/ready"),
    )
    grpc_url: str = field(
        default="",
        metadata=_key("model server gRPC target (HOST:PORT); empty: upstream.url's host with port 8001 (Triton) "
                      "or 8500 (TF Serving)", lambda v: None if v == "" else _host_port(v)),
    )
    http_header_forward_pattern: str = field(
        default="",
        metadata=_key("the model server's --http-header-forward-pattern, if it has one: headers it turns into model "
                      "parameters become part of each call's identity (empty: none forwarded)", _forward_pattern),
    )
    grpc_header_forward_pattern: str = field(
        default="",
        metadata=_key("the model server's --grpc-header-forward-pattern, if it has one (see "
                      "upstream.http_header_forward_pattern)", _forward_pattern),
    )
    passthrough_timeout: float = field(
        default=0.0,
        metadata=_key("seconds a call the sidecar only relays (model loads, metadata, calls it cannot model) may "
                      "take when the caller set no deadline; 0: as long as the caller waits", _non_negative),
    )


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_key("largest request body accepted; larger gets 413 (suffixes KiB, MiB, GiB)", _positive),
    )
    max_inflight_bytes: int = field(
        default=512 * 1024 * 1024,
        metadata=_key("request bodies held in memory at once; past it a call gets 503 with Retry-After", _positive),
    )
    max_answer_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=_key("largest model-server answer buffered on the inference path; larger gets 502", _positive),
    )
    inline_decode_bytes: int = field(
        default=256 * 1024,
        metadata=_key("inference bodies up to this size decode on the event loop; larger ones in a worker "
                      "process, so probes never stall", _non_negative),
    )
    decode_workers: int = field(
        default=1, metadata=_key("worker processes decoding large bodies (0: decode on the event loop)",
                                 _non_negative),
    )
    max_connections: int = field(
        default=0,
        metadata=_key("most client connections on the data port at once; 0: the file-descriptor limit less "
                      "a reserve for the admin port and the model server", _non_negative),
    )
    max_header_bytes: int = field(
        default=64 * 1024, metadata=_key("largest request line plus header section; larger gets 431", _positive)
    )
    header_timeout: float = field(
        default=10.0, metadata=_key("seconds a client has to send a request's whole header section", _positive)
    )
    body_timeout: float = field(
        default=30.0,
        metadata=_key("seconds a request body (or a client reading its answer) may stall before 408 / close",
                      _positive),
    )
    keepalive_timeout: float = field(
        default=75.0, metadata=_key("seconds an idle keep-alive client connection stays open", _positive)
    )
    body_min_rate: int = field(
        default=1024,
        metadata=_key("bytes/s a request body must average once body_min_rate_grace has passed, else 408: a body "
                      "trickled in never stalls for body_timeout (0: no minimum; 1 KiB/s, dial-up speed, never "
                      "troubles a real upload; time the sidecar is not reading does not count)", _non_negative),
    )
    body_min_rate_grace: float = field(
        default=10.0, metadata=_key("seconds a request body may take before body_min_rate applies", _non_negative)
    )
    request_timeout: float = field(
        default=0.0,
        metadata=_key("seconds a whole request (header section and body) may take to arrive, else 408; 0: no "
                      "limit, as no one figure suits every body size (body_min_rate bounds a trickle already)",
                      _non_negative),
    )
    lingering_time: float = field(
        default=30.0,
        metadata=_key("after answering a request whose body was not read (413, 400, 431, 503), seconds the "
                      "sidecar keeps reading and discarding what the client still sends before it closes, so the "
                      "client reads the answer instead of a connection reset (nginx's lingering_time); 0: close "
                      "at once", _non_negative),
    )
    lingering_timeout: float = field(
        default=5.0,
        metadata=_key("seconds of silence that end the lingering read early (nginx's lingering_timeout)",
                      _positive),
    )
    lingering_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=_key("bytes the lingering read discards at most before it closes (suffixes KiB, MiB, GiB)",
                      _non_negative),
    )


def _share(v: Any) -> str | None:
    return None if 0 < v <= 1 else "a number in (0, 1]"


def _at_least(n: float) -> Validator:
    return lambda v: None if v >= n else f"a number >= {n:g}"


@dataclass(frozen=True)
class RecordConfig:
    enabled: bool = field(default=True, metadata=_key("record traffic for warm-up (YAML `record: false` too)"))
    top_n: int = field(
        default=1000, metadata=_key("requests remembered and replayed per model at most (record.coverage decides "
                                    "how many of them warm-up replays)", _positive),
    )
    coverage: float = field(
        default=0.9,
        metadata=_key("share of a model's recorded traffic warm-up replays: the most frequent calls until together "
                      "they carry this share, at most record.top_n. Readiness waits only for the calls that measure "
                      "latency; the rest fill the response cache behind it", _share),
    )
    models: tuple[str, ...] = field(
        default=(), metadata=_key("only record these models (comma-separated); empty records all")
    )
    max_payload_bytes: int = field(
        default=1024 * 1024, metadata=_key("largest request body kept for replay (counts are kept anyway)", _positive)
    )
    max_total_bytes: int = field(
        default=256 * 1024 * 1024, metadata=_key("all kept request bodies together", _positive)
    )
    payload_ttl: float = field(
        default=7 * 86400.0, metadata=_key("seconds a kept request body lives after it was last seen", _positive)
    )
    half_life: float = field(
        default=86400.0, metadata=_key("seconds after which a request's count has halved", _positive)
    )
    queue_size: int = field(
        default=10000, metadata=_key("observations waiting for the recorder; overflow is counted, not waited for",
                                     _positive)
    )
    flush_interval: float = field(
        default=2.0, metadata=_key("seconds between writes of aggregated counts to the store", _positive)
    )
    queue_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_key("request bytes waiting for the recorder; overflow is counted, not waited for", _positive),
    )


@dataclass(frozen=True)
class WarmupConfig:
    enabled: bool = field(default=True, metadata=_key("replay recorded traffic before reporting ready"))
    seeds: str = field(
        default="",
        metadata=_key("directory of seed request files, <dir>/<model>/<name>.json in the upstream's wire format "
                      "(docs/guide.md)"),
    )
    savedmodel: str = field(
        default="", metadata=_key("SavedModel directory whose assets.extra/tf_serving_warmup_requests seeds warm-up")
    )
    concurrency: int = field(default=4, metadata=_key("warm-up requests in flight at once", _positive))
    convergence_ratio: float = field(
        default=1.5,
        metadata=_key("a (model, shape) is warm when its last two passes are within this latency ratio", _at_least(1)),
    )
    min_passes: int = field(default=2, metadata=_key("replay passes at least", _positive))
    max_passes: int = field(default=10, metadata=_key("replay passes at most before giving up on convergence",
                                                       _positive))
    budget: float = field(
        default=600.0, metadata=_key("seconds the whole warm-up may take; then ready with a warning", _positive)
    )
    require_complete: bool = field(
        default=False, metadata=_key("stay not-ready until warm-up converges, however long it takes")
    )
    max_batch: int = field(default=64, metadata=_key("largest batch size the shape sweep builds", _positive))
    ready_share: float = field(
        default=1.0,
        metadata=_key("the pod turns ready once the models carrying this share of recorded traffic are warm "
                      "(1.0: all); the rest keep warming in the background", _share),
    )
    background_concurrency: int = field(
        default=1, metadata=_key("warm-up calls in flight at once once the pod is ready (the models still "
                                 "warming must not slow the ones serving)", _positive),
    )
    fill_concurrency: int = field(
        default=32,
        metadata=_key("once the pod is ready, recorded calls in flight at once that fill the response cache "
                      "(the calls warm-up did not need to measure; the batcher serves live calls first)",
                      _positive),
    )
    retry_interval: float = field(
        default=5.0,
        metadata=_key("seconds before a warm-up that did not make the pod ready is tried again (doubling, "
                      "at most 300)", _positive),
    )


@dataclass(frozen=True)
class ModelsConfig:
    load: str = field(
        default="auto",
        metadata=_key("auto: with Triton in explicit model-control mode, load models in order of their share of "
                      "traffic, each warmed as soon as it is loaded; off: never load or unload",
                      _one_of("auto", "off")),
    )
    unseen: tuple[str, ...] = field(
        default=("none",),
        metadata=_key("models never seen in traffic, loaded last when the sidecar loads models: none (only models "
                      "the operator loaded are warmed), all (repository order), or a list in the order to load them"),
    )
    idle_unload: float = field(
        default=0.0,
        metadata=_key("unload models the sidecar loaded that had no call for this many seconds, and load them "
                      "again on demand with their warm-up; 0: never", _non_negative),
    )


@dataclass(frozen=True)
class GateConfig:
    policy: str = field(
        default="forward",
        metadata=_key("inference while not warm: forward, hold (until warm or hold_timeout) or reject (503)",
                      _one_of("forward", "hold", "reject")),
    )
    hold_timeout: float = field(
        default=30.0, metadata=_key("seconds a held request waits for warm before it is forwarded", _positive)
    )
    retry_after: float = field(default=5.0, metadata=_key("Retry-After seconds on a rejected request", _positive))
    max_held: int = field(
        default=1000, metadata=_key("most calls held at once under hold; more are rejected with 503", _positive)
    )


def _host_port_or_off(v: Any) -> str | None:
    return None if v == "" else _host_port(v)


@dataclass(frozen=True)
class MeshConfig:
    agent_listen: str = field(
        default="",
        metadata=_key("HAProxy agent-check port (HOST:PORT): answers the weight and state of the pod; empty: off",
                      _host_port_or_off),
    )
    capacity: int = field(
        default=64,
        metadata=_key("calls in flight at which the ORCA utilization reported to Envoy reaches 1.0 when warm",
                      _positive),
    )
    degraded_while_warming: bool = field(
        default=False,
        metadata=_key("while warming, /readyz answers 200 with x-envoy-degraded (Envoy sends the pod only "
                      "spill-over) instead of 503"),
    )


def _model_seconds(v: Any) -> str | None:
    for item in v:
        model, sep, seconds = item.rpartition("=")
        try:
            if not sep or not model or float(seconds) <= 0:
                raise ValueError
        except ValueError:
            return "MODEL=SECONDS pairs, comma-separated, seconds > 0"
    return None


@dataclass(frozen=True)
class CacheConfig:
    models: tuple[str, ...] = field(
        default=(), metadata=_key("models whose answers are cached (comma-separated names, or *); off by default, "
                                  "because some models are not deterministic"),
    )
    max_bytes: int = field(
        default=256 * 1024 * 1024, metadata=_key("memory of the in-process tier (W-TinyLFU)", _positive)
    )
    max_entry_bytes: int = field(
        default=4 * 1024 * 1024, metadata=_key("largest answer cached (either tier)", _positive)
    )
    text_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_key("memory for the JSON text of FP32/FP64 answers served again (Triton's digits cost about 0.5 us "
                      "a float to write, 0.2 ms for a 384-float embedding), least recently used out first; 0: "
                      "written again for every hit", _non_negative),
    )
    ttl: float = field(default=300.0, metadata=_key("seconds an answer stays fresh", _positive))
    model_ttl: tuple[str, ...] = field(
        default=(), metadata=_key("per-model TTLs overriding cache.ttl: MODEL=SECONDS, comma-separated",
                                  _model_seconds),
    )
    stale_if_error: float = field(
        default=0.0,
        metadata=_key("seconds past its TTL an answer may still be served (marked stale) while the model server "
                      "is unavailable or late; 0: never", _non_negative),
    )
    scope_header: str = field(
        default="", metadata=_key("a header whose value becomes part of the key, so calls carrying "
                                  "Authorization or Cookie are cached per tenant; empty: such calls are not cached"),
    )
    redis: str = field(
        default="", metadata=_key("Redis URL of the shared tier (redis://, rediss://, unix://, redis+cluster://, "
                                  "redis+sentinel://); empty: the traffic store's Redis, if it is one; 'off': no "
                                  "shared tier", _redis_or_off),
    )
    verify_interval: float = field(
        default=60.0,
        metadata=_key("seconds between checks that each cached model still answers as it did (a model reloaded in "
                      "place with other answers loses its cached answers); 0: never", _non_negative),
    )
    namespace: str = field(
        default="",
        metadata=_key("who shares answers in the Redis tier: replicas with the same namespace and the same model "
                      "configuration. Give each fleet (and each rollout of a model) its own, e.g. the Deployment's "
                      "pod-template-hash (the shipped manifests do); empty: 'default'",
                      lambda v: None if re.fullmatch(r"[A-Za-z0-9._-]{0,64}", v) else
                      "letters, digits, '.', '_' or '-', at most 64"),
    )
    redis_timeout: float = field(
        default=0.005, metadata=_key("seconds a shared-tier read may take before it counts as a miss", _positive)
    )
    redis_failures: int = field(
        default=5, metadata=_key("consecutive shared-tier failures that open its circuit breaker", _positive)
    )
    redis_cooldown: float = field(
        default=2.0, metadata=_key("seconds the breaker stays open before one probe (doubling, at most 60)",
                                   _positive),
    )


def _seconds_or_auto(v: Any) -> str | None:
    if v == "auto":
        return None
    try:
        return None if float(v) >= 0 else "auto, or seconds >= 0"
    except ValueError:
        return "auto, or seconds >= 0"


def _batch_models(v: Any) -> str | None:
    for item in v:
        name, sep, maximum = item.partition("=")
        if not name or (sep and not (maximum.isdigit() and int(maximum) >= 2)):
            return "names, NAME=MAX (MAX >= 2), * or auto, comma-separated"
    return None


@dataclass(frozen=True)
class BatchConfig:
    models: tuple[str, ...] = field(
        default=(),
        metadata=_key("models whose concurrent calls the sidecar batches: names, NAME=MAX (needed for TF Serving), "
                      "* (every model with a batch dimension), or auto (Triton models with max_batch_size > 0, "
                      "fixed output shapes and no batching of their own)", _batch_models),
    )
    max_concurrent: int = field(
        default=0,
        metadata=_key("batches in flight per model before arrivals gather; 0: the model's instance count",
                      _non_negative),
    )
    max_delay: float = field(
        default=0.5,
        metadata=_key("seconds a call may wait for its batch while the server stays busy; past it the batch goes "
                      "anyway (a safety valve: waits normally end when a batch in flight completes)", _positive),
    )
    target_latency: str = field(
        default="auto",
        metadata=_key("seconds a batch should take at most, its size capped by the latency learned per batch size, "
                      "so a call never waits behind a batch far longer than its own; auto: the latency of the "
                      "smallest batch that gives 95% of the best throughput measured (larger batches add wait, not "
                      "throughput); 0: only the model's maximum caps it", _seconds_or_auto),
    )
    max_queue: int = field(
        default=4096, metadata=_key("calls waiting for a batch per model; more get 503 with Retry-After",
                                    _positive),
    )


_DAY = 86400.0


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
        default=14 * _DAY,
        metadata=_key("seconds of per-model, per-minute call counts kept for the forecast (default 14 days); "
                      "0: no history and no forecast", _non_negative),
    )
    store: str = field(
        default="",
        metadata=_key("where the history lives: a SQLite file path or a Redis URL (as store); empty: the traffic "
                      "store's Redis (fleet-wide), or history.db beside its SQLite file", _store_location),
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
        default=_DAY,
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


@dataclass(frozen=True)
class Config:
    listen: str = field(default="0.0.0.0:9000", metadata=_key("HTTP data port (HOST:PORT)", _host_port))
    grpc_listen: str = field(
        default="0.0.0.0:9001",
        metadata=_key("gRPC data port (HOST:PORT): KServe v2, TF Serving and grpc.health.v1; empty: off",
                      lambda v: None if v == "" else _host_port(v)),
    )
    admin: str = field(
        default="0.0.0.0:9090", metadata=_key("admin port: probes, /metrics (HOST:PORT)", _host_port)
    )
    workers: str = field(
        default="auto",
        metadata=_key("data-plane worker processes, each serving both data ports (SO_REUSEPORT) behind one control "
                      "process: auto (the CPUs this container may use: its cgroup quota and affinity) or a count; "
                      "1 keeps one process", _workers),
    )
    shutdown_delay: float = field(
        default=5.0,
        metadata=_key("seconds after SIGTERM during which readiness fails but new connections are still "
                      "served, so load balancers stop sending first", _non_negative),
    )
    shutdown_grace: float = field(
        default=30.0,
        metadata=_key("seconds in-flight requests may finish after the shutdown delay", _non_negative),
    )
    admin_token: str = field(
        default="", metadata=_key("bearer token admin actions (POST /cache/flush, /warmup) require; with none "
                                  "configured they are disabled"),
    )
    admin_token_file: str = field(
        default="", metadata=_key("file holding the admin token (a mounted Secret); wins over admin_token"),
    )
    restricted_api: str = field(
        default="",
        metadata=_key("APIs of the data ports that need a header, as Triton's --http-restricted-api: "
                      "API[,API...]:HEADER=VALUE, several separated by ';'. The gRPC port applies the same "
                      "(metadata triton-grpc-protocol-HEADER, as Triton's --grpc-restricted-protocol) unless "
                      "grpc_restricted_protocol says otherwise", _restricted),
    )
    grpc_restricted_protocol: str = field(
        default="",
        metadata=_key("the gRPC port's own restrictions, as Triton's --grpc-restricted-protocol: "
                      "API[,API...]:KEY=VALUE (metadata triton-grpc-protocol-KEY); empty: those of restricted_api",
                      _restricted),
    )
    log_level: str = field(
        default="info", metadata=_key("debug, info, warning or error", _one_of("debug", "info", "warning", "error"))
    )
    log_format: str = field(
        default="text", metadata=_key("text, or json: one JSON object per line (time, level, logger, message, "
                                      "request_id where there is one) for log pipelines", _one_of("text", "json"))
    )
    store: str = field(
        default="/tmp/warm-sidecar/traffic.db",
        metadata=_key("traffic memory: a file path (embedded SQLite) or a Redis URL: redis://, rediss://, unix://, "
                      "redis+cluster://host:port[,host:port...] (Redis Cluster) or "
                      "redis+sentinel://host:port[,host:port...]/service (the master Sentinel names; "
                      "rediss+ for TLS)", _store_location),
    )
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    forecast: ForecastConfig = field(default_factory=ForecastConfig)


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(value)
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class KeyInfo:
    path: str
    type: Any
    default: Any
    help: str
    check: Validator | None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.path.upper().replace(".", "_")


def keys(defaults: Any = None, prefix: str = "") -> Iterator[KeyInfo]:
    """Every leaf key of the tree, in declaration order, with its default."""
    node = Config() if defaults is None else defaults
    hints = get_type_hints(type(node))
    for f in dataclasses.fields(node):
        path = prefix + f.name
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from keys(value, path + ".")
            continue
        yield KeyInfo(path, hints[f.name], value, f.metadata.get("help", ""), f.metadata.get("check"))


_SIZE = re.compile(r"^\s*(\d+)\s*(b|kib|mib|gib|kb|mb|gb)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "mb": 10**6, "gb": 10**9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def _coerce(info: KeyInfo, raw: Any) -> Any:
    """Turn a YAML/env/flag value into the key's type, or say what is allowed."""
    typ = info.type
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise _bad(info, raw, "true or false")
    if typ is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        m = _SIZE.match(str(raw))
        if not m:
            raise _bad(info, raw, "a whole number (optionally with KiB, MiB, GiB)")
        return int(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
    if typ is float:
        try:
            if isinstance(raw, bool):
                raise ValueError
            return float(str(raw).rstrip("s")) if isinstance(raw, str) else float(raw)
        except ValueError:
            raise _bad(info, raw, "a number of seconds") from None
    if typ == tuple[str, ...]:
        items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
        return tuple(str(i).strip() for i in items if str(i).strip())
    if not isinstance(raw, str | int | float) or isinstance(raw, bool):
        raise _bad(info, raw, "a string")
    return str(raw)


def _bad(info: KeyInfo, raw: Any, allowed: str) -> ConfigError:
    shown = mask(info.path, raw) if isinstance(raw, str) else raw
    return ConfigError(f"config key {info.path}: invalid value {shown!r}; allowed: {allowed}")


_SECTIONS_WITH_ENABLED = ("record", "warmup")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}.")
        elif not prefix and k in _SECTIONS_WITH_ENABLED and isinstance(v, bool):
            yield f"{k}.enabled", v  # `record: false` reads as it is meant
        else:
            yield f"{prefix}{k}", v


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml  # only needed when a file is given

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of keys")
    return dict(_flatten(data))


def load(
    file_values: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Merge the three sources (later wins) into a validated :class:`Config`."""
    known = {k.path: k for k in keys()}
    merged: dict[str, Any] = {}
    for path, raw in (file_values or {}).items():
        if path not in known:
            raise ConfigError(f"config key {path}: unknown key; allowed: {', '.join(known)}")
        merged[path] = raw
    environ = os.environ if env is None else env
    for info in known.values():
        if info.env in environ:
            merged[info.path] = environ[info.env]
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})

    values: dict[str, Any] = {}
    for path, info in known.items():
        value = _coerce(info, merged[path]) if path in merged else info.default
        allowed = info.check(value) if info.check else None
        if allowed:
            raise _bad(info, merged.get(path, value), allowed)
        values[path] = value
    config: Config = _build(Config, values, "")
    return config


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, values, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            kwargs[f.name] = values[prefix + f.name]
    return cls(**kwargs)


def render_yaml(cfg: Config) -> str:
    """The effective configuration as YAML that ``--config`` reads back; credentials masked."""
    import yaml

    tree: dict[str, Any] = {}
    for info in keys():
        node = tree
        *parents, leaf = info.path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        value: Any = cfg
        for part in info.path.split("."):
            value = getattr(value, part)
        node[leaf] = mask(info.path, list(value) if isinstance(value, tuple) else value)
    text: str = yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)
    return text


SECRET_KEYS = frozenset({"restricted_api", "grpc_restricted_protocol", "admin_token"})
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<userinfo>[^@/]*)@", re.IGNORECASE)


def mask(path: str, value: Any) -> Any:
    """A value as it may be shown: passwords in URLs and secret settings replaced by ``***``."""
    if not isinstance(value, str) or not value:
        return value
    if path in ("restricted_api", "grpc_restricted_protocol"):
        return re.sub(r"=[^;]*", "=***", value)
    if path in SECRET_KEYS:
        return "***"
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}***@", value)

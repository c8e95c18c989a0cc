"""What an injected sidecar looks like: fixed ports and names, the injector's options, and the
pod annotations (``warm-sidecar.io/...``) that change them for one workload."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .. import __version__
from ..config import ENV_PREFIX, keys, load
from ..errors import ConfigError

PREFIX = "warm-sidecar.io/"
STATUS_KEY = PREFIX + "status"
INJECT_KEY = PREFIX + "inject"
INJECTED = "injected"
CONFIG_PREFIX = "config."  # warm-sidecar.io/config.<key>: any configuration key

SIDECAR_NAME = "warm-sidecar"
STORE_VOLUME = "warm-sidecar-store"
TMP_VOLUME = "warm-sidecar-tmp"  # /tmp: the root filesystem is read-only
SHM_VOLUME = "warm-sidecar-shm"  # /dev/shm: the workers' one answer tier (memory; counts against the limit)
STORE_DIR = "/var/lib/warm-sidecar"
DEFAULT_IMAGE = f"warm-sidecar:{__version__}"

DATA_PORT, GRPC_PORT, ADMIN_PORT, AGENT_PORT = 9000, 9001, 9090, 9091
ADMIN_PORT_NAME, AGENT_PORT_NAME = "sidecar-admin", "sidecar-agent"
MODEL_HTTP_PORT_NAME, MODEL_GRPC_PORT_NAME = "http-model", "grpc-model"
# Native sidecars run from 1.29 (SidecarContainers beta, on by default), but a Service's named
# targetPort reaches a port of a native sidecar only from 1.32 (kubernetes#127958, fixed by
# kubernetes#127976): before that the Service gets no endpoints. The named-port trick needs it.
SIDECAR_CONTAINERS_SINCE = (1, 29)
NATIVE_SINCE = (1, 32)
SLEEP_ACTION_SINCE = (1, 30)  # the preStop `sleep` action is on by default (beta) from 1.30
# Seconds of termination grace beyond the drain itself: the model server's own exit and the
# kubelet's bookkeeping. Measured nowhere; generous on purpose, since only a slow exit costs it.
DRAIN_MARGIN = 10
DEFAULT_SHUTDOWN_DELAY, DEFAULT_SHUTDOWN_GRACE = 5.0, 30.0
ADMIN_TOKEN_ENV = "SIDECAR_ADMIN_TOKEN"
# What the data port refuses without the admin token (header `admin-key`): loading/unloading
# models, shared-memory regions, tracing and log settings. Clients keep health, metadata,
# model config, statistics and inference. The kubelet expands $(SIDECAR_ADMIN_TOKEN) from the
# env var before it, so the token never appears in the pod spec.
RESTRICTED_APIS = f"model-repository,shared-memory,trace,logging:admin-key=$({ADMIN_TOKEN_ENV})"


class InjectError(Exception):
    """The pod cannot be injected as asked; the message names the annotation or field."""


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper().replace(".", "_")


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("a non-empty value")
    return value.strip()


def _one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value.strip().lower() not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return value.strip().lower()

    return check


def _port(value: str) -> str:
    if not value.strip().isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError("a port number from 1 to 65535")
    return str(int(value))


def _restriction(value: str) -> str:
    return "" if value.strip().lower() == "off" else _text(value)


def _seconds(value: str) -> str:
    try:
        seconds = float(value.strip().rstrip("s"))
    except ValueError:
        raise ValueError("a number of seconds >= 0") from None
    if not 0 <= seconds < 3600:
        raise ValueError("a number of seconds >= 0 and < 3600")
    return f"{seconds:g}"


@dataclass(frozen=True)
class Annotation:
    name: str  # after the prefix
    help: str
    key: str | None = None  # the configuration key it sets, if it sets one directly
    check: Callable[[str], str] = _text


ANNOTATIONS = (
    Annotation("inject", "`true`: the webhook injects this pod; `false`: neither the webhook nor `sidecar inject` do",
               check=_one_of("true", "false")),
    Annotation("status", "`injected`, written by the injector: a pod that has it is never injected again"),
    Annotation("image", "the sidecar image"),
    Annotation("mode", "`native` (init container with `restartPolicy: Always`; Kubernetes >= 1.32 for named "
               "Service ports) or `classic` (a second container)",
               check=_one_of("native", "classic")),
    Annotation("probes", "`http` (default: /startupz, /readyz, /livez on the admin port) or `grpc` "
               "(grpc.health.v1 on the gRPC data port)", check=_one_of("http", "grpc")),
    Annotation("container", "name of the model server container (default: the one detected as Triton/TF Serving)"),
    Annotation("protocol", "`triton`, `tfserving` or `auto` (default: detected)", "upstream.protocol",
               _one_of("triton", "tfserving", "auto")),
    Annotation("upstream-port", "the model server's HTTP port (default: from its args, else 8000 / 8501)",
               check=_port),
    Annotation("upstream-grpc-port", "the model server's gRPC port (default: from its args, else 8001 / 8500)",
               check=_port),
    Annotation("models", "TF Serving models whose status decides readiness (default: `--model_name`)",
               "upstream.models"),
    Annotation("store", f"traffic memory: a file path (default `{STORE_DIR}/traffic.db` on an emptyDir) or "
               "a redis:// URL", "store"),
    Annotation("cache-models", "models whose responses are cached (names or `*`)", "cache.models"),
    Annotation("cache-redis", "Redis URL of the fleet-wide cache tier", "cache.redis"),
    Annotation("cache-namespace", "who shares cached answers in Redis (default: the pod's pod-template-hash, "
               "so a rollout never serves its predecessor's answers)", "cache.namespace"),
    Annotation("batch-models", "models whose calls the sidecar batches (names, `*` or `auto`)", "batch.models"),
    Annotation("gate-policy", "inference while not warm: `forward`, `hold` or `reject`", "gate.policy",
               _one_of("forward", "hold", "reject")),
    Annotation("restricted-api", "the data port's restricted APIs as Triton's --http-restricted-api, "
               "`API[,API...]:HEADER=VALUE;...` (`$(SIDECAR_ADMIN_TOKEN)` may stand for the token), or `off`; "
               f"default with admin-token-secret: `{RESTRICTED_APIS}`", "restricted_api", _restriction),
    Annotation("shutdown-delay", "seconds the listener keeps accepting after SIGTERM (default 5)", check=_seconds),
    Annotation("shutdown-grace", "seconds in-flight calls may finish after that (default 30)", check=_seconds),
    Annotation("admin-token-secret", f"a Secret whose key `token` becomes {ADMIN_TOKEN_ENV}: the bearer token of "
               "the admin POSTs and the key of the restricted APIs"),
)
_BY_NAME = {a.name: a for a in ANNOTATIONS}


@dataclass(frozen=True)
class Options:
    """How the injector runs (flags of ``sidecar inject`` / ``sidecar webhook``)."""

    image: str = DEFAULT_IMAGE
    mode: str = "auto"  # auto: native when kubernetes_version >= NATIVE_SINCE
    kubernetes_version: tuple[int, int] = NATIVE_SINCE
    require_opt_in: bool = False  # the webhook injects only pods annotated inject: "true"

    @property
    def native(self) -> bool:
        return self.mode == "native" or (self.mode == "auto" and self.kubernetes_version >= NATIVE_SINCE)


@dataclass
class PodSettings:
    """Options and annotations of one pod, checked, before looking at its containers."""

    image: str
    native: bool
    sleep_action: bool
    container: str | None = None
    protocol: str | None = None
    http_port: int | None = None
    grpc_port: int | None = None
    shutdown_delay: float = DEFAULT_SHUTDOWN_DELAY
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    admin_token_secret: str | None = None
    grpc_probes: bool = False
    config: dict[str, str] = field(default_factory=dict)  # configuration key -> value

    @property
    def drain_seconds(self) -> int:
        """How long the model server must outlive SIGTERM to the pod: the sidecar's whole drain."""
        return math.ceil(self.shutdown_delay + self.shutdown_grace)

    @property
    def termination_grace(self) -> int:
        # The model server's preStop sleep, then (native mode) the sidecar's own shutdown delay,
        # which starts only once the model server has exited, plus the margin.
        return self.drain_seconds + math.ceil(self.shutdown_delay) + DRAIN_MARGIN


def read_settings(annotations: Mapping[str, str], opts: Options) -> PodSettings:
    """Turn the pod's ``warm-sidecar.io/`` annotations into settings; unknown or bad ones raise."""
    s = PodSettings(image=opts.image, native=opts.native, sleep_action=opts.kubernetes_version >= SLEEP_ACTION_SINCE)
    known_keys = {k.path for k in keys()}
    for full, raw in sorted(annotations.items()):
        if not full.startswith(PREFIX):
            continue
        name = full[len(PREFIX):]
        if name.startswith(CONFIG_PREFIX):
            key = name[len(CONFIG_PREFIX):]
            if key not in known_keys:
                raise InjectError(f"annotation {full}: unknown configuration key {key!r}")
            s.config[key] = str(raw)
            continue
        if name not in _BY_NAME:
            raise InjectError(f"annotation {full}: unknown; known: {', '.join(PREFIX + n for n in _BY_NAME)}")
        try:
            value = _BY_NAME[name].check(str(raw))
        except ValueError as e:
            raise InjectError(f"annotation {full}: invalid value {raw!r}; allowed: {e}") from None
        _apply(s, name, value)
    return s


def _apply(s: PodSettings, name: str, value: str) -> None:
    annotation = _BY_NAME[name]
    if name == "image":
        s.image = value
    elif name == "mode":
        s.native = value == "native"
    elif name == "container":
        s.container = value
    elif name == "upstream-port":
        s.http_port = int(value)
    elif name == "upstream-grpc-port":
        s.grpc_port = int(value)
    elif name == "shutdown-delay":
        s.shutdown_delay = float(value)
    elif name == "shutdown-grace":
        s.shutdown_grace = float(value)
    elif name == "admin-token-secret":
        s.admin_token_secret = value
    elif name == "probes":
        s.grpc_probes = value == "grpc"
    if name == "protocol":
        s.protocol = None if value == "auto" else value
    if annotation.key:
        s.config[annotation.key] = value


def check_config(env: Mapping[str, str]) -> None:
    """Refuse settings the sidecar itself would refuse at start (exit 2), naming the key."""
    try:
        load(None, env, None)
    except ConfigError as e:
        raise InjectError(e.message) from None

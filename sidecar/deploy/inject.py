"""Put the sidecar into a pod spec, like ``istioctl kube-inject``.

What changes in an injected pod (and why):

- the sidecar container is added: a native sidecar (init container with ``restartPolicy:
  Always``) or a classic second container;
- the model container's HTTP / gRPC ports are renamed ``http-model`` / ``grpc-model`` and the
  sidecar's data ports take their old names, so a Service whose ``targetPort`` names the port
  now reaches the sidecar, with no change to the Service or its clients;
- the model container loses its readinessProbe: the sidecar's reflects the model server's
  readiness and adds warm-up to it. Its livenessProbe stays, because only the kubelet can
  restart a hung model server and the sidecar's /livez speaks only for the sidecar; its
  startupProbe stays only together with a livenessProbe, whose start it holds off while
  models load;
- the model container gets a preStop sleep as long as the sidecar's drain, so it keeps
  answering the calls the sidecar still forwards after SIGTERM; the pod's
  terminationGracePeriodSeconds is raised to cover it;
- emptyDirs for the traffic memory and /tmp (the sidecar's root filesystem is read-only), and
  the marker annotation ``warm-sidecar.io/status:
  injected`` that makes a second injection change nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .container import sidecar_config, sidecar_container, store_dir
from .detect import ModelServer, find_model_server
from .settings import (
    ADMIN_PORT,
    AGENT_PORT,
    DATA_PORT,
    GRPC_PORT,
    INJECT_KEY,
    INJECTED,
    MODEL_GRPC_PORT_NAME,
    MODEL_HTTP_PORT_NAME,
    NATIVE_SINCE,
    SHM_VOLUME,
    SIDECAR_CONTAINERS_SINCE,
    SIDECAR_NAME,
    STATUS_KEY,
    STORE_VOLUME,
    TMP_VOLUME,
    InjectError,
    Options,
    PodSettings,
    check_config,
    env_name,
    read_settings,
)

Obj = dict[str, Any]
SIDECAR_PORTS = (DATA_PORT, GRPC_PORT, ADMIN_PORT, AGENT_PORT)


@dataclass
class Outcome:
    """What happened to one pod: injected or not, and what a person should know."""

    injected: bool = False
    notes: list[str] = field(default_factory=list)


def should_inject(annotations: Obj, opts: Options) -> bool:
    wanted = str(annotations.get(INJECT_KEY, "")).strip().lower()
    if wanted == "false" or annotations.get(STATUS_KEY) == INJECTED:
        return False
    return wanted == "true" or not opts.require_opt_in


def inject_pod(metadata: Obj, spec: Obj, opts: Options) -> tuple[Obj, Obj, Outcome]:
    """Return (metadata, spec) with the sidecar, without touching the arguments.

    Raises InjectError when the pod asks for something impossible (a bad annotation, a port
    the sidecar needs already taken); a pod that simply has no model server is returned
    unchanged with a note.
    """
    outcome = Outcome()
    annotations = metadata.get("annotations") or {}
    if not should_inject(annotations, opts):
        return metadata, spec, outcome
    if any(c.get("name") == SIDECAR_NAME for c in _all_containers(spec)):
        outcome.notes.append(f"a container named {SIDECAR_NAME} is already there; left unchanged")
        return metadata, spec, outcome
    settings = read_settings(annotations, opts)
    server = find_model_server(spec.get("containers") or [], settings)
    if server is None:
        outcome.notes.append("no Triton or TF Serving container found; left unchanged")
        return metadata, spec, outcome
    _check_ports(spec)
    check_config({env_name(k): v for k, v in sidecar_config(settings, server).items()})
    _note_version(settings, opts, outcome)
    new_meta, new_spec = _injected(metadata, spec, settings, server, outcome)
    outcome.injected = True
    return new_meta, new_spec, outcome


def _injected(metadata: Obj, spec: Obj, s: PodSettings, server: ModelServer, outcome: Outcome) -> tuple[Obj, Obj]:
    """The edits themselves, on copies; everything that could refuse has been checked."""
    new_meta, new_spec = copy.deepcopy(metadata), copy.deepcopy(spec)
    model = new_spec["containers"][server.index]
    http_name, grpc_name = _rename_model_ports(model, server, outcome)
    _adjust_model_container(model, s)
    key = "initContainers" if s.native else "containers"
    new_spec[key] = [*(new_spec.get(key) or []), sidecar_container(s, server, http_name, grpc_name)]
    _add_volumes(new_spec, s)
    new_spec["terminationGracePeriodSeconds"] = max(int(new_spec.get("terminationGracePeriodSeconds", 30)),
                                                    s.termination_grace)
    new_meta["annotations"] = {**(metadata.get("annotations") or {}), STATUS_KEY: INJECTED}
    return new_meta, new_spec


def _note_version(s: PodSettings, opts: Options, outcome: Outcome) -> None:
    version = ".".join(map(str, opts.kubernetes_version))
    if s.native and opts.kubernetes_version < SIDECAR_CONTAINERS_SINCE:
        outcome.notes.append(f"native sidecar on Kubernetes {version}: init containers with restartPolicy "
                             "Always need 1.29 or newer")
    elif s.native and opts.kubernetes_version < NATIVE_SINCE:
        outcome.notes.append(f"native sidecar on Kubernetes {version}: Services reach a native sidecar's named "
                             f"ports only from 1.32; target ports {DATA_PORT} and {GRPC_PORT} by number")


def _all_containers(spec: Obj) -> list[Obj]:
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def _check_ports(spec: Obj) -> None:
    for container in _all_containers(spec):
        for port in container.get("ports") or []:
            if port.get("containerPort") in SIDECAR_PORTS:
                raise InjectError(f"container {container.get('name')!r} uses port {port['containerPort']}, "
                                  f"which the sidecar needs ({', '.join(map(str, SIDECAR_PORTS))})")


def _rename_model_ports(container: Obj, server: ModelServer, outcome: Outcome) -> tuple[str, str]:
    """Hand the model server's port names to the sidecar; return the names the sidecar takes."""
    renamed: dict[str, str] = {}
    taken = []
    for number, new_name, fallback in ((server.http_port, MODEL_HTTP_PORT_NAME, "http"),
                                       (server.grpc_port, MODEL_GRPC_PORT_NAME, "grpc")):
        port = next((p for p in container.get("ports") or [] if p.get("containerPort") == number), None)
        old_name = port.get("name") if port else None
        if port is not None:
            port["name"] = new_name
        if old_name:
            renamed[old_name] = new_name
        else:
            outcome.notes.append(f"the model server's port {number} has no name: Services reach the sidecar "
                                 f"through targetPort {fallback!r}")
        taken.append(old_name or fallback)
    _rename_probe_ports(container, renamed)
    return taken[0], taken[1]


def _rename_probe_ports(container: Obj, renamed: dict[str, str]) -> None:
    """Probes that name a port follow the rename (a probe's named port is resolved in its container)."""
    for key in ("livenessProbe", "startupProbe", "readinessProbe"):
        for handler in ("httpGet", "tcpSocket"):
            action = (container.get(key) or {}).get(handler)
            if action and action.get("port") in renamed:
                action["port"] = renamed[action["port"]]


def _adjust_model_container(container: Obj, s: PodSettings) -> None:
    container.pop("readinessProbe", None)
    if "livenessProbe" not in container:
        container.pop("startupProbe", None)
    lifecycle = container.setdefault("lifecycle", {})
    if "preStop" not in lifecycle:
        seconds = s.drain_seconds
        lifecycle["preStop"] = ({"sleep": {"seconds": seconds}} if s.sleep_action
                                else {"exec": {"command": ["sleep", str(seconds)]}})


def _add_volumes(spec: Obj, s: PodSettings) -> None:
    wanted = [(TMP_VOLUME, "64Mi")]
    if store_dir(s) is not None:  # a file store; Redis needs no volume
        wanted.insert(0, (STORE_VOLUME, "512Mi"))
    volumes = spec.setdefault("volumes", [])
    for name, size in wanted:
        if not any(v.get("name") == name for v in volumes):
            volumes.append({"name": name, "emptyDir": {"sizeLimit": size}})
    if not any(v.get("name") == SHM_VOLUME for v in volumes):
        # The workers' shared answer tier (cache.max_bytes, 256 MiB by default, and its B-tree) when workers > 1.
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "384Mi"}})

"""The sidecar container an injected pod gets, and the probes that go with it."""

from __future__ import annotations

import posixpath
from typing import Any

from .detect import ModelServer
from .settings import (
    ADMIN_PORT,
    ADMIN_PORT_NAME,
    ADMIN_TOKEN_ENV,
    AGENT_PORT,
    AGENT_PORT_NAME,
    DATA_PORT,
    GRPC_PORT,
    RESTRICTED_APIS,
    SHM_VOLUME,
    SIDECAR_NAME,
    STORE_DIR,
    STORE_VOLUME,
    TMP_VOLUME,
    PodSettings,
    env_name,
)

Obj = dict[str, Any]
DEFAULT_STORE = STORE_DIR + "/traffic.db"


def store_of(s: PodSettings) -> str:
    return s.config.get("store", DEFAULT_STORE)


def store_dir(s: PodSettings) -> str | None:
    """The directory the emptyDir goes to, or None when the store is Redis."""
    store = store_of(s)
    return None if "://" in store else posixpath.dirname(store) or "/"


def sidecar_config(s: PodSettings, server: ModelServer) -> dict[str, str]:
    """Every configuration key the injected sidecar gets, in the order a person reads them.

    The ports are spelled out although they are the defaults: `kubectl describe` then shows
    the whole contract, and an image with other defaults cannot silently move them.
    """
    config = {
        "listen": f"0.0.0.0:{DATA_PORT}",
        "grpc_listen": f"0.0.0.0:{GRPC_PORT}",
        "admin": f"0.0.0.0:{ADMIN_PORT}",
        "mesh.agent_listen": f"0.0.0.0:{AGENT_PORT}",
        "upstream.url": f"http://127.0.0.1:{server.http_port}",
        "upstream.grpc_url": f"127.0.0.1:{server.grpc_port}",
        "upstream.protocol": server.protocol,
    }
    if server.models:
        config["upstream.models"] = ",".join(server.models)
    if server.http_forward:
        config["upstream.http_header_forward_pattern"] = server.http_forward
    if server.grpc_forward:
        config["upstream.grpc_header_forward_pattern"] = server.grpc_forward
    config["store"] = store_of(s)
    if s.admin_token_secret:  # the restriction's key is the admin token, so only with one
        config["restricted_api"] = RESTRICTED_APIS
    config |= {"shutdown_delay": f"{s.shutdown_delay:g}", "shutdown_grace": f"{s.shutdown_grace:g}"}
    config |= s.config  # annotations win over everything derived
    return {k: v for k, v in config.items() if v != ""}  # "" is the default: restrict nothing


def probes(native: bool) -> Obj:
    """HTTP probes on the admin port.

    A native sidecar must report "started" without waiting for the model server: the kubelet
    starts the pod's main containers, the model server among them, only after that. Its
    startupProbe therefore asks /livez (the process listens). A classic sidecar starts beside
    the model server and asks /startupz (the model server answers), which shows in
    `kubectl get pod` while models load; its threshold allows 30 minutes of loading.
    """
    def get(path: str) -> Obj:
        return {"httpGet": {"path": path, "port": ADMIN_PORT_NAME}}

    if native:
        startup = get("/livez") | {"periodSeconds": 1, "failureThreshold": 30}
    else:
        startup = get("/startupz") | {"periodSeconds": 5, "failureThreshold": 360}
    return {
        "startupProbe": startup,
        # One failure is enough: /readyz is the sidecar's own verdict, not a flaky network check.
        "readinessProbe": get("/readyz") | {"periodSeconds": 2, "failureThreshold": 1},
        "livenessProbe": get("/livez") | {"periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
    }


def grpc_probes() -> Obj:
    """The same verdicts through `grpc.health.v1.Health` on the gRPC data port: "liveness" is
    SERVING while the process runs, "readiness" once warm. No service tells "the model server
    answers", so the startupProbe asks "liveness" in both sidecar modes."""
    def check(service: str) -> Obj:
        return {"grpc": {"port": GRPC_PORT, "service": service}}

    return {
        "startupProbe": check("liveness") | {"periodSeconds": 1, "failureThreshold": 30},
        "readinessProbe": check("readiness") | {"periodSeconds": 2, "failureThreshold": 1},
        "livenessProbe": check("liveness") | {"periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
    }


def _env(s: PodSettings, server: ModelServer) -> list[Obj]:
    env: list[Obj] = []
    if s.admin_token_secret:  # first: later values may refer to it as $(SIDECAR_ADMIN_TOKEN)
        ref = {"name": s.admin_token_secret, "key": "token"}
        env.append({"name": ADMIN_TOKEN_ENV, "valueFrom": {"secretKeyRef": ref}})
    env += [{"name": env_name(k), "value": v} for k, v in sidecar_config(s, server).items()]
    if "workers" not in s.config:
        # One data-plane worker per CPU requested (rounded up). The container has no CPU limit (below), so
        # ``auto`` would count every core of the node, and each worker holds its own ~80 MB.
        field = {"containerName": SIDECAR_NAME, "resource": "requests.cpu", "divisor": "1"}
        env.append({"name": env_name("workers"), "valueFrom": {"resourceFieldRef": field}})
    if "cache.namespace" not in s.config:
        # Pods of one ReplicaSet share cached answers; a rollout (a new template, new model files or
        # flags) starts a namespace of its own. Empty outside a Deployment: the default namespace.
        field = {"fieldPath": "metadata.labels['pod-template-hash']"}
        env.append({"name": env_name("cache.namespace"), "valueFrom": {"fieldRef": field}})
    return env


def sidecar_container(s: PodSettings, server: ModelServer, http_name: str, grpc_name: str) -> Obj:
    """The container; `http_name` / `grpc_name` are the port names Services already target."""
    container: Obj = {"name": SIDECAR_NAME, "image": s.image}
    if s.native:
        container["restartPolicy"] = "Always"  # what makes an init container a native sidecar
    container |= {
        "env": _env(s, server),
        "ports": [
            {"name": http_name, "containerPort": DATA_PORT, "protocol": "TCP"},
            {"name": grpc_name, "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": ADMIN_PORT_NAME, "containerPort": ADMIN_PORT, "protocol": "TCP"},
            {"name": AGENT_PORT_NAME, "containerPort": AGENT_PORT, "protocol": "TCP"},
        ],
        **(grpc_probes() if s.grpc_probes else probes(s.native)),
        # No CPU limit: CFS throttling would add its latency to every inference call.
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    # The root filesystem is read-only; Python's tempfile and multiprocessing still want /tmp.
    mounts = [{"name": TMP_VOLUME, "mountPath": "/tmp"}, {"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    directory = store_dir(s)
    if directory:
        mounts.insert(0, {"name": STORE_VOLUME, "mountPath": directory})
    container["volumeMounts"] = mounts
    return container

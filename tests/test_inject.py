"""`sidecar inject`: workloads in, workloads with the sidecar out, valid for Kubernetes, and
nothing else touched; injecting twice changes nothing."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from typing import Any
from unittest import mock

import pytest
import yaml

from sidecar.cli import main
from sidecar.config import load
from sidecar.deploy.container import grpc_probes
from sidecar.deploy.settings import ANNOTATIONS, PREFIX, RESTRICTED_APIS, SIDECAR_NAME, STORE_VOLUME
from tests.kube import NATIVE_OLDEST, NEWEST, ROOT, container, env_of, find_port, pod_spec, validate

Obj = dict[str, Any]

SERVICE = """\
# the Service clients use; it must come out byte for byte
apiVersion: v1
kind: Service
metadata: {name: triton}
spec:
  selector: {app: triton}
  ports:
    - {name: http, port: 8000, targetPort: http}
    - {name: grpc, port: 8001, targetPort: grpc}
"""

TRITON = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: triton}
spec:
  selector: {matchLabels: {app: triton}}
  template:
    metadata:
      labels: {app: triton}
    spec:
      containers:
        - name: triton
          image: nvcr.io/nvidia/tritonserver:24.10-py3
          args: ["tritonserver", "--model-repository=/models", "--http-port=8080", "--grpc-port", "8081"]
          ports:
            - {name: http, containerPort: 8080}
            - {name: grpc, containerPort: 8081}
            - {name: metrics, containerPort: 8002}
          readinessProbe:
            httpGet: {path: /v2/health/ready, port: http}
          startupProbe:
            httpGet: {path: /v2/health/live, port: http}
            failureThreshold: 100
          livenessProbe:
            httpGet: {path: /v2/health/live, port: http}
"""

TFSERVING = """\
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: tfs}
spec:
  serviceName: tfs
  selector: {matchLabels: {app: tfs}}
  template:
    metadata:
      labels: {app: tfs}
    spec:
      containers:
        - name: server
          image: tensorflow/serving:2.16.1
          env: [{name: MODEL_NAME, value: resnet}]
          ports:
            - {containerPort: 8500}
            - {containerPort: 8501}
          readinessProbe:
            tcpSocket: {port: 8500}
"""

POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: custom
  annotations:
    warm-sidecar.io/protocol: tfserving
    warm-sidecar.io/container: model
    warm-sidecar.io/upstream-port: "7001"
    warm-sidecar.io/upstream-grpc-port: "7000"
    warm-sidecar.io/models: "a,b"
    warm-sidecar.io/image: registry.example/warm-sidecar:9
    warm-sidecar.io/mode: classic
    warm-sidecar.io/store: redis://redis:6379/0
    warm-sidecar.io/cache-models: "*"
    warm-sidecar.io/cache-redis: redis://redis:6379/1
    warm-sidecar.io/batch-models: auto
    warm-sidecar.io/gate-policy: reject
    warm-sidecar.io/restricted-api: "off"
    warm-sidecar.io/shutdown-delay: "2"
    warm-sidecar.io/shutdown-grace: "60"
    warm-sidecar.io/config.warmup.budget: "120"
spec:
  terminationGracePeriodSeconds: 300
  containers:
    - name: logger
      image: busybox
    - name: model
      image: my-own-server:1
      ports:
        - {name: rest, containerPort: 7001}
"""


def inject(text: str, *args: str) -> tuple[int, str, str]:
    """Run `sidecar inject` in-process, `text` on stdin; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch("sys.stdin", io.StringIO(text)), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        code = main(["inject", *args])
    return code, out.getvalue(), err.getvalue()


def docs(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


def injected(text: str, *args: str) -> list[Obj]:
    """Inject; the output must be valid for the Kubernetes version it is for and the newest."""
    code, out, err = inject(text, *args)
    assert code == 0, err
    target = args[args.index("--kubernetes-version") + 1] + ".0" if "--kubernetes-version" in args else NATIVE_OLDEST
    objs = docs(out)
    for obj in objs:
        for version in (target, NEWEST):
            validate(obj, version)
    return objs


def test_triton_deployment_gets_a_native_sidecar() -> None:
    (d,) = injected(TRITON)
    spec = pod_spec(d)
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == SIDECAR_NAME and sidecar["restartPolicy"] == "Always"
    env = env_of(sidecar)
    assert env["SIDECAR_UPSTREAM_URL"] == "http://127.0.0.1:8080"  # from --http-port=8080
    assert env["SIDECAR_UPSTREAM_GRPC_URL"] == "127.0.0.1:8081"  # from --grpc-port 8081
    assert env["SIDECAR_UPSTREAM_PROTOCOL"] == "triton"
    assert env["SIDECAR_STORE"].startswith("/var/lib/warm-sidecar/")
    assert {"name": STORE_VOLUME, "emptyDir": {"sizeLimit": "512Mi"}} in spec["volumes"]
    assert {"name": "warm-sidecar-tmp", "mountPath": "/tmp"} in sidecar["volumeMounts"]
    assert d["spec"]["template"]["metadata"]["annotations"] == {"warm-sidecar.io/status": "injected"}
    load(None, env, None)  # the sidecar would start with these settings


def test_the_model_servers_forwarded_headers_and_the_fleet_namespace_reach_the_sidecar() -> None:
    """Headers Triton turns into model parameters become part of each call's identity in the sidecar; pods of
    one ReplicaSet share cached answers, a rollout does not."""
    flags = '"--http-header-forward-pattern=^x-tenant", "--grpc-header-forward-pattern", "x-user-.*", '
    (d,) = injected(TRITON.replace('"--model-repository=/models", ', '"--model-repository=/models", ' + flags))
    (sidecar,) = pod_spec(d)["initContainers"]
    env = env_of(sidecar)
    assert env["SIDECAR_UPSTREAM_HTTP_HEADER_FORWARD_PATTERN"] == "^x-tenant"
    assert env["SIDECAR_UPSTREAM_GRPC_HEADER_FORWARD_PATTERN"] == "x-user-.*"
    namespace = next(e for e in sidecar["env"] if e["name"] == "SIDECAR_CACHE_NAMESPACE")
    assert namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.labels['pod-template-hash']"}}


def test_named_ports_move_to_the_sidecar() -> None:
    objs = injected(SERVICE + "---\n" + TRITON)
    service, deployment = objs
    spec = pod_spec(deployment)
    model = container(spec, "triton")
    assert [p["name"] for p in model["ports"]] == ["http-model", "grpc-model", "metrics"]
    # The Service is unchanged, and its named target ports now land on the sidecar.
    assert {p["targetPort"]: find_port(spec, p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (SIDECAR_NAME, 9000), "grpc": (SIDECAR_NAME, 9001)}


def test_probes_move_to_the_sidecar() -> None:
    (d,) = injected(TRITON)
    spec = pod_spec(d)
    model, sidecar = container(spec, "triton"), container(spec, SIDECAR_NAME)
    assert "readinessProbe" not in model
    # Liveness stays with the model server (only the kubelet can restart it), following the
    # port rename; the startupProbe stays because it holds liveness off while models load.
    assert model["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http-model"}
    assert model["startupProbe"]["httpGet"]["port"] == "http-model"
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "sidecar-admin"}
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/livez"  # native: must not wait for the model server
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/livez"


def test_grpc_probes_on_request() -> None:
    text = TRITON.replace("      labels: {app: triton}\n", "      labels: {app: triton}\n      annotations:\n"
                          "        warm-sidecar.io/probes: grpc\n")
    (d,) = injected(text)
    sidecar = container(pod_spec(d), SIDECAR_NAME)
    assert {k: sidecar[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")} == grpc_probes()
    assert sidecar["readinessProbe"]["grpc"] == {"port": 9001, "service": "readiness"}


def test_startup_probe_goes_when_there_is_no_liveness_probe() -> None:
    text = TRITON.replace("""          livenessProbe:
            httpGet: {path: /v2/health/live, port: http}
""", "")
    (d,) = injected(text)
    model = container(pod_spec(d), "triton")
    assert "startupProbe" not in model and "readinessProbe" not in model


def test_drain_timing() -> None:
    (d,) = injected(TRITON)
    spec = pod_spec(d)
    # The sidecar drains for shutdown_delay + shutdown_grace; the model server outlives that.
    assert container(spec, "triton")["lifecycle"]["preStop"] == {"sleep": {"seconds": 35}}
    assert spec["terminationGracePeriodSeconds"] == 50
    (d,) = injected(TRITON, "--kubernetes-version", "1.29")  # no sleep action by default before 1.30
    assert container(pod_spec(d), "triton")["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "35"]}}


def test_tfserving_statefulset_in_classic_mode() -> None:
    (s,) = injected(TFSERVING, "--mode", "classic", "--kubernetes-version", "1.29")
    spec = pod_spec(s)
    assert "initContainers" not in spec
    model, sidecar = spec["containers"]
    assert "restartPolicy" not in sidecar and sidecar["startupProbe"]["httpGet"]["path"] == "/startupz"
    env = env_of(sidecar)
    assert env["SIDECAR_UPSTREAM_PROTOCOL"] == "tfserving"
    assert env["SIDECAR_UPSTREAM_URL"] == "http://127.0.0.1:8501"
    assert env["SIDECAR_UPSTREAM_GRPC_URL"] == "127.0.0.1:8500"
    assert env["SIDECAR_UPSTREAM_MODELS"] == "resnet"  # the image's MODEL_NAME
    # Unnamed ports get names; Services must target the sidecar's by name.
    assert [p.get("name") for p in model["ports"]] == ["grpc-model", "http-model"]
    assert [p["name"] for p in sidecar["ports"][:2]] == ["http", "grpc"]


def test_kubernetes_before_1_32_gets_a_classic_sidecar() -> None:
    """Before 1.32 a Service's named targetPort does not reach a native sidecar's port."""
    (d,) = injected(TRITON, "--kubernetes-version", "1.31")
    assert "initContainers" not in pod_spec(d)
    assert container(pod_spec(d), SIDECAR_NAME)["startupProbe"]["httpGet"]["path"] == "/startupz"


@pytest.mark.parametrize(("version", "note"), [
    ("1.30", "Services reach a native sidecar's named ports only from 1.32; target ports 9000 and 9001 by number"),
    ("1.28", "init containers with restartPolicy Always need 1.29 or newer"),
])
def test_native_mode_on_older_kubernetes_says_what_breaks(version: str, note: str) -> None:
    code, out, err = inject(TRITON, "--mode", "native", "--kubernetes-version", version)
    assert code == 0 and "restartPolicy: Always" in out
    assert note in err


def test_annotations_are_honoured() -> None:
    code, out, err = inject(POD)
    assert code == 0, err
    (pod,) = docs(out)
    for version in (NATIVE_OLDEST, NEWEST):
        validate(pod, version)
    spec = pod["spec"]
    assert [c["name"] for c in spec["containers"]] == ["logger", "model", SIDECAR_NAME]  # classic
    sidecar = spec["containers"][2]
    assert sidecar["image"] == "registry.example/warm-sidecar:9"
    # A Redis store needs no emptyDir; /tmp still does (read-only root filesystem), and /dev/shm holds the
    # workers' one answer tier.
    assert sidecar["volumeMounts"] == [{"name": "warm-sidecar-tmp", "mountPath": "/tmp"},
                                       {"name": "warm-sidecar-shm", "mountPath": "/dev/shm"}]
    assert spec["volumes"] == [{"name": "warm-sidecar-tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                               {"name": "warm-sidecar-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "384Mi"}}]
    env = env_of(sidecar)
    assert env == env | {
        "SIDECAR_UPSTREAM_URL": "http://127.0.0.1:7001", "SIDECAR_UPSTREAM_GRPC_URL": "127.0.0.1:7000",
        "SIDECAR_UPSTREAM_PROTOCOL": "tfserving", "SIDECAR_UPSTREAM_MODELS": "a,b",
        "SIDECAR_STORE": "redis://redis:6379/0", "SIDECAR_CACHE_MODELS": "*",
        "SIDECAR_CACHE_REDIS": "redis://redis:6379/1", "SIDECAR_BATCH_MODELS": "auto",
        "SIDECAR_GATE_POLICY": "reject", "SIDECAR_SHUTDOWN_DELAY": "2", "SIDECAR_SHUTDOWN_GRACE": "60",
        "SIDECAR_WARMUP_BUDGET": "120"}
    assert "SIDECAR_RESTRICTED_API" not in env
    assert spec["containers"][1]["lifecycle"]["preStop"] == {"sleep": {"seconds": 62}}
    assert spec["terminationGracePeriodSeconds"] == 300  # already longer than 62 + 2 + 10: kept
    assert spec["containers"][1]["ports"] == [{"name": "http-model", "containerPort": 7001}]
    assert sidecar["ports"][0]["name"] == "rest"  # the sidecar took the model server's port name
    assert "port 7000 has no name: Services reach the sidecar through targetPort 'grpc'" in err


def test_admin_token_secret_turns_on_the_restricted_api() -> None:
    text = TRITON.replace("      labels: {app: triton}\n", "      labels: {app: triton}\n      annotations:\n"
                          "        warm-sidecar.io/admin-token-secret: admin\n")
    (d,) = injected(text)
    sidecar = container(pod_spec(d), SIDECAR_NAME)
    token, *rest = sidecar["env"]
    assert token == {"name": "SIDECAR_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "admin", "key": "token"}}}
    # The kubelet expands $(SIDECAR_ADMIN_TOKEN) only from variables defined before it.
    assert {"name": "SIDECAR_RESTRICTED_API", "value": RESTRICTED_APIS} in rest


def test_injecting_twice_changes_nothing() -> None:
    code, once, _ = inject(SERVICE + "---\n" + TRITON + "---\n" + TFSERVING)
    assert code == 0
    code, twice, _ = inject(once)
    assert code == 0 and twice == once
    assert once.startswith(SERVICE)  # untouched documents keep their bytes, comments included


def test_other_documents_pass_through_unchanged() -> None:
    config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}  # keep me\ndata: {a: '1'}\n"
    no_server = TRITON.replace("nvcr.io/nvidia/tritonserver:24.10-py3", "nginx").replace('"tritonserver", ', "")
    no_server = no_server.replace("8080", "80").replace("8081", "81")
    opted_out = TRITON.replace("      labels: {app: triton}\n", "      labels: {app: triton}\n      annotations:\n"
                               "        warm-sidecar.io/inject: \"false\"\n")
    text = "---\n".join([config_map, no_server, opted_out])
    code, out, err = inject(text)
    assert (code, out) == (0, text)
    assert "Deployment/triton: no Triton or TF Serving container found" in err


def test_kubectl_json_list() -> None:
    items = [docs(TRITON)[0], docs(SERVICE)[0]]
    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    code, out, err = inject(text)
    assert code == 0, err
    result = json.loads(out)
    assert result["items"][1] == items[1]
    assert container(pod_spec(result["items"][0]), SIDECAR_NAME)


@pytest.mark.parametrize(("annotation", "value", "message"), [
    ("warm-sidecar.io/gate-policy", "wait", "annotation warm-sidecar.io/gate-policy: invalid value 'wait'"),
    ("warm-sidecar.io/upstream-port", "http", "a port number"),
    ("warm-sidecar.io/gate-polcy", "hold", "annotation warm-sidecar.io/gate-polcy: unknown"),
    ("warm-sidecar.io/config.warmup.budgte", "5", "unknown configuration key 'warmup.budgte'"),
    ("warm-sidecar.io/config.warmup.budget", "soon", "config key warmup.budget: invalid value 'soon'"),
    ("warm-sidecar.io/container", "nope", "no container named 'nope'"),
])
def test_bad_annotations_stop_with_a_message(annotation: str, value: str, message: str) -> None:
    text = TRITON.replace("      labels: {app: triton}\n", "      labels: {app: triton}\n      annotations:\n"
                          f"        {annotation}: {json.dumps(value)}\n")
    code, out, err = inject(text)
    assert (code, out) == (2, "")
    assert err.startswith("sidecar inject: Deployment/triton: ") and message in err


def test_a_port_the_sidecar_needs_is_refused() -> None:
    text = TRITON.replace("{name: metrics, containerPort: 8002}", "{name: metrics, containerPort: 9090}")
    code, _, err = inject(text)
    assert code == 2 and "uses port 9090" in err


def test_malformed_input_stops_with_a_message() -> None:
    code, out, err = inject("apiVersion: v1\nkind: [unclosed\n")
    assert (code, out) == (2, "") and "not valid YAML or JSON" in err


def test_every_annotation_is_documented() -> None:
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    for annotation in ANNOTATIONS:
        assert f"`{PREFIX}{annotation.name}`" in text, annotation.name


def test_cli_reads_stdin_and_writes_stdout() -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "inject"], input=TRITON, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (d,) = docs(result.stdout)
    assert container(pod_spec(d), SIDECAR_NAME)

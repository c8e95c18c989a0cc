"""Workload objects and YAML/JSON streams around :func:`inject_pod`.

A document that is not changed is written back byte for byte, so comments and formatting of
everything the injector leaves alone survive, and injecting twice gives the same text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .inject import inject_pod
from .settings import InjectError, Options

Obj = dict[str, Any]
TEMPLATE_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")  # pods under spec.template
_DOCUMENT_START = re.compile(r"^---(?=[ \t\r]|$)", re.MULTILINE)


@dataclass
class Report:
    injected: list[str] = field(default_factory=list)  # "Deployment/triton"
    notes: list[str] = field(default_factory=list)


def _describe(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('name') or meta.get('generateName') or '?'}"


def inject_object(obj: Any, opts: Options, report: Report) -> Obj | None:
    """The object with the sidecar in its pods, or None when nothing changed."""
    if not isinstance(obj, dict):
        return None
    kind = obj.get("kind")
    if kind == "List":
        items = [inject_object(item, opts, report) for item in obj.get("items") or []]
        if all(i is None for i in items):
            return None
        return {**obj, "items": [new or old for new, old in zip(items, obj["items"], strict=True)]}
    if kind == "Pod":
        return _inject_at(obj, [], opts, report)
    if kind in TEMPLATE_KINDS:
        return _inject_at(obj, ["spec", "template"], opts, report)
    return None


def _inject_at(obj: Obj, path: list[str], opts: Options, report: Report) -> Obj | None:
    holder: Any = obj
    for key in path:
        holder = holder.get(key) if isinstance(holder, dict) else None
    if not isinstance(holder, dict) or not isinstance(holder.get("spec"), dict):
        return None
    name = _describe(obj)
    try:
        meta, spec, outcome = inject_pod(holder.get("metadata") or {}, holder["spec"], opts)
    except InjectError as e:
        raise InjectError(f"{name}: {e}") from None
    report.notes.extend(f"{name}: {note}" for note in outcome.notes)
    if not outcome.injected:
        return None
    report.injected.append(name)
    result = dict(obj)
    target = result
    for key in path:  # copy along the path, never mutate the caller's object
        target[key] = dict(target[key])
        target = target[key]
    target["metadata"], target["spec"] = meta, spec
    return result


def split_documents(text: str) -> list[str]:
    """The stream cut at each `---` line; joining the parts gives the text back."""
    starts = [m.start() for m in _DOCUMENT_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def _dump(obj: Obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=4096)


def inject_text(text: str, opts: Options) -> tuple[str, Report]:
    """Inject every workload of a YAML (multi-document) or JSON stream."""
    report = Report()
    if text.lstrip().startswith(("{", "[")):
        obj = json.loads(text)
        new = inject_object(obj, opts, report)
        return (text if new is None else json.dumps(new, indent=2) + "\n"), report
    parts = []
    for chunk in split_documents(text):
        new = inject_object(yaml.safe_load(chunk), opts, report)
        if new is None:
            parts.append(chunk)
            continue
        head = "---\n" if _DOCUMENT_START.match(chunk) else ""
        parts.append(head + _dump(new))
    return "".join(parts), report

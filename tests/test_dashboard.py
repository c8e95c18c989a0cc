"""The Grafana dashboard (k8s/monitoring/warm-sidecar-dashboard.json): a well-formed dashboard whose
every query names series the sidecar really exports, shipped as the ConfigMap Grafana's sidecar loads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from sidecar.app import Sidecar
from sidecar.config import load
from tests.kube import K8S, render

Obj = dict[str, Any]
DASHBOARD = K8S / "monitoring" / "warm-sidecar-dashboard.json"
# Every pod-level series the dashboard reads is filtered by the pod pickers.
POD_MATCHERS = ('namespace=~"$namespace"', 'pod=~"$pod"')
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}
# PromQL's functions and aggregations the dashboard may call (a misspelt one fails as an unknown name).
FUNCTIONS = {"sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev", "rate", "irate",
             "increase", "delta", "deriv", "histogram_quantile", "clamp_min", "clamp_max", "abs", "ceil", "floor",
             "round", "avg_over_time", "max_over_time", "min_over_time", "label_replace", "vector", "scalar",
             "absent", "time"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


@pytest.fixture(scope="module")
def dashboard() -> Obj:
    data: Obj = json.loads(DASHBOARD.read_text())
    return data


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every series name the sidecar exports: its own registry plus the cache and model-book collectors
    the composition root registers, as /metrics writes them (histograms as _bucket/_sum/_count)."""
    store = tmp_path_factory.mktemp("dashboard") / "store.db"
    text = Sidecar(load({"store": str(store), "workers": "1"}, {}, {})).metrics.render().decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    return names


def _panels(dashboard: Obj) -> list[Obj]:
    """Top-level panels and those inside collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def _queries(dashboard: Obj) -> list[str]:
    """Every PromQL expression: the panels' targets, and the series selectors of the variables'
    `label_values(SELECTOR, LABEL)` (Grafana's, not PromQL: its second argument is a label name)."""
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q["query"] if isinstance(q, dict) else q)
            assert m is not None, var["name"]
            exprs.append(m[1])
    return exprs


def _selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, label matchers) of each series selector: a name optionally followed by {...}."""
    return [(m[1], m[2] or "") for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?", expr)]


def _blank_strings(expr: str) -> str:
    """Quoted strings removed, so a label value never reads as a name."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: every identifier that is not a function, keyword,
    label name (in a matcher or a grouping clause) or range."""
    text = _blank_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, [$__rate_interval]
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = m[1], m[2]
        if call:
            assert word in FUNCTIONS, f"unknown PromQL function {word!r} in {expr}"
        elif word not in KEYWORDS:
            names.add(word)
    return names


def test_metric_names_are_found() -> None:
    """The parser above finds names, and only names."""
    expr = ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{pod=~"$pod", x="b_c"}[$__rate_interval]))) '
            '/ on (namespace, pod) group_left () sum(c_total) and d')
    assert metric_names(expr) == {"a_bucket", "c_total", "d"}
    with pytest.raises(AssertionError, match="sun"):
        metric_names("sun(a)")


def test_is_a_well_formed_dashboard(dashboard: Obj) -> None:
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("x", "y", "w", "h")), panel["title"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel.get("collapsed"):
            continue  # a collapsed row's panels are placed when it opens
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        mine = {(i, j) for i in range(x, x + w) for j in range(y, y + h)}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], panel["title"]


def test_templating_variables_are_defined_and_used(dashboard: Obj) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert len(variables) == len(dashboard["templating"]["list"])
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "pod"} <= set(variables)
    text = json.dumps(dashboard["panels"]) + json.dumps([v.get("query") for v in variables.values()])
    used = set(re.findall(r"\$\{?(\w+)", text))
    assert used - BUILTIN_VARIABLES <= set(variables), "a query uses an undefined variable"
    assert set(variables) <= used, "a variable no panel uses"
    for name, var in variables.items():
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name


def test_every_query_names_exported_series(dashboard: Obj, exported: set[str]) -> None:
    used: set[str] = set()
    for expr in _queries(dashboard):
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, (sorted(names - exported), expr)
        used |= names
    # What the issue asks the dashboard to show.
    for wanted in ("sidecar_state", "sidecar_warmup_progress", "sidecar_model_share", "sidecar_cache_requests_total",
                   "sidecar_batch_size_bucket", "sidecar_queue_depth", "sidecar_request_duration_seconds_bucket",
                   "sidecar_gated_total", "sidecar_upstream_errors_total"):
        assert wanted in used, wanted


def test_panel_queries_follow_the_pod_pickers(dashboard: Obj) -> None:
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            selectors = [(m, s) for m, s in _selectors(target["expr"]) if m.startswith("sidecar_")]
            assert selectors, target["expr"]
            for metric, matchers in selectors:
                assert all(m in matchers for m in POD_MATCHERS), (panel["title"], metric)


def test_shipped_as_a_grafana_sidecar_configmap() -> None:
    (cm,) = [o for o in render(K8S / "monitoring") if o["metadata"]["name"] == "warm-sidecar-dashboard"]
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert cm["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
    # kubectl apply keeps a copy in an annotation, limited to 256 KiB.
    assert len(DASHBOARD.read_bytes()) < 200_000


def test_kubernetes_docs_name_the_dashboard() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "kubernetes.md").read_text()
    assert DASHBOARD.name in docs

"""k8s/monitoring/: the PodMonitor and PrometheusRule validate against the pinned prometheus-operator v0.93.0 CRDs,
the Grafana dashboard against Grafana's v11.6 schema, and every series they query is one that is exported.

Exported names: a metric declared in serve_app/serving/metrics.py as `chatterbox_x` reaches Prometheus as
`ray_chatterbox_x` (Ray's metrics agent prefixes the `ray` namespace, ray/_private/telemetry and metrics_agent.py);
histograms as `_bucket`/`_sum`/`_count`, counters (ours end in `_total`) unchanged, gauges unchanged. Ray Serve's
built-in metrics are `ray_serve_*`, checked against the installed Ray's source (without importing Ray).
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from k8s_schemas import ROOT, dashboard_errors, object_errors, schemas_dir, skip_reason

MONITORING = ROOT / "k8s" / "monitoring"
METRICS_PY = ROOT / "serve_app" / "serving" / "metrics.py"
needs_schemas = pytest.mark.skipif(schemas_dir() is None, reason=skip_reason())

# Labels every series carries besides a metric's own tag_keys: Ray Serve's default tags, Ray's, the scrape's.
COMMON_LABELS = {"application", "deployment", "replica", "le", "namespace", "pod", "instance", "job",
                 "ray_io_cluster", "ray_io_node_type", "SessionName", "NodeAddress", "Version"}
_KINDS = {"Histogram": "histogram", "Counter": "counter", "Gauge": "gauge"}


def declared_metrics() -> dict[str, tuple[str, set[str]]]:
    """`chatterbox_*` name -> (kind, tag keys), read from metrics.py's source (no ray import)."""
    tree = ast.parse(METRICS_PY.read_text())
    alias = {k: k for k in _KINDS}
    for node in ast.walk(tree):  # H, C, G = serve_metrics.Histogram, serve_metrics.Counter, serve_metrics.Gauge
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], (ast.Tuple, ast.Name)):
            targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else [node.targets[0]]
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for t, v in zip(targets, values):
                name = v.attr if isinstance(v, ast.Attribute) else getattr(v, "id", None)
                if isinstance(t, ast.Name) and name in _KINDS:
                    alias[t.id] = name
    out: dict[str, tuple[str, set[str]]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str) and node.args[0].value.startswith("chatterbox_")):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        assert func in alias, f"metrics.py: cannot tell the kind of {node.args[0].value} (called through {func})"
        tags: set[str] = set()
        for kw in node.keywords:
            if kw.arg == "tag_keys":
                tags = {e.value for e in kw.value.elts}
        out[node.args[0].value] = (_KINDS[alias[func]], tags)
    return out


def exported_series() -> dict[str, tuple[str, str, set[str]]]:
    """Prometheus series name -> (declared name, kind, tag keys)."""
    out = {}
    for name, (kind, tags) in declared_metrics().items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[f"ray_{name}{suffix}"] = (name, kind, tags)
        elif kind == "counter":
            out[f"ray_{name}" if name.endswith("_total") else f"ray_{name}_total"] = (name, kind, tags)
        else:
            out[f"ray_{name}"] = (name, kind, tags)
    return out


def ray_serve_metric_names() -> set[str]:
    """`serve_*` metric names in the installed Ray Serve's source; f-string protocols expanded."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    src = Path(list(spec.submodule_search_locations)[0]) / "serve" / "_private"
    names = set()
    for path in src.glob("*.py"):
        for lit in re.findall(r"""f?["'](serve_[a-z_{}]+)["']""", path.read_text()):
            names |= {lit.replace("{protocol_name}", p) for p in ("http", "grpc")}
    return names


def promql_texts() -> list[tuple[str, str]]:
    """(where, expr) for every rule and dashboard target."""
    out = []
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            out.append((f"rule {r.get('alert') or r.get('record')}", r["expr"]))
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {t['refId']}", t["expr"]))
    return out


# -- schemas ----------------------------------------------------------------------------------------------------


@needs_schemas
@pytest.mark.parametrize("name", ["podmonitor.yaml", "prometheusrule.yaml"])
def test_monitoring_objects_are_valid(name: str) -> None:
    docs = [d for d in yaml.safe_load_all((MONITORING / name).read_text()) if d]
    assert docs
    for doc in docs:
        assert object_errors(doc) == [], name


@needs_schemas
def test_a_typo_fails_prometheus_operator_validation() -> None:
    pm = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    pm["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert any("'intervall' was unexpected" in e for e in object_errors(pm))
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    rule["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    assert any("rules/0/for" in e for e in object_errors(rule))


@needs_schemas
def test_dashboard_is_valid_grafana_11_6() -> None:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dashboard_errors(dash) == []
    bad = copy.deepcopy(dash)
    bad["panels"][1]["gridPos"]["w"] = 30
    bad["panels"][1]["titel"] = "typo"
    assert dashboard_errors(bad)
    bad = copy.deepcopy(dash)
    bad["refreshh"] = "30s"
    assert any("'refreshh' was unexpected" in e for e in dashboard_errors(bad))


def test_dashboard_is_the_rendered_one() -> None:
    spec = importlib.util.spec_from_file_location("k8s_dashboard", MONITORING / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (MONITORING / "grafana-dashboard.json").read_text() == module.render(), \
        "grafana-dashboard.json is stale or hand-edited: run `python k8s/monitoring/dashboard.py`"


def test_dashboard_layout() -> None:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("request rate", "stage latency", "time to first audio", "real-time factor", "batch", "queue",
                  "vram"):
        assert topic in titles, topic


# -- the series exist ------------------------------------------------------------------------------------------------


def test_metrics_module_declares_project_metrics() -> None:
    declared = declared_metrics()
    assert len(declared) >= 10
    for name, (kind, _) in declared.items():
        assert re.fullmatch(r"chatterbox_[a-z0-9_]+", name)
        assert (kind == "counter") == name.endswith("_total"), f"{name}: only counters end in _total"


def test_every_series_queried_is_exported() -> None:
    series, serve = exported_series(), ray_serve_metric_names()
    used_project, problems = set(), []
    for where, expr in promql_texts():
        for name in re.findall(r"\b(ray_[a-zA-Z0-9_]+)", expr):
            if name.startswith("ray_chatterbox_"):
                if name not in series:
                    problems.append(f"{where}: {name} is not exported by serve_app/serving/metrics.py "
                                    f"(declared: {sorted(declared_metrics())})")
                used_project.add(name)
            elif name.startswith("ray_serve_"):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name[len("ray_"):])
                if base not in serve:
                    problems.append(f"{where}: {name} is not a Ray Serve metric in the installed Ray")
            elif name not in ("ray_io_cluster", "ray_io_node_type"):
                problems.append(f"{where}: unknown series {name}")
    assert not problems, "\n".join(problems)
    assert used_project, "no chatterbox metric is queried"


def test_label_matchers_use_declared_tags() -> None:
    series, problems = exported_series(), []
    for where, expr in promql_texts():
        for name, body in re.findall(r"\b(ray_chatterbox_[a-z0-9_]+)\{([^}]*)\}", expr):
            if name not in series:
                continue  # reported by test_every_series_queried_is_exported
            allowed = series[name][2] | COMMON_LABELS
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body):
                if label not in allowed:
                    problems.append(f"{where}: {name} has no label {label!r} (tags: {sorted(series[name][2])})")
        names = set(re.findall(r"\b(ray_chatterbox_[a-z0-9_]+)", expr))
        if names and names <= set(series) and "ray_serve_" not in expr:
            allowed = set().union(*(series[n][2] for n in names)) | COMMON_LABELS
            for group in re.findall(r"\bby \(([^)]*)\)", expr):
                for label in (x.strip() for x in group.split(",")):
                    if label not in allowed:
                        problems.append(f"{where}: grouping by {label!r}, which {sorted(names)} lack")
    assert not problems, "\n".join(problems)


def test_promql_shapes() -> None:
    series, problems = exported_series(), []
    for where, expr in promql_texts():
        for open_, close in ("()", "[]", "{}"):
            if expr.count(open_) != expr.count(close):
                problems.append(f"{where}: unbalanced {open_}{close}")
        for name in re.findall(r"\b(?:rate|increase)\((ray_chatterbox_[a-z0-9_]+)", expr):
            if name in series and series[name][1] == "gauge":
                problems.append(f"{where}: rate() of the gauge {name}")
        for name in re.findall(r"\bderiv\((ray_chatterbox_[a-z0-9_]+)", expr):
            if name in series and series[name][1] != "gauge":
                problems.append(f"{where}: deriv() of the non-gauge {name}")
        if "histogram_quantile" in expr:
            if "_bucket" not in expr or not re.search(r"by \(le\b", expr):
                problems.append(f"{where}: histogram_quantile needs rate(..._bucket) summed by (le, ...)")
        for name in re.findall(r"\b(ray_chatterbox_[a-z0-9_]+_bucket)\b", expr):
            if "histogram_quantile" not in expr:
                problems.append(f"{where}: {name} used outside histogram_quantile")
    assert not problems, "\n".join(problems)


def test_metric_check_bites() -> None:
    series = exported_series()
    assert "ray_chatterbox_time_to_first_audio_seconds_bucket" in series
    assert "ray_chatterbox_requests_total" in series
    assert "ray_chatterbox_time_to_first_audio_seconds" not in series  # a histogram has no bare series
    assert "chatterbox_requests_total" not in series  # Ray adds the prefix
    assert "serve_deployment_queued_queries" in ray_serve_metric_names()


# -- alerts ------------------------------------------------------------------------------------------------------


def test_alerts_cover_the_failure_modes() -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    for a in alerts:
        assert a["labels"]["severity"] in ("warning", "critical"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
        assert re.fullmatch(r"\d+[smh]", a["for"]), a["alert"]
    exprs = {a["alert"]: a["expr"] for a in alerts}

    def uses(metric: str) -> bool:
        return any(metric in e for e in exprs.values())

    assert uses("ray_chatterbox_time_to_first_audio_seconds_bucket")       # p95 time to first audio
    assert any('status=~"5.."' in e for e in exprs.values())               # 5xx error rate
    assert uses("ray_chatterbox_gpu_memory_budget_bytes")                  # VRAM over its budget
    assert uses("ray_serve_deployment_queued_queries")                     # queue growing
    assert uses("ray_serve_deployment_replica_healthy")                    # no healthy replica


def test_podmonitor_selects_the_ray_pods() -> None:
    pm = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    rs = yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    selector = pm["spec"]["selector"]["matchLabels"]
    for group in [rs["headGroupSpec"], *rs["workerGroupSpecs"]]:
        template = group["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        for endpoint in pm["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports
            assert str(ports[endpoint["port"]]) == group["rayStartParams"]["metrics-export-port"]

"""Offline validation of the k8s/ files against pinned schemas (used by tests/unit/test_k8s_*.py).

Schemas come from `$CHATTERBOX_SCHEMAS_DIR`, else `../shared/schemas` beside the repo root: KubeRay v1.7.0 and
prometheus-operator v0.93.0 CRDs, and Grafana's v11.6 dashboard JSON schema. A CRD's `openAPIV3Schema` is made
into a JSON Schema that validates the way the API server does with strict field validation: unknown fields fail
(`additionalProperties: false` wherever `properties` are listed and `x-kubernetes-preserve-unknown-fields` is
not set), `x-kubernetes-int-or-string` takes an integer or a string, `nullable` allows null. CEL rules
(`x-kubernetes-validations`) are not evaluated; the KubeRay operator's own checks are in `kuberay_errors`.
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS_ENV = "CHATTERBOX_SCHEMAS_DIR"

CRD_FILES = {
    ("ray.io/v1", "RayService"): "kuberay-v1.7.0/ray.io_rayservices.yaml",
    ("ray.io/v1", "RayCluster"): "kuberay-v1.7.0/ray.io_rayclusters.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator-v0.93.0/monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"):
        "prometheus-operator-v0.93.0/monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"):
        "prometheus-operator-v0.93.0/monitoring.coreos.com_prometheusrules.yaml",
}
GRAFANA_FILE = "grafana-dashboard-v11.6/dashboard.jsonschema.json"

_DROP = {"description", "default", "example", "externalDocs", "nullable"}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
MAX_RAYSERVICE_NAME = 47


def schemas_dir() -> Path | None:
    """Where the pinned schemas are, or None (tests then skip, naming both places)."""
    d = Path(os.environ.get(SCHEMAS_ENV) or ROOT.parent / "shared" / "schemas")
    return d if (d / CRD_FILES[("ray.io/v1", "RayService")]).is_file() else None


def skip_reason() -> str:
    return (f"pinned schemas not found: set {SCHEMAS_ENV} to a folder holding {', '.join(sorted({f.split('/')[0] for f in CRD_FILES.values()}))} "
            f"and {GRAFANA_FILE.split('/')[0]} (default: {ROOT.parent / 'shared' / 'schemas'})")


def _python_regex(pattern: str) -> str:
    """Go's RE2 takes inline flags anywhere (`^(?i)(abort|warn)?$`); Python wants them first."""
    inline = re.compile(r"\(\?([a-zA-Z]+)\)")
    flags = "".join(inline.findall(pattern))
    return f"(?{flags})" + inline.sub("", pattern) if flags else pattern


def openapi_to_jsonschema(node: Any) -> Any:
    """A CRD's OpenAPI v3 (structural) schema -> a strict JSON Schema (draft 7)."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = openapi_to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [openapi_to_jsonschema(sub) for sub in value]
        elif key == "pattern":
            out[key] = _python_regex(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
        out.pop("anyOf", None)
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    for bound in ("Minimum", "Maximum"):  # OpenAPI 3.0 booleans -> draft-7 numbers
        flag = out.get(f"exclusive{bound}")
        if isinstance(flag, bool):
            del out[f"exclusive{bound}"]
            if flag and bound.lower() in out:
                out[f"exclusive{bound}"] = out.pop(bound.lower())
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    """Validator for a whole object of this kind (the CRD's storage version)."""
    d = schemas_dir()
    if d is None:
        raise FileNotFoundError(skip_reason())
    crd = yaml.load((d / CRD_FILES[(api_version, kind)]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    if crd["spec"]["group"] != group or crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"{CRD_FILES[(api_version, kind)]} is not the CRD of {api_version} {kind}")
    storage = [v for v in crd["spec"]["versions"] if v.get("storage")]
    if len(storage) != 1 or storage[0]["name"] != version:
        raise ValueError(f"{kind}: storage version is {[v['name'] for v in storage]}, the manifests use {version}")
    schema = openapi_to_jsonschema(storage[0]["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@lru_cache(maxsize=1)
def grafana_validator() -> jsonschema.Draft7Validator:
    d = schemas_dir()
    if d is None:
        raise FileNotFoundError(skip_reason())
    schema = json.loads((d / GRAFANA_FILE).read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _messages(validator: jsonschema.Draft7Validator, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


def object_errors(obj: dict[str, Any]) -> list[str]:
    """Schema errors of one Kubernetes object of a pinned kind, plus basic ObjectMeta checks."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in CRD_FILES:
        return [f"no pinned schema for apiVersion={key[0]} kind={key[1]}"]
    errors = _messages(crd_validator(*key), obj)
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    if not (isinstance(name, str) and len(name) <= 253 and _DNS_LABEL.fullmatch(name)):
        errors.append(f"metadata/name: {name!r} is not a lowercase DNS name")
    for k, v in (meta.get("labels") or {}).items():
        if not isinstance(v, str) or len(v) > 63:
            errors.append(f"metadata/labels/{k}: label values are strings of at most 63 characters")
    if obj.get("kind") in ("RayService", "RayCluster"):
        errors += kuberay_errors(obj)
    return errors


def kuberay_errors(obj: dict[str, Any]) -> list[str]:
    """Checks the KubeRay operator makes on top of the CRD schema (ray-operator/controllers/ray/utils/validation.go)."""
    errors = []
    name = (obj.get("metadata") or {}).get("name", "")
    if obj["kind"] == "RayService" and len(name) > MAX_RAYSERVICE_NAME:
        errors.append(f"metadata/name: RayService name {name!r} is {len(name)} characters; KubeRay allows at most "
                      f"{MAX_RAYSERVICE_NAME}")
    spec = obj.get("spec") or {}
    cluster = spec.get("rayClusterConfig", spec) if obj["kind"] == "RayService" else spec
    if obj["kind"] == "RayService":
        try:
            serve = yaml.safe_load(spec.get("serveConfigV2") or "")
        except yaml.YAMLError as e:
            serve = None
            errors.append(f"spec/serveConfigV2: not YAML: {e}")
        if not isinstance(serve, dict) or not serve.get("applications"):
            errors.append("spec/serveConfigV2: must be a Serve config with an `applications` list")
    groups = cluster.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names):
        errors.append(f"workerGroupSpecs: group names must be unique, got {names}")
    for g in groups:
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        if not all(isinstance(n, int) for n in (lo, hi, g.get("replicas", lo))):
            continue  # the schema reports the type
        if lo > hi:
            errors.append(f"workerGroupSpecs[{g.get('groupName')}]: minReplicas={lo} exceeds maxReplicas={hi}")
        if "replicas" in g and not lo <= g["replicas"] <= hi:
            errors.append(f"workerGroupSpecs[{g.get('groupName')}]: replicas={g['replicas']} is outside "
                          f"[minReplicas={lo}, maxReplicas={hi}]")
    for where, group in [("headGroupSpec", cluster.get("headGroupSpec") or {}), *(
            (f"workerGroupSpecs[{g.get('groupName')}]", g) for g in groups)]:
        containers = (((group.get("template") or {}).get("spec") or {}).get("containers")) or []
        if not containers:
            errors.append(f"{where}: the pod template needs a Ray container (the first one)")
    return errors


def dashboard_errors(dashboard: dict[str, Any]) -> list[str]:
    return _messages(grafana_validator(), dashboard)

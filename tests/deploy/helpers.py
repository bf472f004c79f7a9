"""Readers of the deployment files (Dockerfile, Kubernetes manifests, Prometheus rules, the
Grafana dashboard) and small tool wrappers, shared by the tests of this folder."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKER_DIR = REPO / "deploy" / "docker"
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("gpu", "cpu")
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
MONITORING = REPO / "deploy" / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
ALERT_TESTS = sorted((MONITORING / "tests").glob("*.yml"))
DASHBOARD = MONITORING / "grafana" / "dashboards" / "trex-serve.json"
GRAFANA_PROVISIONING = MONITORING / "grafana" / "provisioning"
COMPOSE = MONITORING / "docker-compose.yml"
COMPOSE_GPU = MONITORING / "docker-compose.gpu.yml"
LOAD_SCRIPT = MONITORING / "load.py"
HEALTHCHECK = DOCKER_DIR / "healthcheck.py"
NODE_DIR = Path(__file__).resolve().parent / "node"

SETUP_HINT = "run .ci/system-packages (with the project's venv active) to install it"


# --- tools -------------------------------------------------------------------------------


def require_tool(name: str) -> str:
    """The path of a command-line tool; fails the test, naming the fix, when it is missing.
    These tests check files against real tools, so a missing tool is a failure, not a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {SETUP_HINT}")
    return path


def run_tool(args: list, timeout_s: float = 120, **kwargs) -> subprocess.CompletedProcess:
    require_tool(str(args[0]))
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=kwargs.pop("cwd", REPO),
        **kwargs,
    )


# --- project ------------------------------------------------------------------------------


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# --- Kubernetes ---------------------------------------------------------------------------


def kustomize(path: Path) -> list[dict]:
    """The resources `kubectl kustomize` renders from ``path``."""
    out = run_tool(["kubectl", "kustomize", path])
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(resources: list[dict], kind: str, name: str | None = None) -> dict:
    found = [r for r in resources if r["kind"] == kind and name in (None, r["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: dict, name: str = "trex-serve") -> dict:
    return next(
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name
    )


def env(container_spec: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container_spec.get("env", []) if "value" in e}


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def render_adapter_query(rule: dict, label_matchers: str, group_by: str) -> str:
    """An adapter rule's metricsQuery with its Go template fields filled in, as the adapter
    does for one request."""
    series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", label_matchers)
        .replace("<<.GroupBy>>", group_by)
    )


# --- Prometheus rules ---------------------------------------------------------------------


def rules(kind: str) -> list[dict]:
    """Every rule of the rule files with a ``kind`` key ("record" or "alert")."""
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            found += [r for r in group["rules"] if kind in r]
    return found


# --- Grafana dashboard --------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    """Panels with queries, rows' nested panels included."""
    found = []
    for panel in dashboard()["panels"]:
        found += panel.get("panels", [])
        if panel["type"] != "row":
            found.append(panel)
    return found


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title / legend, PromQL) of every query of the dashboard."""
    return [
        (f"{p['title']} / {t.get('legendFormat') or t['refId']}", t["expr"])
        for p in dashboard_panels()
        for t in p.get("targets", [])
    ]


# Grafana's own variables the dashboard may use, besides its templating list
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def dashboard_variables(expr: str) -> set[str]:
    return set(re.findall(r"\$\{?(\w+)", expr))


def substitute(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana variables replaced; every variable must have a value."""

    def value(match):
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


# --- PromQL -------------------------------------------------------------------------------

# A metric name in PromQL that is not part of a recording rule's level:metric:operations
# name (those contain colons) nor of a longer identifier.
_METRIC = re.compile(r"(?<![\w:])(trex_[a-z0-9_]+)(?![\w:])")


def metric_names(expr: str) -> set[str]:
    """The trex_* series names an expression reads."""
    return set(_METRIC.findall(expr))


def bucket_bounds(expr: str) -> set[tuple[str, str]]:
    """(series, le value) of every `series{..., le="x", ...}` selector in ``expr``."""
    return {
        (name, le)
        for name, labels in re.findall(r"(trex_[a-z0-9_]+_bucket)\{([^}]*)\}", expr)
        for le in re.findall(r'le="([^"]+)"', labels)
    }


def kn(resource: dict) -> str:
    return f"{resource['kind']}/{resource['metadata']['name']}"

"""The Kubernetes manifests as kustomize renders them: valid against the Kubernetes API
schemas (kubernetes-validate, strict), the ServiceMonitor against the prometheus-operator
CRD schema, and consistent with each other, the image and the server's flags."""

from __future__ import annotations

import json
import re

import pytest
from kubernetes_validate import utils as kubernetes_validate

from service.server import ServerConfig
from tests.deploy import helpers
from tests.deploy.test_dockerfile import env_of, final_stage, instructions

VARIANTS = ("base", *helpers.OVERLAYS)
# the oldest release with GA gRPC probes, and the newest the validator knows
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
CRD_GROUPS = ("monitoring.coreos.com/",)


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used here"
    match = selector.get("matchLabels") or {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


# --- schemas ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_resources_validate_against_the_kubernetes_schemas(rendered, variant, version):
    checked, errors = [], []
    for resource in rendered[variant]:
        if resource["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{helpers.kn(resource)}: {path}: {e.message}")
        checked.append(resource["kind"])
    assert not errors, "\n".join(errors)
    assert sorted(checked) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
        "Service",
    ]


def test_the_validator_rejects_what_the_api_server_would():
    # strict mode is what catches a misspelt field; make sure it is on
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", "livenesProbe": {}}]},
            },
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_custom_resources_validate_against_their_crd_schemas(rendered, variant):
    custom = [r for r in rendered[variant] if r["apiVersion"].startswith(CRD_GROUPS)]
    assert [r["kind"] for r in custom] == ["ServiceMonitor"]
    helpers.require_tool("node")
    if not (helpers.NODE_DIR / "node_modules").is_dir():
        pytest.fail(f"tests/deploy/node has no node_modules: {helpers.SETUP_HINT}")
    out = helpers.run_tool(
        ["node", helpers.NODE_DIR / "validate-crds.mjs"], input=json.dumps(custom)
    )
    assert out.returncode == 0, out.stderr
    errors = [r for r in json.loads(out.stdout) if r["error"]]
    assert not errors, errors


def test_the_crd_validator_rejects_a_bad_service_monitor():
    helpers.require_tool("node")
    bad = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "endpoints": [{"port": "metrics", "interval": "15 seconds"}]},
    }
    out = helpers.run_tool(
        ["node", helpers.NODE_DIR / "validate-crds.mjs"], input=json.dumps([bad])
    )
    assert out.returncode == 0, out.stderr
    (result,) = json.loads(out.stdout)
    assert result["error"] and "interval" in result["error"]


# --- wiring -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_selector_finds_the_pods(rendered, variant):
    resources = rendered[variant]
    deployment = helpers.one(resources, "Deployment")
    labels = pod_labels(deployment)
    assert selects(deployment["spec"]["selector"], labels)
    assert selects(helpers.one(resources, "PodDisruptionBudget")["spec"]["selector"], labels)
    for service in [r for r in resources if r["kind"] == "Service"]:
        assert selects({"matchLabels": service["spec"]["selector"]}, labels), service
    hpa = helpers.one(resources, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_ports_reach_the_container_ports(rendered, variant):
    resources = rendered[variant]
    ports = {
        p["name"]: p["containerPort"]
        for p in helpers.container(helpers.one(resources, "Deployment"))["ports"]
    }
    for service in [r for r in resources if r["kind"] == "Service"]:
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)
            assert port["port"] == ports[port["targetPort"]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_monitor_scrapes_exactly_one_service_on_its_metrics_port(rendered, variant):
    resources = rendered[variant]
    monitor = helpers.one(resources, "ServiceMonitor")
    services = [
        s
        for s in resources
        if s["kind"] == "Service" and selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    # a second matching Service (the headless one) would scrape every pod twice
    assert [s["metadata"]["name"] for s in services] == ["trex-serve"]
    names = {p["name"] for p in services[0]["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in names
    # the job label Prometheus gives these targets is the Service name, which the alert
    # rules and the compose scrape config use too
    assert helpers.PROMETHEUS_YML.read_text().count("job_name: trex-serve") == 1
    assert 'up{job="trex-serve"}' in (helpers.MONITORING / "rules" / "trex-alerts.yml").read_text()


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_ask_grpc_health_on_the_port_the_server_listens_on(rendered, variant):
    spec = helpers.container(helpers.one(rendered[variant], "Deployment"))
    env = helpers.env(spec)
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports == {"grpc": int(env["TREX_PORT"]), "metrics": int(env["TREX_METRICS_PORT"])}
    assert env["TREX_HOST"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"] == {"port": ports["grpc"]}, probe
    # the startup probe, not a long liveness delay, covers loading the model
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert "initialDelaySeconds" not in spec["livenessProbe"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_termination_grace_covers_pre_stop_and_the_servers_drain(rendered, variant):
    deployment = helpers.one(rendered[variant], "Deployment")
    spec = helpers.container(deployment)
    grace_s = float(helpers.env(spec)["TREX_GRACE_PERIOD_S"])
    command = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    termination_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # at least 3 s for closing the engine and the ports after the drain
    assert termination_s >= pre_stop_s + grace_s + 3, (termination_s, pre_stop_s, grace_s)
    # and the liveness probe does not kill a draining pod first
    live = spec["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace_s


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_run_as_the_images_non_root_user(rendered, variant):
    pod = helpers.one(rendered[variant], "Deployment")["spec"]["template"]["spec"]
    (user,) = instructions(final_stage(), "USER")
    uid, gid = (int(x) for x in user.split(":"))
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
    spec = helpers.container(helpers.one(rendered[variant], "Deployment"))
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    assert "/tmp" in {m["mountPath"] for m in spec["volumeMounts"]}


def test_environment_names_are_server_flags(rendered):
    flags = {f"TREX_{name.upper()}" for name in ServerConfig.__dataclass_fields__}
    for variant in VARIANTS:
        spec = helpers.container(helpers.one(rendered[variant], "Deployment"))
        unknown = {n for n in helpers.env(spec) if n.startswith("TREX_")} - flags
        assert not unknown, f"{variant}: trex-serve reads no {unknown}"
    image_env = env_of(final_stage())
    assert {n for n in image_env if n.startswith("TREX_")} <= flags


# --- variants -----------------------------------------------------------------------------


def test_gpu_overlay_asks_for_one_gpu_and_insists_on_cuda(rendered):
    deployment = helpers.one(rendered["gpu"], "Deployment")
    spec = helpers.container(deployment)
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert helpers.env(spec)["TREX_PROVIDER"] == "cuda"
    tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    # no surge pod that would wait for a spare GPU
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_cpu_overlay_asks_for_no_gpu_and_sizes_threads_to_its_cpus(rendered):
    deployment = helpers.one(rendered["cpu"], "Deployment")
    spec = helpers.container(deployment)
    resources = json.dumps(spec["resources"])
    assert "nvidia.com" not in resources
    assert "tolerations" not in deployment["spec"]["template"]["spec"]
    env = helpers.env(spec)
    assert env["TREX_PROVIDER"] == "cpu"
    cpus = int(spec["resources"]["limits"]["cpu"])
    assert spec["resources"]["requests"] == spec["resources"]["limits"]  # Guaranteed QoS
    assert 1 <= int(env["TREX_INTRA_OP_THREADS"]) < cpus  # a core left for the event loop


def test_image_tags_name_the_project_version_and_variant(rendered):
    version = helpers.pyproject()["project"]["version"]
    for variant, suffix in (("gpu", "cuda"), ("cpu", "cpu")):
        spec = helpers.container(helpers.one(rendered[variant], "Deployment"))
        assert spec["image"] == f"trex-serve:{version}-{suffix}"
    compose = helpers.COMPOSE.read_text() + helpers.COMPOSE_GPU.read_text()
    tags = set(re.findall(r"image: (trex-serve:\S+)", compose))
    assert tags == {f"trex-serve:{version}-cpu", f"trex-serve:{version}-cuda"}


# --- autoscaling --------------------------------------------------------------------------


def test_hpa_metrics_are_served_by_the_adapter_rules(rendered):
    served = {rule["name"]["as"] for rule in helpers.adapter_rules()}
    for variant in VARIANTS:
        hpa = helpers.one(rendered[variant], "HorizontalPodAutoscaler")
        metrics = hpa["spec"]["metrics"]
        assert metrics and all(m["type"] == "Pods" for m in metrics)
        for m in metrics:
            assert m["pods"]["metric"]["name"] in served
            # a target the pool can reach, or the HPA never scales out
            target = float(m["pods"]["target"]["averageValue"])
            assert 0 < target < ServerConfig().max_rows
        assert 1 < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_adapter_rules_map_namespace_and_pod_and_template_every_query():
    rules = helpers.adapter_rules()
    assert rules
    for rule in rules:
        overrides = rule["resources"]["overrides"]
        assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert re.search(r'\{namespace!="",pod!=""\}', rule["seriesQuery"])
        assert re.fullmatch(
            rule["name"]["matches"], helpers.metric_names(rule["seriesQuery"]).pop()
        )
        for field in ("<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert field in rule["metricsQuery"], (rule["name"]["as"], field)

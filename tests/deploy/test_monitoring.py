"""Prometheus configuration, rules and alert unit tests checked by promtool; the Grafana
dashboard, its provisioning and the compose stack checked for structure and for agreeing
with each other. tests/deploy/test_monitoring_e2e.py runs every query against a real
Prometheus scraping a real server."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tests.deploy import helpers
from tests.deploy.test_dockerfile import env_of, final_stage, global_args, instructions

LATENCY_HISTOGRAMS = (
    "trex_request_duration_seconds",
    "trex_queue_duration_seconds",
    "trex_compile_duration_seconds",
    "trex_execute_duration_seconds",
)
QUANTILES = ("0.5", "0.95", "0.99")


# --- promtool -----------------------------------------------------------------------------


def test_promtool_accepts_the_scrape_config_and_its_rule_files():
    out = helpers.run_tool(["promtool", "check", "config", helpers.PROMETHEUS_YML])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(helpers.RULE_FILES)} rule files found" in out.stdout


def test_promtool_accepts_the_rules():
    out = helpers.run_tool(["promtool", "check", "rules", *helpers.RULE_FILES])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - record: a:b\n        expr: sum(\n")
    out = helpers.run_tool(["promtool", "check", "rules", bad])
    assert out.returncode != 0


def test_alert_unit_tests_pass():
    out = helpers.run_tool(["promtool", "test", "rules", *helpers.ALERT_TESTS])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_unit_tested_firing_and_quiet():
    alerts = {r["alert"] for r in helpers.rules("alert")}
    firing, quiet = set(), set()
    for path in helpers.ALERT_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts - firing == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"


def test_every_alert_has_a_severity_and_a_summary():
    for rule in helpers.rules("alert"):
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_recording_rules_cover_quantiles_throughput_efficiency_batches_and_errors():
    records = {r["record"]: r["expr"] for r in helpers.rules("record")}
    for metric in LATENCY_HISTOGRAMS:
        for q, name in zip(QUANTILES, ("p50", "p95", "p99")):
            expr = records[f"job:{metric}:{name}_5m"]
            assert re.search(rf"histogram_quantile\({q}0*,", expr), expr
            assert f"{metric}_bucket" in expr
    assert "trex_request_duration_seconds_count" in records["job:trex_answers:rate5m"]
    assert "trex_output_tokens_total" in records["job:trex_output_tokens:rate5m"]
    passes = records["job:trex_forward_passes_per_token:ratio_rate5m"]
    assert re.search(
        r"trex_compiler_forward_passes_total.*\n\s*/\s*\n.*trex_output_tokens_total", passes
    )
    assert "by (job, phase)" in records["job_phase:trex_batch_size:mean_rate5m"]
    assert "trex_requests_total" in records["job:trex_requests_errors:ratio_rate5m"]


def test_recording_rules_keep_exactly_the_labels_their_level_names():
    # level:metric:operations; job_phase:... keeps job and phase. Rules are per job, never
    # per instance, so that alerts can join them `on (job)`.
    for rule in helpers.rules("record"):
        level = set(rule["record"].split(":")[0].split("_"))
        clauses = re.findall(r"by \(([^)]*)\)", rule["expr"])
        assert clauses, rule["record"]
        for clause in clauses:
            labels = {label.strip() for label in clause.split(",")} - {"le"}
            assert labels == level, rule["record"]


# --- Grafana dashboard --------------------------------------------------------------------


def test_dashboard_panels_have_unique_ids_and_fit_the_grid_without_overlap():
    panels = helpers.dashboard()["panels"]
    ids = [p["id"] for p in panels] + [p["id"] for r in panels for p in r.get("panels", [])]
    assert len(ids) == len(set(ids))
    taken = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(g["x"] + i, g["y"] + j) for i in range(g["w"]) for j in range(g["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells


def test_dashboard_queries_use_the_datasource_variable_and_defined_variables():
    dash = helpers.dashboard()
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for panel in helpers.dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            used = helpers.dashboard_variables(target["expr"])
            assert used <= variables | helpers.GRAFANA_BUILTINS, (panel["title"], used)
            # every query follows the job and instance pickers
            assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"]
            if "rate(" in target["expr"]:
                assert "[$__rate_interval]" in target["expr"], panel["title"]


def panel(title: str) -> dict:
    (found,) = [p for p in helpers.dashboard_panels() if p["title"] == title]
    return found


def exprs(title: str) -> list[str]:
    return [t["expr"] for t in panel(title)["targets"]]


def test_dashboard_shows_each_latency_at_p50_p95_p99():
    for title, metric in zip(
        ("End-to-end latency", "Queued", "Compile", "Execute"), LATENCY_HISTOGRAMS
    ):
        found = exprs(title)
        assert [re.search(r"histogram_quantile\(([\d.]+),", e).group(1) for e in found] == list(
            QUANTILES
        )
        assert all(f"{metric}_bucket" in e for e in found)
        assert panel(title)["fieldConfig"]["defaults"]["unit"] == "s"


def test_dashboard_shows_throughput_efficiency_scheduler_and_errors():
    answers, tokens = exprs("Answers and tokens per second")
    assert "trex_request_duration_seconds_count" in answers
    assert "trex_output_tokens_total" in tokens
    ratio = exprs("Forward passes per token")[0]
    assert re.fullmatch(
        r"sum\(rate\(trex_compiler_forward_passes_total\{[^}]*\}\[\$__rate_interval\]\)\)"
        r" / sum\(rate\(trex_output_tokens_total\{[^}]*\}\[\$__rate_interval\]\)\)",
        ratio,
    )
    (batch,) = exprs("Mean batch size")
    assert "by (phase)" in batch and "trex_batch_size_sum" in batch
    assert "trex_queue_length" in exprs("Queue length")[0]
    assert "trex_active_rows" in exprs("Active rows")[0]
    (errors,) = exprs("Errors by code")
    assert "sum by (code)" in errors and 'code!="OK"' in errors


def test_grafana_provisioning_matches_the_compose_mounts():
    datasource = yaml.safe_load(
        (helpers.GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    provider = yaml.safe_load(
        (helpers.GRAFANA_PROVISIONING / "dashboards" / "trex.yml").read_text()
    )["providers"][0]
    compose = yaml.safe_load(helpers.COMPOSE.read_text())["services"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    # the data source URL names the compose service and Prometheus' port
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose
    # Grafana's $__rate_interval is built from this; it must be the scrape interval
    scrape = yaml.safe_load(helpers.PROMETHEUS_YML.read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape


# --- compose stack ------------------------------------------------------------------------


def test_compose_files_follow_the_compose_specification():
    out = helpers.run_tool(
        [
            "check-jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            helpers.COMPOSE,
            helpers.COMPOSE_GPU,
        ]
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_serves_the_image_the_way_the_dockerfile_builds_it():
    services = yaml.safe_load(helpers.COMPOSE.read_text())["services"]
    gpu = yaml.safe_load(helpers.COMPOSE_GPU.read_text())["services"]
    trex = services["trex"]
    assert (
        helpers.MONITORING / trex["build"]["context"] / "Dockerfile"
    ).resolve() == helpers.DOCKERFILE
    # the GPU variant builds the Dockerfile's default base image
    assert gpu["trex"]["build"]["args"]["BASE_IMAGE"] == global_args()["BASE_IMAGE"]
    # published ports are the ports the image exposes
    exposed = {p for v in instructions(final_stage(), "EXPOSE") for p in v.split()}
    published = {p.rsplit(":", 1)[1] for p in trex["ports"]}
    assert published == exposed
    # the scrape target is this service on the image's metrics port
    target = yaml.safe_load(helpers.PROMETHEUS_YML.read_text())["scrape_configs"][0]
    assert target["static_configs"][0]["targets"] == [
        f"trex:{env_of(final_stage())['TREX_METRICS_PORT']}"
    ]
    # docker stop kills only after the server's own drain
    grace_s = float(trex["environment"]["TREX_GRACE_PERIOD_S"])
    assert float(trex["stop_grace_period"].rstrip("s")) > grace_s


def test_compose_mounts_exist():
    services = yaml.safe_load(helpers.COMPOSE.read_text())["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (helpers.MONITORING / source).exists(), (name, source)


@pytest.mark.parametrize("path", [helpers.HEALTHCHECK, helpers.LOAD_SCRIPT])
def test_scripts_show_their_usage(path):
    out = subprocess.run(
        [sys.executable, path, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout

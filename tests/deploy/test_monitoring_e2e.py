"""End to end: a real trex-serve (the service tests' ServerProcess, on loopback) under a
little load from deploy/monitoring/load.py, scraped every second by a real Prometheus
(Debian's binary) that loads the rule files of deploy/monitoring/rules. Every dashboard
query, recording rule and prometheus-adapter query must then return data, and every series
they name must be on the live /metrics page."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.deploy import helpers
from tests.service.conftest import ServerProcess, free_port

JOB = "trex-serve"
# what a ServiceMonitor target carries in Kubernetes; the adapter's queries need them
NAMESPACE, POD = "trex-test", "trex-serve-0"
# Grafana's variables as a viewer of the whole job would have them; $__rate_interval is
# long enough to cover the whole load
VARIABLES = {"job": JOB, "instance": ".*", "__rate_interval": "2m", "datasource": "prometheus"}
WAIT_S = 30.0


class Prometheus:
    def __init__(self, proc: subprocess.Popen, url: str, log_path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as e:  # a bad query is a 400 with the reason
            body = json.load(e)
        assert body["status"] == "success", f"{path} {params}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def log(self) -> str:
        return self.log_path.read_text()


def finite_values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


def wait_for_data(prometheus: Prometheus, expr: str) -> list[dict]:
    """The query's result once every series in it has a finite value (rules need an
    evaluation or two after the load); fails with the last result otherwise."""
    deadline = time.monotonic() + WAIT_S
    while True:
        result = prometheus.query(expr)
        if result and len(finite_values(result)) == len(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"no finite data after {WAIT_S} s for:\n{expr}\nlast result: {result}")
        time.sleep(0.5)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(
        model_dir, tmp_path_factory.mktemp("server") / "server.log", log_level="INFO"
    )
    try:
        proc.wait_serving()
        yield proc
    finally:
        code = proc.stop()
    assert code == 0, proc.log()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus with deploy/monitoring/prometheus.yml, scraping ``server`` every second
    and evaluating the rules every second."""
    binary = helpers.require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(helpers.PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(p) for p in helpers.RULE_FILES]
    (scrape,) = config["scrape_configs"]
    assert scrape["job_name"] == JOB
    scrape["static_configs"] = [
        {
            "targets": [f"127.0.0.1:{server.metrics_port}"],
            "labels": {"namespace": NAMESPACE, "pod": POD},
        }
    ]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp / "prometheus.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{prom.log()}"
            try:
                if prom.query(f'up{{job="{JOB}"}} == 1'):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, f"no successful scrape:\n{prom.log()}"
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def load(server, prometheus) -> dict:
    """Four seconds of load.py against ``server`` while Prometheus scrapes; returns once
    Prometheus has scraped the final counts."""
    out = subprocess.run(
        [
            sys.executable,
            helpers.LOAD_SCRIPT,
            f"--target={server.target}",
            "--rate=30",
            "--duration-s=4",
            "--concurrency=8",
            "--bad-share=0.1",
            "--timeout-s=30",
            "--seed=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    outcomes = json.loads(out.stdout)
    served = sum(
        value for (name, _), value in server.metrics().items() if name == "trex_requests_total"
    )
    deadline = time.monotonic() + WAIT_S
    while finite_values(prometheus.query(f'sum(trex_requests_total{{job="{JOB}"}})')) != [served]:
        assert time.monotonic() < deadline, "Prometheus did not scrape the final counts"
        time.sleep(0.2)
    return outcomes


# --- the load -----------------------------------------------------------------------------


def test_load_calls_every_method_and_gets_answers_and_refusals(load):
    assert set(load) == {"Solve", "SolveStream", "SolveBatch"}, load
    codes = {code for per_method in load.values() for code in per_method}
    assert codes == {"OK", "INVALID_ARGUMENT"}, load
    assert load["Solve"]["OK"] > 10


# --- every query returns data --------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [e for _, e in helpers.dashboard_targets()],
    ids=[t for t, _ in helpers.dashboard_targets()],
)
def test_dashboard_query_returns_data(prometheus, load, expr):
    wait_for_data(prometheus, helpers.substitute(expr, VARIABLES))


def test_dashboard_variables_list_the_job_and_its_instance(prometheus, load):
    for variable in helpers.dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = helpers.substitute(variable["query"]["query"], VARIABLES)
        series, label = query.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        values = prometheus.api(f"label/{label}/values", **{"match[]": series})
        assert values, variable["name"]
        if label == "job":
            assert values == [JOB]


@pytest.mark.parametrize("record", [r["record"] for r in helpers.rules("record")])
def test_recording_rule_returns_data(prometheus, load, record):
    result = wait_for_data(prometheus, record)
    assert {r["metric"]["job"] for r in result} == {JOB}


def test_every_rule_evaluates_without_error(prometheus, load):
    deadline = time.monotonic() + WAIT_S
    while True:
        groups = prometheus.api("rules")["groups"]
        found = [r for g in groups for r in g["rules"]]
        if found and all(r["health"] != "unknown" for r in found):
            break
        assert time.monotonic() < deadline, "rules not evaluated"
        time.sleep(0.5)
    assert len(found) == len(helpers.rules("record")) + len(helpers.rules("alert"))
    broken = [(r["name"], r["lastError"]) for r in found if r["health"] != "ok"]
    assert not broken


def test_refused_bad_problems_do_not_count_as_server_errors(prometheus, load):
    (ratio,) = wait_for_data(prometheus, "job:trex_requests_errors:ratio_rate5m")
    assert float(ratio["value"][1]) == 0.0
    errors = prometheus.query('sum by (code) (trex_requests_total{code!="OK"})')
    assert {r["metric"]["code"] for r in errors} == {"INVALID_ARGUMENT"}
    alerts = prometheus.api("alerts")["alerts"]
    assert "TrexHighErrorRatio" not in {a["labels"]["alertname"] for a in alerts}


def test_forward_passes_per_token_agrees_with_the_servers_counters(server, prometheus, load):
    samples = server.metrics()
    passes = samples[("trex_compiler_forward_passes_total", ())]
    tokens = samples[("trex_output_tokens_total", ())]
    (recorded,) = wait_for_data(prometheus, "job:trex_forward_passes_per_token:ratio_rate5m")
    assert float(recorded["value"][1]) == pytest.approx(passes / tokens, rel=0.02)
    assert 1 / 16 <= passes / tokens <= 1


@pytest.mark.parametrize("rule", helpers.adapter_rules(), ids=lambda r: r["name"]["as"])
def test_adapter_rule_gives_a_value_per_pod(prometheus, load, rule):
    assert prometheus.api("series", **{"match[]": rule["seriesQuery"]}), rule["seriesQuery"]
    query = helpers.render_adapter_query(
        rule, label_matchers=f'namespace="{NAMESPACE}",pod=~"{POD}"', group_by="pod"
    )
    (result,) = wait_for_data(prometheus, query)
    assert result["metric"] == {"pod": POD}


# --- names against the live /metrics page --------------------------------------------------


def queried_expressions() -> list[str]:
    return (
        [e for _, e in helpers.dashboard_targets()]
        + [r["expr"] for r in helpers.rules("record") + helpers.rules("alert")]
        + [r["seriesQuery"] for r in helpers.adapter_rules()]
        + [r["metricsQuery"] for r in helpers.adapter_rules()]
        + [
            v["query"]["query"]
            for v in helpers.dashboard()["templating"]["list"]
            if v["type"] == "query"
        ]
    )


def test_every_series_the_queries_name_is_exported(server, load):
    samples = server.metrics()
    exported = {name for name, _ in samples}
    named = set().union(*(helpers.metric_names(e) for e in queried_expressions()))
    assert len(named) >= 15  # the name extraction works
    assert named - exported == set(), f"not on {server.target}'s /metrics page"
    for series, le in set().union(*(helpers.bucket_bounds(e) for e in queried_expressions())):
        bounds = {dict(labels).get("le") for name, labels in samples if name == series}
        assert le in bounds, f'{series}{{le="{le}"}} is not a bucket bound; buckets: {bounds}'


# --- the image's health check against a live server ----------------------------------------


def test_healthcheck_script_says_serving_and_exits_zero(server):
    out = subprocess.run(
        [sys.executable, helpers.HEALTHCHECK, server.target],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == f"{server.target}: SERVING"


def test_healthcheck_script_fails_when_nothing_listens():
    target = f"127.0.0.1:{free_port()}"
    out = subprocess.run(
        [sys.executable, helpers.HEALTHCHECK, target, "--timeout-s=1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 1
    assert out.stdout.startswith(f"{target}: UNAVAILABLE") or "DEADLINE_EXCEEDED" in out.stdout

"""Metric names and buckets that dashboards rely on; values are tested against a live
server in test_server.py."""

from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import DURATION_BUCKETS_S, PASSES_PER_TOKEN_BUCKETS, Metrics
from service.scheduler import Request

MS = 1_000_000

EXPOSED_NAMES = {
    "trex_compiler_forward_passes_total",
    "trex_compile_batches_total",
    "trex_executor_steps_total",
    "trex_execute_batches_total",
    "trex_output_tokens_total",
    "trex_forward_passes_per_token",
    "trex_request_duration_seconds",
    "trex_queue_duration_seconds",
    "trex_compile_duration_seconds",
    "trex_execute_duration_seconds",
    "trex_batch_size",
    "trex_queue_length",
    "trex_active_rows",
    "trex_requests_total",
    "trex_model_info",
}


def make_answered_request(tokens: int) -> Request:
    return Request(
        id=1,
        problem="1+2=",
        arrival_ns=0,
        tokens=[3] * (tokens - 1) + [2],
        compiler_passes=1,
        compile_start_ns=1 * MS,
        compile_end_ns=3 * MS,
        finish_ns=10 * MS,
    )


def exposed_names(registry: CollectorRegistry) -> set[str]:
    text = generate_latest(registry).decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_every_documented_name_is_exposed():
    metrics = Metrics(CollectorRegistry())
    metrics.set_model("v1", {"compiler": "CPUExecutionProvider"})
    metrics.requests.labels(method="Solve", code="OK").inc()
    metrics.observe_compile(3)
    metrics.observe_execute(3, 3)
    assert EXPOSED_NAMES <= exposed_names(metrics.registry)


def test_registries_are_independent():
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.observe_compile(4)
    assert a.registry.get_sample_value("trex_compiler_forward_passes_total") == 4
    assert b.registry.get_sample_value("trex_compiler_forward_passes_total") == 0


def test_passes_per_token_lands_in_the_bucket_of_its_answer_length():
    metrics = Metrics(CollectorRegistry())
    for tokens in (1, 12):
        metrics.observe_answered(make_answered_request(tokens))
    sample = metrics.registry.get_sample_value
    assert sample("trex_forward_passes_per_token_bucket", {"le": str(1 / 12)}) == 1
    assert sample("trex_forward_passes_per_token_bucket", {"le": str(1 / 13)}) == 0
    assert sample("trex_forward_passes_per_token_bucket", {"le": "1.0"}) == 2
    assert sample("trex_forward_passes_per_token_sum") == 1 + 1 / 12


def test_durations_are_split_into_queue_compile_and_execute():
    metrics = Metrics(CollectorRegistry())
    metrics.observe_answered(make_answered_request(5))
    sample = metrics.registry.get_sample_value
    assert sample("trex_queue_duration_seconds_sum") == 0.001
    assert sample("trex_compile_duration_seconds_sum") == 0.002
    assert sample("trex_execute_duration_seconds_sum") == 0.007
    assert sample("trex_request_duration_seconds_sum") == 0.010


def test_buckets_cover_fifty_microseconds_to_ten_seconds():
    assert DURATION_BUCKETS_S[0] <= 50e-6 and DURATION_BUCKETS_S[-1] >= 10
    assert sum(b < 1e-3 for b in DURATION_BUCKETS_S) >= 4  # sub-millisecond resolution
    assert 1 / 12 in PASSES_PER_TOKEN_BUCKETS and PASSES_PER_TOKEN_BUCKETS[-1] == 1


def test_baseline_counts_a_forward_pass_per_token():
    """The baseline's prefill emits a token per row, and each decode row-step is a forward
    pass emitting one: passes / tokens is 1."""
    metrics = Metrics(CollectorRegistry())
    metrics.set_model("baseline-v1", {"compiler": "CPUExecutionProvider"}, kind="baseline")
    metrics.observe_compile(4, tokens_emitted=4)
    metrics.observe_execute(4, 4, forward_passes=4)
    metrics.observe_execute(3, 3, forward_passes=3)
    sample = metrics.registry.get_sample_value
    assert sample("trex_compiler_forward_passes_total") == 11
    assert sample("trex_output_tokens_total") == 11
    assert sample("trex_executor_steps_total") == 7
    info = {
        "model_version": "baseline-v1",
        "kind": "baseline",
        "provider": "CPUExecutionProvider",
        "executor_provider": "",
    }
    assert sample("trex_model_info", info) == 1


def test_trex_model_info_says_trex_by_default():
    metrics = Metrics(CollectorRegistry())
    metrics.set_model("v1", {"compiler": "CPU", "executor": "CPU"})
    labels = {"model_version": "v1", "kind": "trex", "provider": "CPU", "executor_provider": "CPU"}
    assert metrics.registry.get_sample_value("trex_model_info", labels) == 1

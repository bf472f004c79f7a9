"""The baseline served by the same engine, scheduler, server and client as T-REX: the engine
in-process, then a real server subprocess on the baseline export.

python -m pytest tests/service/test_baseline_service.py -q -s
TREX_TEST_BASELINE_MODEL_DIR=models/onnx-baseline python -m pytest tests/service -q -k baseline

Answers must equal the export's own (run directly); with a trained baseline (models/onnx-baseline,
models/baseline.pt or the TREX_TEST_BASELINE_* variables) they must also be the correct sums.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import CollectorRegistry

from protos.trex.v1 import trex_pb2, trex_pb2_grpc
from service.engine import Engine
from service.metrics import Metrics
from service.runtime import Runtime
from service.scheduler import SchedulerConfig
from tests.conftest import trained_baseline_checkpoint
from tests.service.conftest import ServerProcess, chosen_baseline_dir, expected_tokens, metric
from tests.service.test_client import run_client
from tests.service.test_engine import check_a_failing_problem_does_not_fail_its_batch_mates
from training.data import held_out_set

N_LOAD_PROBLEMS = 300
N_CLIENTS = 16
LSD_FIRST = trex_pb2.DIGIT_ORDER_LEAST_SIGNIFICANT_FIRST


def trained() -> bool:
    return chosen_baseline_dir() is not None or trained_baseline_checkpoint() is not None


# --- the engine, in-process ---


@pytest.fixture(scope="module")
def runtime(baseline_model_dir) -> Runtime:
    return Runtime(baseline_model_dir, provider="cpu", intra_op_threads=1, max_rows=16)


def make_engine(runtime) -> Engine:
    config = SchedulerConfig(
        max_rows=runtime.max_rows,
        max_compile_batch=8,
        max_execute_batch=16,
        max_queue_delay_ns=1_000_000,
        max_queue=32,
        step_limit=runtime.max_steps,
        start_id=runtime.start_id,
        end_id=runtime.end_id,
        step_is_forward_pass=True,
    )
    return Engine(runtime, config, Metrics(CollectorRegistry()))


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_engine_streams_the_prefill_token_first_and_counts_a_pass_per_token(runtime):
    problems = ["9999999999+9999999999=", "1+2=", "7669+10132="]

    async def scenario():
        engine = make_engine(runtime)
        engine.start()
        tickets = [engine.submit(p) for p in problems]
        streamed = []
        for ticket in tickets:
            streamed.append([t async for t in ticket.tokens()])
        await engine.stop()
        return engine, streamed, [t.request for t in tickets]

    engine, streamed, requests = run(scenario())
    sample = engine.metrics.registry.get_sample_value
    tokens = 0
    for problem, stream, request in zip(problems, streamed, requests):
        assert stream == request.tokens == [int(t) for t in expected_ids(runtime, problem)]
        assert runtime.decode(request.tokens) == runtime.solve([problem])[0]
        assert request.compile_tokens == 1 and request.executor_steps == len(request.tokens) - 1
        assert request.compiler_passes == len(request.tokens)
        tokens += len(request.tokens)
    assert sample("trex_output_tokens_total") == tokens
    assert sample("trex_compiler_forward_passes_total") == tokens
    assert sample("trex_executor_steps_total") == tokens - len(problems)


def expected_ids(runtime: Runtime, problem: str) -> list[int]:
    row = [int(t) for t in runtime.generate(runtime.encode([problem]))[0]]
    return row[: row.index(runtime.end_id) + 1] if runtime.end_id in row else row


def test_engine_needs_the_forward_pass_count_to_match_the_model(runtime):
    config = SchedulerConfig(max_rows=runtime.max_rows, step_is_forward_pass=False)
    with pytest.raises(ValueError, match="step_is_forward_pass must be True for a baseline"):
        Engine(runtime, config, Metrics(CollectorRegistry()))


@pytest.mark.parametrize("fail_in", ["compile", "step"])
def test_a_failing_problem_does_not_fail_its_batch_mates(runtime, fail_in):
    check_a_failing_problem_does_not_fail_its_batch_mates(runtime, fail_in, make_engine)


# --- a real server on the baseline export ---


@pytest.fixture(scope="module")
def server(baseline_model_dir, tmp_path_factory):
    """A baseline server asked for more steps than the baseline has: it serves max_steps."""
    log_path = tmp_path_factory.mktemp("baseline-server") / "server.log"
    process = ServerProcess(baseline_model_dir, log_path, model_kind="baseline", step_limit=20)
    try:
        process.wait_serving()
        yield process
    finally:
        process.stop()


def solver(server) -> trex_pb2_grpc.SolverStub:
    return trex_pb2_grpc.SolverStub(grpc.insecure_channel(server.target))


def test_solve_answers_in_written_order_with_a_pass_per_token(server, baseline_reference):
    problem = "7669+10132="
    response = solver(server).Solve(trex_pb2.SolveRequest(problem=problem), timeout=30)
    tokens = expected_tokens(baseline_reference, problem)
    assert response.answer == baseline_reference.solve([problem])[0]
    assert list(response.tokens) == tokens  # emission order: least significant digit first
    assert response.digit_order == LSD_FIRST
    if trained():
        assert response.answer == "17801" and tokens == [*"10871", "<end>"]
    assert response.compiler_passes == len(tokens)
    assert response.executor_steps == len(tokens) - 1
    assert response.model_version == baseline_reference.model_version
    assert response.model_version.startswith("baseline-")


def test_stream_sends_tokens_in_emission_order(server, baseline_reference):
    problem = "9999999999+1="
    messages = list(solver(server).SolveStream(trex_pb2.SolveRequest(problem=problem), timeout=30))
    tokens, result = messages[:-1], messages[-1].result
    assert [m.token.step for m in tokens] == list(range(1, len(tokens) + 1))
    assert all(m.token.digit_order == LSD_FIRST for m in tokens)
    assert [m.token.text for m in tokens] == expected_tokens(baseline_reference, problem)
    # the answer is the emitted tokens up to <end>, reversed
    texts = [m.token.text for m in tokens]
    body = texts[: texts.index("<end>")] if "<end>" in texts else texts
    assert result.answer == "".join(reversed(body)) == baseline_reference.solve([problem])[0]


def test_solve_batch_gives_each_problem_its_own_status(server, baseline_reference):
    problems = ["1+2=", "1+a=", "42+58="]
    response = solver(server).SolveBatch(trex_pb2.SolveBatchRequest(problems=problems), timeout=30)
    codes = [r.status.code for r in response.results]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    expected = baseline_reference.solve(["1+2=", "42+58="])
    assert [response.results[i].result.answer for i in (0, 2)] == expected


async def solve_concurrently(target: str, problems: list[str], clients: int) -> list:
    responses: list = [None] * len(problems)
    todo = iter(range(len(problems)))

    async def client():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = trex_pb2_grpc.SolverStub(channel)
            for i in todo:  # a shared iterator: each index goes to one client
                request = trex_pb2.SolveRequest(problem=problems[i])
                responses[i] = await stub.Solve(request, timeout=120)

    await asyncio.gather(*(client() for _ in range(clients)))
    return responses


@dataclass(repr=False)
class LoadRun:
    problems: list
    responses: list
    before: dict
    after: dict

    def delta(self, name: str, **labels) -> float:
        return metric(self.after, name, **labels) - metric(self.before, name, **labels)


@pytest.fixture(scope="module")
def load_run(server) -> LoadRun:
    problems = held_out_set(N_LOAD_PROBLEMS)
    before = server.metrics()
    started_s = time.monotonic()
    responses = asyncio.run(
        solve_concurrently(server.target, [p.text for p in problems], N_CLIENTS)
    )
    elapsed_s = time.monotonic() - started_s
    print(f"baseline: {len(problems)} problems from {N_CLIENTS} clients in {elapsed_s:.2f} s")
    return LoadRun(problems, responses, before, server.metrics())


def test_served_answers_are_the_models_answers(load_run, baseline_reference):
    expected = baseline_reference.solve([p.text for p in load_run.problems])
    assert [r.answer for r in load_run.responses] == expected


def test_served_answers_are_correct_sums(load_run):
    if not trained():
        pytest.skip("no trained baseline: models/onnx-baseline and models/baseline.pt missing")
    assert len(load_run.problems) >= 200
    pairs = zip(load_run.problems, load_run.responses)
    wrong = [(p.text, r.answer) for p, r in pairs if r.answer != p.answer]
    assert not wrong, f"{len(wrong)} of {len(load_run.problems)} wrong, e.g. {wrong[:5]}"


def test_forward_passes_per_output_token_is_one(load_run):
    responses = load_run.responses
    tokens = sum(len(r.tokens) for r in responses)
    n = len(responses)
    assert load_run.delta("trex_output_tokens_total") == tokens
    assert load_run.delta("trex_compiler_forward_passes_total") == tokens
    assert load_run.delta("trex_executor_steps_total") == tokens - n
    assert sum(r.compiler_passes for r in responses) == tokens
    # each answer's own passes / tokens is exactly 1
    assert load_run.delta("trex_forward_passes_per_token_count") == n
    assert load_run.delta("trex_forward_passes_per_token_sum") == pytest.approx(n)
    # prefill batches hold several problems, one forward pass per row
    batches = load_run.delta("trex_compile_batches_total")
    assert load_run.delta("trex_batch_size_sum", phase="compile") == n
    assert n / batches > 1, f"{n} problems in {batches} prefill calls"
    assert load_run.delta("trex_requests_total", method="Solve", code="OK") == n


def test_model_info_carries_the_kind(server, baseline_reference):
    info = [k for k in server.metrics() if k[0] == "trex_model_info"]
    assert len(info) == 1
    labels = dict(info[0][1])
    assert labels["kind"] == "baseline"
    assert labels["model_version"] == baseline_reference.model_version


def test_step_limit_beyond_the_baseline_is_capped(server):
    assert "beyond the baseline's max_steps" in server.log()


def test_client_prints_the_answer_in_written_order(server, baseline_reference):
    problem = "9999999999+1="
    expected = baseline_reference.solve([problem])[0]
    for args in (["--stream"], []):
        out = run_client(server.target, *args, problem)
        assert out.returncode == 0, out.stderr
        assert out.stdout == expected + "\n", args
    out = run_client(server.target, "--stats", problem)
    figures = dict(field.split("=", 1) for field in out.stdout.rstrip("\n").split("\t")[1].split())
    assert figures["passes_per_token"] == "1.000"
    assert int(figures["executor_steps"]) == int(figures["tokens"]) - 1


def test_model_kind_flag_refuses_an_export_of_the_other_kind(baseline_model_dir, tmp_path):
    process = ServerProcess(baseline_model_dir, tmp_path / "server.log", model_kind="trex")
    try:
        assert process.proc.wait(timeout=60) == 1
        assert "a baseline model, but trex was asked for" in process.log()
    finally:
        process.stop()

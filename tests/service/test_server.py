"""The gRPC service end to end: real server subprocesses serving the exported model."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from protos.trex.v1 import trex_pb2, trex_pb2_grpc
from service.server import ServerConfig, TrexServer, event_loop_runner, parse_args
from tests.service.conftest import REPO, chosen_model_dir, expected_tokens, metric, wait_for
from training.data import Problem, held_out_set

N_LOAD_PROBLEMS = 1010
N_CLIENTS = 32
END = "<end>"


def solver(server) -> trex_pb2_grpc.SolverStub:
    return trex_pb2_grpc.SolverStub(grpc.insecure_channel(server.target))


def solve_request(problem: str) -> trex_pb2.SolveRequest:
    return trex_pb2.SolveRequest(problem=problem)


# --- answers ---


def test_solve_returns_the_answer_and_its_figures(server, reference):
    response = solver(server).Solve(solve_request("7669+10132="), timeout=30)

    assert response.answer == reference.solve(["7669+10132="])[0]
    assert list(response.tokens) == expected_tokens(reference, "7669+10132=")
    ended = response.tokens[-1] == END
    assert response.stop_reason == (
        trex_pb2.STOP_REASON_END if ended else trex_pb2.STOP_REASON_STEP_LIMIT
    )
    assert response.compiler_passes == 1
    assert response.executor_steps == len(response.tokens)
    assert response.model_version == reference.model_version
    assert response.compile_time.ToNanoseconds() > 0
    assert response.execute_time.ToNanoseconds() > 0
    assert response.queue_time.ToNanoseconds() >= 0


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_either_event_loop_serves_solve_and_streams(start_server, reference, event_loop):
    if event_loop == "uvloop":
        pytest.importorskip("uvloop")
    server = start_server(event_loop=event_loop, switch_interval_ms=5)
    stub = solver(server)
    response = stub.Solve(solve_request("7669+10132="), timeout=30)
    assert list(response.tokens) == expected_tokens(reference, "7669+10132=")
    messages = list(stub.SolveStream(solve_request("999+1="), timeout=30))
    streamed = [m.token.text for m in messages if m.HasField("token")]
    assert streamed == expected_tokens(reference, "999+1=")
    assert f"event loop: {'uvloop' if event_loop == 'uvloop' else 'asyncio'}" in server.log()


def test_solve_stream_sends_each_token_then_the_result(server, reference):
    messages = list(solver(server).SolveStream(solve_request("9999999999+1="), timeout=30))

    tokens, result = messages[:-1], messages[-1]
    assert all(m.HasField("token") for m in tokens) and result.HasField("result")
    assert [m.token.step for m in tokens] == list(range(1, len(tokens) + 1))
    assert [m.token.text for m in tokens] == list(result.result.tokens)
    assert list(result.result.tokens) == expected_tokens(reference, "9999999999+1=")
    assert result.result.answer == reference.solve(["9999999999+1="])[0]


def test_solve_batch_gives_each_problem_its_own_status(server, reference):
    problems = ["1+2=", "1+a=", "7669+10132=", "", "12345678901+1="]
    response = solver(server).SolveBatch(trex_pb2.SolveBatchRequest(problems=problems), timeout=30)

    codes = [r.status.code for r in response.results]
    ok, invalid = grpc.StatusCode.OK.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert codes == [ok, invalid, ok, invalid, invalid]
    assert "letter 'a'" in response.results[1].status.message
    expected = reference.solve(["1+2=", "7669+10132="])
    assert [response.results[i].result.answer for i in (0, 2)] == expected
    assert not response.results[1].HasField("result")


BAD_PROBLEMS = [
    ("", "empty"),
    ("12+ab=", "letter 'a'"),
    ("-12+3=", "operator '-'"),
    ("12 + 3=", "whitespace"),
    ("1٣+2=", "not an ASCII digit"),  # Arabic-Indic three
    ("３+4=", "not an ASCII digit"),  # fullwidth three
    ("12345678901+1=", "at most 10"),
    ("12+34", "missing '='"),
    ("1234=", "missing '+'"),
    ("1+2+3=", "more than one '+'"),
    ("2*3=", "operator '*'"),
    ("12+34=46", "after '='"),
    ("12+34=x", "letter 'x'"),
]


@pytest.mark.parametrize("problem, reason", BAD_PROBLEMS)
def test_bad_problems_are_invalid_argument(server, problem, reason):
    with pytest.raises(grpc.RpcError) as refused:
        solver(server).Solve(solve_request(problem), timeout=10)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert reason in refused.value.details()


def test_bad_problem_on_a_stream_fails_before_any_token(server):
    with pytest.raises(grpc.RpcError) as refused:
        list(solver(server).SolveStream(solve_request("1+2"), timeout=10))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# --- many clients at once ---


async def solve_concurrently(target: str, problems: list[str], clients: int) -> list:
    """Each client has its own channel and solves problems one after another."""
    responses: list = [None] * len(problems)
    todo = iter(range(len(problems)))

    async def client():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = trex_pb2_grpc.SolverStub(channel)
            for i in todo:  # a shared iterator: each index goes to one client
                responses[i] = await stub.Solve(solve_request(problems[i]), timeout=120)

    await asyncio.gather(*(client() for _ in range(clients)))
    return responses


@dataclass(repr=False)  # the default repr would print every response on a failure
class LoadRun:
    problems: list[Problem]
    responses: list[trex_pb2.SolveResponse]
    before: dict
    after: dict

    def delta(self, name: str, **labels) -> float:
        return metric(self.after, name, **labels) - metric(self.before, name, **labels)


@pytest.fixture(scope="module")
def load_run(server) -> LoadRun:
    """N_LOAD_PROBLEMS held-out problems from N_CLIENTS concurrent clients, with the
    server's metrics scraped before and after."""
    problems = held_out_set(N_LOAD_PROBLEMS)
    before = server.metrics()
    started_s = time.monotonic()
    responses = asyncio.run(
        solve_concurrently(server.target, [p.text for p in problems], N_CLIENTS)
    )
    elapsed_s = time.monotonic() - started_s
    print(f"{len(problems)} problems from {N_CLIENTS} clients in {elapsed_s:.2f} s")
    return LoadRun(problems, responses, before, server.metrics())


def test_served_answers_are_the_models_answers(load_run, reference):
    expected = reference.solve([p.text for p in load_run.problems])
    assert [r.answer for r in load_run.responses] == expected


def test_served_answers_are_correct_sums(load_run):
    if chosen_model_dir() is None:
        pytest.skip("no shipped model: models/onnx is missing and TREX_TEST_MODEL_DIR unset")
    pairs = zip(load_run.problems, load_run.responses)
    wrong = [(p.text, r.answer) for p, r in pairs if r.answer != p.answer]
    # NOTE: the model's acceptance bar is 99.9% exact match, not 100% (the shipped one
    # scores 100.000% on the 20,000-problem set), so a retrained model may miss one of
    # these; at least 1,000 right answers and that bar are required.
    assert N_LOAD_PROBLEMS - len(wrong) >= 1000, f"{len(wrong)} wrong, e.g. {wrong[:5]}"
    assert len(wrong) <= N_LOAD_PROBLEMS // 1000, f"{len(wrong)} wrong, e.g. {wrong[:5]}"


def test_compile_batches_hold_several_problems(load_run):
    passes = load_run.delta("trex_compiler_forward_passes_total")
    batches = load_run.delta("trex_compile_batches_total")
    assert passes == N_LOAD_PROBLEMS
    assert passes / batches > 1, f"{passes} problems in {batches} compiler calls"
    assert load_run.delta("trex_batch_size_sum", phase="compile") == passes
    assert load_run.delta("trex_batch_size_count", phase="compile") == batches


def test_forward_passes_per_token_is_compiler_passes_over_output_tokens(load_run):
    responses = load_run.responses
    tokens = sum(len(r.tokens) for r in responses)
    assert load_run.delta("trex_output_tokens_total") == tokens
    assert load_run.delta("trex_executor_steps_total") == sum(r.executor_steps for r in responses)
    ratio = load_run.delta("trex_compiler_forward_passes_total") / tokens
    assert ratio == pytest.approx(sum(r.compiler_passes for r in responses) / tokens)

    # the per-request histogram holds each response's own passes / tokens
    assert load_run.delta("trex_forward_passes_per_token_count") == N_LOAD_PROBLEMS
    per_request = sum(r.compiler_passes / len(r.tokens) for r in responses)
    assert load_run.delta("trex_forward_passes_per_token_sum") == pytest.approx(per_request)
    for name in ("request", "queue", "compile", "execute"):
        count = load_run.delta(f"trex_{name}_duration_seconds_count")
        assert count == N_LOAD_PROBLEMS, name
    assert load_run.delta("trex_requests_total", method="Solve", code="OK") == N_LOAD_PROBLEMS


def test_gauges_return_to_zero_after_the_load(server, load_run):
    samples = wait_for(
        lambda: (s := server.metrics()) and metric(s, "trex_active_rows") == 0 and s,
        what="active rows back to 0",
    )
    assert metric(samples, "trex_queue_length") == 0


# --- health and reflection ---


def test_health_is_serving_for_the_server_and_the_service(server):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    for service in ("", "trex.v1.Solver"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(server):
    db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(server.target))
    assert {"trex.v1.Solver", "grpc.health.v1.Health"} <= set(db.get_services())
    proto = db.FindFileContainingSymbol("trex.v1.Solver")
    methods = [m.name for m in proto.service[0].method]
    assert methods == ["Solve", "SolveStream", "SolveBatch", "Inspect"]


def test_model_info_names_version_and_provider(server, reference):
    samples = server.metrics()
    info = [k for k in samples if k[0] == "trex_model_info"]
    assert len(info) == 1
    labels = dict(info[0][1])
    assert labels["model_version"] == reference.model_version
    assert labels["provider"] == "CPUExecutionProvider"


def test_health_turns_serving_only_once_the_model_is_loaded(model_dir, reference):
    serving = health_pb2.HealthCheckResponse.SERVING

    async def scenario():
        config = ServerConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            model_dir=str(model_dir),
            provider="cpu",
            intra_op_threads=1,
        )
        server = TrexServer(config)
        port = await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = trex_pb2_grpc.SolverStub(channel)
            check = health_pb2.HealthCheckRequest(service="trex.v1.Solver")

            # port open, model not loaded: NOT_SERVING, and calls are refused
            assert (await health.Check(check)).status != serving
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Solve(solve_request("1+2="))
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

            await server.load()
            assert (await health.Check(check)).status == serving
            answer = (await stub.Solve(solve_request("1+2="))).answer
        await server.stop(grace_s=1)
        return answer

    assert asyncio.run(scenario()) == reference.solve(["1+2="])[0]


# --- refusals, deadlines and cancellation ---


@pytest.fixture(scope="module")
def slow_server(start_server):
    """A server whose queue holds 4 problems that wait 3 s for batch-mates: time enough to
    fill the queue, miss a deadline or cancel while they wait."""
    return start_server(max_queue=4, max_queue_delay_ms=3000, max_compile_batch=64)


def test_full_queue_is_resource_exhausted(slow_server, reference):
    stub = solver(slow_server)
    before = slow_server.metrics()
    held = [stub.Solve.future(solve_request(f"{i}+1="), timeout=30) for i in range(4)]
    wait_for(lambda: metric(slow_server.metrics(), "trex_queue_length") == 4, what="4 queued")

    with pytest.raises(grpc.RpcError) as refused:
        stub.Solve(solve_request("5+1="), timeout=10)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

    # the held ones are answered once their batch runs
    answers = [f.result().answer for f in held]
    assert answers == reference.solve([f"{i}+1=" for i in range(4)])
    refused = ("trex_requests_total", {"method": "Solve", "code": "RESOURCE_EXHAUSTED"})
    after = slow_server.metrics()
    assert metric(after, refused[0], **refused[1]) == metric(before, refused[0], **refused[1]) + 1


def test_passed_deadline_is_deadline_exceeded_and_frees_the_row(slow_server):
    before = slow_server.metrics()
    with pytest.raises(grpc.RpcError) as expired:
        solver(slow_server).Solve(solve_request("1+2="), timeout=0.3)
    assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

    # the server counts the call when its handler ends, which can be a moment after
    # the client's own deadline fired
    expired_label = {"method": "Solve", "code": "DEADLINE_EXCEEDED"}
    expired_before = metric(before, "trex_requests_total", **expired_label)
    samples = wait_for(
        lambda: (
            (s := slow_server.metrics())
            and metric(s, "trex_queue_length") == 0
            and metric(s, "trex_requests_total", **expired_label) > expired_before
            and s
        ),
        what="the expired problem to leave the queue and be counted",
    )
    assert metric(samples, "trex_active_rows") == 0
    for name, labels, increase in [
        ("trex_requests_total", expired_label, 1),
        ("trex_compiler_forward_passes_total", {}, 0),  # it never reached the compiler
    ]:
        assert metric(samples, name, **labels) == metric(before, name, **labels) + increase


def test_cancelled_call_leaves_the_queue(slow_server):
    before = slow_server.metrics()
    call = solver(slow_server).Solve.future(solve_request("3+4="), timeout=30)
    wait_for(lambda: metric(slow_server.metrics(), "trex_queue_length") == 1, what="queued")
    call.cancel()

    samples = wait_for(
        lambda: (s := slow_server.metrics()) and metric(s, "trex_queue_length") == 0 and s,
        what="the cancelled problem to leave the queue",
    )
    cancelled = {"method": "Solve", "code": "CANCELLED"}
    assert metric(samples, "trex_requests_total", **cancelled) == (
        metric(before, "trex_requests_total", **cancelled) + 1
    )
    assert metric(samples, "trex_active_rows") == 0


@pytest.fixture(scope="module")
def one_row_per_step_server(start_server):
    """Steps one row at a time, so that with many rows active each row waits many steps
    between its tokens: a stream can be cancelled while its row is executing."""
    return start_server(max_execute_batch=1, max_queue_delay_ms=0)


def test_cancelled_stream_frees_its_executing_row(one_row_per_step_server, reference):
    server = one_row_per_step_server
    stub = solver(server)
    candidates = ["9999999999+9999999999=", "1234567890+8765432110=", "9999999999+1="]
    problem = max(candidates, key=lambda p: len(expected_tokens(reference, p)))
    full_tokens = len(expected_tokens(reference, problem))
    assert full_tokens >= 2
    filler = [f"{i:010d}+9999999999=" for i in range(200)]
    before = server.metrics()

    # 200 rows executing, then the stream: its row is stepped once every ~200 steps
    batch = stub.SolveBatch.future(trex_pb2.SolveBatchRequest(problems=filler), timeout=120)
    wait_for(lambda: metric(server.metrics(), "trex_active_rows") >= 100, what="rows active")
    stream = stub.SolveStream(solve_request(problem), timeout=120)
    first = next(stream)
    assert first.token.step == 1
    stream.cancel()

    filler_tokens = sum(len(r.result.tokens) for r in batch.result().results)
    samples = wait_for(
        lambda: (s := server.metrics()) and metric(s, "trex_active_rows") == 0 and s,
        what="every row freed",
    )
    stream_tokens = (
        metric(samples, "trex_output_tokens_total")
        - metric(before, "trex_output_tokens_total")
        - filler_tokens
    )
    assert 1 <= stream_tokens < full_tokens, "the cancelled row kept executing"
    assert metric(samples, "trex_requests_total", method="SolveStream", code="CANCELLED") == 1


# --- shutdown ---


def test_sigterm_answers_calls_in_flight_then_exits_zero(start_server, reference):
    server = start_server(max_queue_delay_ms=2000, grace_period_s=20)
    stub = solver(server)
    problems = [f"{i}+{i}=" for i in range(20)]
    held = [stub.Solve.future(solve_request(p), timeout=30) for p in problems]
    wait_for(lambda: metric(server.metrics(), "trex_queue_length") == 20, what="20 held")

    # a health watcher hears NOT_SERVING when the drain starts
    statuses = []
    watch = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target)).Watch(
        health_pb2.HealthCheckRequest(service="trex.v1.Solver")
    )

    def watch_until_closed():
        try:
            statuses.extend(reply.status for reply in watch)
        except grpc.RpcError:  # the server went away: the end of the watch
            pass

    watcher = threading.Thread(target=watch_until_closed)
    watcher.start()
    wait_for(lambda: statuses, what="the first health status")

    started_s = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    answers = [f.result().answer for f in held]
    assert server.proc.wait(timeout=20) == 0
    assert time.monotonic() - started_s < 10, "shutdown waited for the grace period"
    watcher.join(timeout=10)

    assert answers == reference.solve(problems)
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    assert "stopped" in server.log()


# --- packaging ---


def test_service_never_imports_torch():
    modules = ["service.server", "service.client", "service.engine", "service.runtime"]
    code = f"import sys; import {', '.join(modules)}; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --- command line ---


def test_flags_fall_back_to_env_vars_then_defaults(monkeypatch):
    monkeypatch.setenv("TREX_MAX_QUEUE", "7")
    monkeypatch.setenv("TREX_MAX_QUEUE_DELAY_MS", "0.5")
    config = parse_args(["--port", "6000"])
    assert (config.port, config.max_queue, config.max_queue_delay_ms) == (6000, 7, 0.5)
    assert config.max_compile_batch == ServerConfig().max_compile_batch
    assert parse_args(["--max-queue", "9"]).max_queue == 9  # a flag beats the env


def test_bad_env_value_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("TREX_PORT", "fifty")
    with pytest.raises(SystemExit) as usage:
        parse_args([])
    assert usage.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_event_loop_auto_is_uvloop_where_installed_else_asyncio():
    assert event_loop_runner("asyncio") is None
    try:
        import uvloop
    except ImportError:
        assert event_loop_runner("auto") is None
    else:
        assert event_loop_runner("auto") is uvloop.run
        assert event_loop_runner("uvloop") is uvloop.run


def test_switch_interval_must_be_positive(capsys):
    assert parse_args(["--switch-interval-ms", "1.5"]).switch_interval_ms == 1.5
    with pytest.raises(SystemExit) as usage:
        parse_args(["--switch-interval-ms", "0"])
    assert usage.value.code == 2
    assert "--switch-interval-ms must be positive" in capsys.readouterr().err


def test_out_of_range_knob_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as usage:
        parse_args(["--max-queue", "0"])
    assert usage.value.code == 2
    assert "--max-queue must be at least 1" in capsys.readouterr().err

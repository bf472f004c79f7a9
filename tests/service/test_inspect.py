"""Inspect: the program, embedding and hidden states of a served problem, replayed in numpy.

The replay below is a plain GRU step written from the proto's description alone (gates r, z,
n as torch orders them), so it checks the reply, not the service's own arithmetic.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.trex.v1 import trex_pb2, trex_pb2_grpc
from service.errors import Unsupported
from service.runtime import Runtime
from tests.service.conftest import REPO, ServerProcess, expected_tokens, metric, wait_for
from tests.service.test_engine import make_engine

PROBLEMS = ["7669+10132=", "9999999999+1=", "0+0=", "1234567890+9876543210=", "05+5="]
HIDDEN_ATOL = 1e-4
FULL, SUMMARY = trex_pb2.PROGRAM_DETAIL_FULL, trex_pb2.PROGRAM_DETAIL_SUMMARY


def solver(server) -> trex_pb2_grpc.SolverStub:
    return trex_pb2_grpc.SolverStub(grpc.insecure_channel(server.target))


def inspect(server, problem: str, detail: int = FULL) -> trex_pb2.InspectResponse:
    request = trex_pb2.InspectRequest(problem=problem, program_detail=detail)
    return solver(server).Inspect(request, timeout=30)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def replay(values, layout, embedding, start_id: int, end_id: int, max_steps: int):
    """Greedy decoding with a program, in float64: -> token ids, hidden state after each step.

    values: the flat program; layout: (name, shape, offset, size) per tensor; embedding (V, E).
    """
    values = np.asarray(values, np.float64)
    p = {name: values[a : a + n].reshape(shape) for name, shape, a, n in layout}
    h = p["h0"]
    token, tokens, states = start_id, [], []
    for _ in range(max_steps):
        gi = p["w_ih"] @ embedding[token] + p["b_ih"]  # (3H,)
        gh = p["w_hh"] @ h + p["b_hh"]
        i_r, i_z, i_n = np.split(gi, 3)
        h_r, h_z, h_n = np.split(gh, 3)
        r, z = sigmoid(i_r + h_r), sigmoid(i_z + h_z)
        h = (1 - z) * np.tanh(i_n + r * h_n) + z * h
        token = int(np.argmax(p["w_out"] @ h + p["b_out"]))
        tokens.append(token)
        states.append(h)
        if token == end_id:
            break
    return tokens, states


def replay_reply(reply: trex_pb2.InspectResponse):
    layout = [(t.name, tuple(t.shape), t.offset, t.size) for t in reply.program.layout]
    embedding = np.asarray(reply.embedding.values, np.float64).reshape(tuple(reply.embedding.shape))
    end_id = list(reply.vocab).index("<end>")
    return replay(
        reply.program.values, layout, embedding, reply.start_token_id, end_id, len(reply.steps)
    )


def assert_replays(tokens, states, reply_tokens, reply_states) -> None:
    assert tokens == reply_tokens
    assert len(states) == len(reply_states)
    for t, (mine, served) in enumerate(zip(states, reply_states), start=1):
        np.testing.assert_allclose(mine, served, atol=HIDDEN_ATOL, err_msg=f"step {t}")


# --- the full program ---


@pytest.mark.parametrize("problem", PROBLEMS)
def test_replaying_the_program_gives_the_hidden_states_and_the_answer(server, reference, problem):
    reply = inspect(server, problem)

    assert reply.problem == problem
    assert reply.model_version == reference.model_version
    assert list(reply.vocab) == reference.vocab
    assert reply.answer == reference.solve([problem])[0]
    assert [t.text for t in reply.tokens] == expected_tokens(reference, problem)
    assert [t.step for t in reply.tokens] == list(range(1, len(reply.tokens) + 1))
    assert [s.token for s in reply.steps] == list(reply.tokens)
    ended = reply.tokens[-1].text == "<end>"
    assert reply.stop_reason == (
        trex_pb2.STOP_REASON_END if ended else trex_pb2.STOP_REASON_STEP_LIMIT
    )

    program = reply.program
    assert program.size == len(program.values) == reference.program_size
    assert [(t.name, list(t.shape), t.offset, t.size) for t in program.layout] == [
        (p["name"], p["shape"], p["offset"], p["size"]) for p in reference.program_layout
    ]
    assert not program.summary
    h0 = next(t for t in program.layout if t.name == "h0")
    values = np.asarray(program.values, np.float32)
    np.testing.assert_array_equal(reply.initial_hidden, values[h0.offset : h0.offset + h0.size])
    assert all(len(s.hidden) == reference.hidden_size for s in reply.steps)

    tokens, states = replay_reply(reply)
    assert_replays(tokens, states, [t.id for t in reply.tokens], [s.hidden for s in reply.steps])
    assert reference.decode(tokens) == reply.answer


def test_the_program_is_the_one_the_compiler_writes(server, reference):
    reply = inspect(server, "7669+10132=")
    reference.compile(reference.encode(["7669+10132="]), [0])
    # served in another batch than this lone compile: equal up to float32 rounding
    np.testing.assert_allclose(reply.program.values, reference.read_program(0), atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(reply.embedding.values, np.float32).reshape(tuple(reply.embedding.shape)),
        reference.executor_embedding,
    )


def test_inspected_rows_among_other_problems_replay(server, reference):
    """Inspections compiled and stepped in the same batches as plain solves: each records
    its own row."""
    others = [f"{i * 7919}+{i * 104729}=" for i in range(48)]
    inspected = PROBLEMS[:3]

    async def calls():
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = trex_pb2_grpc.SolverStub(channel)
            batch = stub.SolveBatch(trex_pb2.SolveBatchRequest(problems=others), timeout=60)
            replies = [
                stub.Inspect(trex_pb2.InspectRequest(problem=p), timeout=60) for p in inspected
            ]
            return await asyncio.gather(batch, *replies)

    batch, *replies = asyncio.run(calls())
    assert [r.result.answer for r in batch.results] == reference.solve(others)
    for problem, reply in zip(inspected, replies):
        assert reply.answer == reference.solve([problem])[0]
        tokens, states = replay_reply(reply)
        served = [t.id for t in reply.tokens], [s.hidden for s in reply.steps]
        assert_replays(tokens, states, *served)


# --- the summary ---


def test_summary_gives_each_tensors_statistics(server):
    full = inspect(server, "7669+10132=", FULL)
    summary = inspect(server, "7669+10132=", SUMMARY)

    assert not summary.program.values
    assert summary.program.layout == full.program.layout
    assert summary.answer == full.answer
    assert [s.token for s in summary.steps] == [s.token for s in full.steps]
    assert [t.name for t in summary.program.summary] == [t.name for t in full.program.layout]
    values = np.asarray(full.program.values, np.float64)
    for layout, stats in zip(full.program.layout, summary.program.summary):
        assert list(stats.shape) == list(layout.shape)
        tensor = values[layout.offset : layout.offset + layout.size]
        # two calls, two compiles: the same program up to float32 rounding
        expected = {
            "mean": tensor.mean(),
            "std": tensor.std(),
            "min": tensor.min(),
            "max": tensor.max(),
            "l2_norm": np.linalg.norm(tensor),
        }
        for name, value in expected.items():
            assert getattr(stats, name) == pytest.approx(value, rel=1e-4, abs=1e-5), (
                layout.name,
                name,
            )
        assert stats.min <= stats.mean <= stats.max and stats.std >= 0


def test_unspecified_detail_is_the_full_program(server):
    reply = inspect(server, "1+2=", trex_pb2.PROGRAM_DETAIL_UNSPECIFIED)
    assert len(reply.program.values) == reply.program.size and not reply.program.summary


# --- refusals and metrics ---


@pytest.mark.parametrize(
    "problem, reason", [("12+ab=", "letter 'a'"), ("12345678901+1=", "at most 10"), ("", "empty")]
)
def test_invalid_problem_is_invalid_argument(server, problem, reason):
    with pytest.raises(grpc.RpcError) as refused:
        inspect(server, problem)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert reason in refused.value.details()


def test_unknown_program_detail_is_invalid_argument(server):
    with pytest.raises(grpc.RpcError) as refused:
        inspect(server, "1+2=", 7)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "program_detail 7" in refused.value.details()


def inspect_calls(samples: dict, code: str) -> float:
    return metric(samples, "trex_requests_total", method="Inspect", code=code)


def test_inspect_is_counted_by_method_and_code(server):
    before = server.metrics()
    inspect(server, "1+2=")
    with pytest.raises(grpc.RpcError):
        inspect(server, "1+b=")

    # a refused call is counted just after its status is sent: poll for it
    def counted():
        after = server.metrics()
        deltas = {
            c: inspect_calls(after, c) - inspect_calls(before, c)
            for c in ("OK", "INVALID_ARGUMENT")
        }
        return deltas if deltas["INVALID_ARGUMENT"] else None

    assert wait_for(counted, what="the refused Inspect counted") == {"OK": 1, "INVALID_ARGUMENT": 1}


@pytest.fixture(scope="module")
def baseline_server(baseline_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("inspect-baseline") / "server.log"
    process = ServerProcess(baseline_model_dir, log_path, model_kind="baseline")
    try:
        process.wait_serving()
        yield process
    finally:
        process.stop()


def test_baseline_server_refuses_with_failed_precondition(baseline_server, baseline_reference):
    with pytest.raises(grpc.RpcError) as refused:
        inspect(baseline_server, "7669+10132=")
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details()
    assert "Inspect needs a T-REX model" in details
    assert baseline_reference.model_version in details
    count = wait_for(
        lambda: inspect_calls(baseline_server.metrics(), "FAILED_PRECONDITION"),
        what="the refused Inspect counted",
    )
    assert count == 1
    # Solve still serves
    reply = solver(baseline_server).Solve(trex_pb2.SolveRequest(problem="1+2="), timeout=30)
    assert reply.answer == baseline_reference.solve(["1+2="])[0]


# --- the engine: what recording costs ---


class CountingReads:
    """The real runtime, counting the host copies of pool rows the engine asks for."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.programs: Counter[int] = Counter()
        self.hidden: Counter[int] = Counter()

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def read_program(self, row):
        self.programs[int(row)] += 1
        return self.runtime.read_program(row)

    def read_hidden(self, row):
        self.hidden[int(row)] += 1
        return self.runtime.read_hidden(row)


@pytest.fixture(scope="module", params=["host", "device"])
def runtime(model_dir, request) -> Runtime:
    """Both pools: the device pool's reads run on the CPU too (OrtValues in host memory)."""
    return Runtime(model_dir, provider="cpu", intra_op_threads=1, max_rows=16, pool=request.param)


def test_only_the_inspected_row_is_copied_to_the_host(runtime):
    counting = CountingReads(runtime)
    others = ["1+2=", "12345+54321=", "999+1=", "9999999999+9999999999="]

    async def scenario():
        engine = make_engine(counting)
        engine.start()
        try:
            return await asyncio.gather(
                engine.inspect("7669+10132="), *(engine.solve(p) for p in others)
            )
        finally:
            await engine.stop()

    (request, trace), *solved = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert [runtime.decode(r.tokens) for r in solved] == runtime.solve(others)
    assert len(counting.programs) == len(counting.hidden) == 1  # one row, the inspected one
    assert sum(counting.programs.values()) == 1
    assert sum(counting.hidden.values()) == 1 + len(request.tokens)  # initial, then per step

    # the trace is that row's: the same program stepped alone gives the same states
    (row,) = counting.programs
    runtime.compile(runtime.encode(["7669+10132="]), [row])
    np.testing.assert_allclose(trace.program, runtime.read_program(row), atol=1e-5)
    np.testing.assert_allclose(trace.initial_hidden, runtime.read_hidden(row), atol=1e-5)
    token = np.array([runtime.start_id])
    for t, hidden in enumerate(trace.hidden):
        token = runtime.step([row], token)
        assert int(token[0]) == request.tokens[t]
        np.testing.assert_allclose(hidden, runtime.read_hidden(row), atol=1e-5)


def test_an_export_without_the_embedding_refuses_to_record(model_dir, tmp_path):
    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["executor_embedding"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    rt = Runtime(copy, provider="cpu", intra_op_threads=1, max_rows=4)

    async def scenario():
        engine = make_engine(rt)
        engine.start()
        try:
            with pytest.raises(Unsupported, match="no executor_embedding.*re-export"):
                engine.submit("1+2=", record=True)
            return await engine.solve("1+2=")  # solving does not need it
        finally:
            await engine.stop()

    assert rt.decode(asyncio.run(scenario()).tokens) == rt.solve(["1+2="])[0]


# --- trex-client --inspect ---


def run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.client", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )


def test_client_writes_a_replayable_json_file(server, reference, tmp_path):
    out = tmp_path / "inspect.json"
    done = run_client("--target", server.target, "--inspect", "7669+10132=", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == reference.solve(["7669+10132="])[0] + "\n"

    record = json.loads(out.read_text())
    program = record["program"]
    assert len(program["values"]) == program["size"] == reference.program_size
    layout = [(t["name"], tuple(t["shape"]), t["offset"], t["size"]) for t in program["layout"]]
    embedding = np.asarray(record["embedding"]["values"], np.float64)
    embedding = embedding.reshape(record["embedding"]["shape"])
    steps = record["steps"]
    tokens, states = replay(
        program["values"],
        layout,
        embedding,
        record["start_token_id"],
        record["vocab"].index("<end>"),
        len(steps),
    )
    assert_replays(tokens, states, [s["token"]["id"] for s in steps], [s["hidden"] for s in steps])
    assert record["answer"] == done.stdout.strip()


def test_client_summary_and_refusals(server, tmp_path):
    out = tmp_path / "summary.json"
    args = ("--target", server.target, "--inspect", "1+2=", "--out", str(out))
    done = run_client(*args, "--summary")
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["program"]["values"] == []
    assert [s["name"] for s in record["program"]["summary"]] == [
        t["name"] for t in record["program"]["layout"]
    ]

    bad = run_client("--target", server.target, "--inspect", "1+x=", "--out", str(out))
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
    usage = run_client("--target", server.target, "--inspect", "1+2=")
    assert usage.returncode == 2 and "--inspect needs --out" in usage.stderr

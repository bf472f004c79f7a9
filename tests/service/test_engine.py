"""The engine in-process, on the real runtime: cancellation, shutdown and failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from service.engine import Engine
from service.errors import Cancelled, ExecutionFailed, InvalidProblem, ShuttingDown
from service.metrics import Metrics
from service.runtime import Runtime
from service.scheduler import SchedulerConfig, State

LONG = "9999999999+9999999999="


@pytest.fixture(scope="module")
def runtime(model_dir) -> Runtime:
    return Runtime(model_dir, provider="cpu", intra_op_threads=1, max_rows=16)


def make_engine(runtime, **overrides) -> Engine:
    config = SchedulerConfig(
        max_rows=runtime.max_rows,
        max_compile_batch=8,
        max_execute_batch=16,
        max_queue_delay_ns=1_000_000,
        max_queue=32,
        step_limit=runtime.max_steps,
        start_id=runtime.start_id,
        end_id=runtime.end_id,
    )
    return Engine(runtime, replace(config, **overrides), Metrics(CollectorRegistry()))


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


class FaultyRuntime:
    """The real runtime, with a fault injected for one problem: its compile raises, or
    every executor call that includes its row raises."""

    def __init__(self, runtime: Runtime, bad_problem: str, fail_in: str):
        self.runtime = runtime
        self.bad_problem = bad_problem
        self.fail_in = fail_in
        self.bad_rows: set[int] = set()

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def compile(self, ids, rows):
        texts = ["".join(self.vocab[i] for i in row if i != self.pad_id) for row in ids]
        bad = [int(r) for r, text in zip(rows, texts) if text == self.bad_problem]
        if bad and self.fail_in == "compile":
            raise RuntimeError("injected compiler fault")
        first = self.runtime.compile(ids, rows)  # the baseline's first tokens, or None
        self.bad_rows = set(bad)
        return first

    def step(self, rows, tokens):
        if self.fail_in == "step" and self.bad_rows & {int(r) for r in rows}:
            raise RuntimeError("injected executor fault")
        return self.runtime.step(rows, tokens)


def check_a_failing_problem_does_not_fail_its_batch_mates(runtime, fail_in, make_engine):
    """One problem's runtime call fails; the others of its batch are still answered."""
    problems = ["1+2=", "12345+54321=", "7669+10132=", "999+1="]
    bad = "12345+54321="
    expected = dict(zip(problems, runtime.solve(problems)))

    async def scenario():
        engine = make_engine(FaultyRuntime(runtime, bad, fail_in))
        engine.start()
        outcomes = await asyncio.gather(
            *(engine.solve(p) for p in problems), return_exceptions=True
        )
        await engine.stop()
        return engine, dict(zip(problems, outcomes))

    engine, outcomes = run(scenario())
    assert isinstance(outcomes.pop(bad), ExecutionFailed)
    for problem, request in outcomes.items():
        assert runtime.decode(request.tokens) == expected[problem]
    assert engine.scheduler.active_rows == 0


@pytest.mark.parametrize("fail_in", ["compile", "step"])
def test_a_failing_problem_does_not_fail_its_batch_mates(runtime, fail_in):
    check_a_failing_problem_does_not_fail_its_batch_mates(runtime, fail_in, make_engine)


class GatedRuntime:
    """The real runtime, whose executor steps after the first wait for ``gate``: a test
    acts while a step is running on the engine thread."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.steps = 0
        self.in_step = threading.Event()
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def step(self, rows, tokens):
        self.steps += 1
        if self.steps > 1:
            self.in_step.set()
            self.gate.wait(30)
        return self.runtime.step(rows, tokens)


def test_release_frees_an_executing_row(runtime):
    async def scenario():
        gated = GatedRuntime(runtime)
        engine = make_engine(gated)
        engine.start()
        ticket = engine.submit(LONG)
        await asyncio.to_thread(gated.in_step.wait, 30)  # its second step is running
        assert ticket.request.state is State.ACTIVE  # compiled, not finished
        engine.release(ticket)
        with pytest.raises(Cancelled):
            await ticket.result()
        rows = engine.scheduler.active_rows
        gauge = engine.metrics.registry.get_sample_value("trex_active_rows")
        gated.gate.set()  # the step ends; its token for the released row is dropped
        await engine.stop()
        return rows, gauge, ticket.request, engine

    rows, gauge, request, engine = run(scenario())
    assert rows == 0 and gauge == 0
    assert request.row is None and request.stop_reason is None
    assert len(request.tokens) == 1  # the first step's; none from the step it was released in
    assert engine.scheduler.active_rows == 0
    assert engine.metrics.registry.get_sample_value("trex_active_rows") == 0


class ThreadRecordingRuntime:
    """The real runtime, noting which thread makes each call and how many overlap."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.threads: set[str] = set()
        self.inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def _call(self, fn, *args):
        with self._lock:
            self.threads.add(threading.current_thread().name)
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.inside -= 1

    def compile(self, ids, rows):
        return self._call(self.runtime.compile, ids, rows)

    def step(self, rows, tokens):
        return self._call(self.runtime.step, rows, tokens)


def test_runtime_calls_run_on_the_engine_thread_one_at_a_time(runtime):
    problems = [f"{i}+{7 * i}=" for i in range(1, 24)] + [LONG]  # more than a batch
    recording = ThreadRecordingRuntime(runtime)

    async def scenario():
        engine = make_engine(recording)
        engine.start()
        try:
            return await asyncio.gather(*(engine.solve(p) for p in problems))
        finally:
            await engine.stop()

    solved = run(scenario())
    assert [runtime.decode(r.tokens) for r in solved] == runtime.solve(problems)
    assert recording.threads == {"trex-engine"}  # not the event loop's thread
    assert recording.most_inside == 1


def test_a_failing_engine_loop_fails_the_requests_in_flight_and_carries_on(runtime):
    def broken_finish_compile(*args, **kwargs):
        raise RuntimeError("injected bug in the engine loop")

    async def scenario():
        engine = make_engine(runtime)
        first_scheduler = engine.scheduler
        first_scheduler.finish_compile = broken_finish_compile
        engine.start()
        (failed,) = await asyncio.gather(engine.solve("1+2="), return_exceptions=True)
        solved = await engine.solve("7669+10132=")  # served by a fresh scheduler
        await engine.stop()
        return engine, first_scheduler, failed, solved

    engine, first_scheduler, failed, solved = run(scenario())
    assert isinstance(failed, ExecutionFailed) and "internal error" in str(failed)
    assert engine.scheduler is not first_scheduler
    assert runtime.decode(solved.tokens) == runtime.solve(["7669+10132="])[0]
    assert engine.metrics.registry.get_sample_value("trex_active_rows") == 0


def test_stream_of_tokens_matches_the_finished_request(runtime):
    async def scenario():
        engine = make_engine(runtime)
        engine.start()
        ticket = engine.submit(LONG)
        streamed = [token async for token in ticket.tokens()]
        await engine.stop()
        return streamed, ticket.request

    streamed, request = run(scenario())
    assert streamed == request.tokens
    assert runtime.decode(streamed) == runtime.solve([LONG])[0]


def test_phases_finished_while_the_loop_is_busy_arrive_together_and_in_order(runtime):
    async def scenario():
        engine = make_engine(runtime)
        engine.start()
        ticket = engine.submit(LONG)
        # keep the loop busy (no await) until the engine thread has finished the answer
        while not ticket.request.done:
            time.sleep(0.001)
        with engine._lock:
            waiting = len(engine._outbox)  # phases whose results wait for the loop
        streamed = [token async for token in ticket.tokens()]
        await engine.stop()
        return waiting, streamed, ticket.request

    waiting, streamed, request = run(scenario())
    assert waiting == len(request.tokens) + 1  # the compile phase and one per step
    assert streamed == request.tokens
    assert runtime.decode(streamed) == runtime.solve([LONG])[0]


def test_stop_refuses_what_was_never_started(runtime):
    async def scenario():
        engine = make_engine(runtime, max_queue_delay_ns=60_000_000_000)  # waits for a batch
        engine.start()
        ticket = engine.submit("1+2=")
        await asyncio.sleep(0.05)
        await engine.stop()
        with pytest.raises(ShuttingDown):
            engine.submit("3+4=")
        return ticket

    ticket = run(scenario())
    assert ticket.done and isinstance(ticket.request.error, ShuttingDown)


def test_submit_validates_against_the_models_digit_limit(runtime):
    async def scenario():
        engine = make_engine(runtime)
        engine.start()
        try:
            engine.submit("1" * (runtime.max_digits + 1) + "+1=")
        finally:
            await engine.stop()

    with pytest.raises(InvalidProblem, match=f"at most {runtime.max_digits}"):
        run(scenario())

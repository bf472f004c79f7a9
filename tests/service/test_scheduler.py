"""The batching policy on its own: no gRPC, no ONNX Runtime, time passed in by hand."""

import dataclasses

import pytest

from service.errors import Cancelled, DeadlineExceeded, ExecutionFailed, QueueFull, ShuttingDown
from service.scheduler import (
    CompilePhase,
    ExecutePhase,
    Idle,
    Scheduler,
    SchedulerConfig,
    State,
    StopReason,
)

START, END = 1, 2
MS = 1_000_000  # ns


def make_scheduler(**overrides) -> Scheduler:
    config = SchedulerConfig(
        max_rows=8,
        max_compile_batch=4,
        max_execute_batch=8,
        max_queue_delay_ns=2 * MS,
        max_queue=16,
        step_limit=12,
        start_id=START,
        end_id=END,
    )
    return Scheduler(dataclasses.replace(config, **overrides))


def answer_ids(problem: str) -> list[int]:
    """What a perfect executor emits for ``problem``: the sum's digits, then <end>."""
    a, b = problem.rstrip("=").split("+")
    return [3 + int(d) for d in str(int(a) + int(b))] + [END]


def emit(phase: ExecutePhase) -> list[int]:
    """The next token of every row in the phase, as a perfect executor writes it."""
    return [answer_ids(r.problem)[len(r.tokens)] for r in phase.requests]


def run_until_idle(s: Scheduler, now_ns: int = 0) -> list:
    """Run phases until nothing is left; -> the phases, in order."""
    phases = []
    while True:
        phase = s.schedule(now_ns)
        if isinstance(phase, Idle):
            if phase.wake_ns is None:
                return phases
            now_ns = phase.wake_ns
            continue
        phases.append(phase)
        if isinstance(phase, CompilePhase):
            s.finish_compile(phase, now_ns)
        else:
            s.finish_execute(phase, emit(phase), now_ns)


def test_lone_problem_waits_for_batch_mates_up_to_the_queue_delay():
    s = make_scheduler()
    s.add("1+2=", now_ns=0)

    phase = s.schedule(now_ns=1 * MS)
    assert isinstance(phase, Idle) and phase.wake_ns == 2 * MS

    s.add("3+4=", now_ns=1 * MS)
    assert isinstance(s.schedule(now_ns=1 * MS), Idle)  # 2 of 4: still not full
    phase = s.schedule(now_ns=2 * MS)
    assert isinstance(phase, CompilePhase)
    assert [r.problem for r in phase.requests] == ["1+2=", "3+4="]


def test_full_batch_compiles_at_once_and_the_rest_waits():
    s = make_scheduler(max_compile_batch=4)
    for i in range(6):
        s.add(f"{i}+1=", now_ns=0)

    phase = s.schedule(now_ns=0)
    assert isinstance(phase, CompilePhase)
    assert len(phase.requests) == 4 and phase.rows == [0, 1, 2, 3]
    assert all(r.state is State.COMPILING for r in phase.requests)
    assert s.queue_length == 2 and s.active_rows == 4


def test_rows_join_between_steps_and_leave_when_done():
    s = make_scheduler(max_compile_batch=2)
    long, short = s.add("9999999999+1=", 0), s.add("1+1=", 0)  # 11 digits + <end>; 1 + <end>

    compile_ab = s.schedule(0)
    s.finish_compile(compile_ab, 0)
    step = s.schedule(0)
    assert isinstance(step, ExecutePhase) and step.tokens == [START, START]
    s.finish_execute(step, emit(step), 0)

    # a problem arriving mid-flight is compiled after one step, without waiting for a batch
    late = s.add("5+5=", now_ns=1)
    phase = s.schedule(now_ns=1)
    assert isinstance(phase, CompilePhase) and phase.requests == [late]
    assert phase.rows == [2]
    s.finish_compile(phase, 1)

    # the short answer ends on this step and gives its row back; the others carry on
    step = s.schedule(2)
    assert isinstance(step, ExecutePhase) and step.requests == [long, short, late]
    s.finish_execute(step, emit(step), 2)
    assert short.done and short.stop_reason is StopReason.END
    assert short.tokens == answer_ids("1+1=") and short.row is None
    assert s.active_rows == 2 and not long.done
    assert s.take_finished() == [short]

    # the freed row is the next one handed out
    newest = s.add("2+2=", now_ns=3)
    phase = s.schedule(3)
    assert isinstance(phase, CompilePhase) and phase.requests == [newest] and phase.rows == [1]
    s.finish_compile(phase, 3)

    run_until_idle(s, 4)
    for r in (long, late, newest):
        assert r.tokens == answer_ids(r.problem) and r.stop_reason is StopReason.END
    assert long.executor_steps == 12 and long.compiler_passes == 1
    assert s.active_rows == 0 and s.idle


def test_phases_alternate_while_problems_keep_arriving():
    s = make_scheduler(max_compile_batch=1, max_rows=8)
    s.add("9999999999+1=", 0)
    kinds = []
    for t in range(6):
        s.add(f"{t}+1=", t)  # one arrival per round: a compile between every two steps
        phase = s.schedule(t)
        kinds.append(type(phase).__name__)
        if isinstance(phase, CompilePhase):
            s.finish_compile(phase, t)
        else:
            s.finish_execute(phase, emit(phase), t)
    assert kinds == ["CompilePhase", "ExecutePhase"] * 3


def test_full_queue_refuses_until_it_drains():
    s = make_scheduler(max_queue=3, max_compile_batch=2)
    for i in range(3):
        s.add(f"{i}+0=", 0)
    with pytest.raises(QueueFull):
        s.add("1+1=", 0)
    assert s.queue_length == 3

    s.finish_compile(s.schedule(0), 0)  # two leave the queue
    s.add("1+1=", 0)
    assert s.queue_length == 2


def test_pool_rows_bound_the_problems_in_flight():
    s = make_scheduler(max_rows=2, max_compile_batch=4)
    requests = [s.add(f"{i}+9=", 0) for i in range(3)]

    phase = s.schedule(0)  # two rows free: a batch of two is already full
    assert isinstance(phase, CompilePhase) and len(phase.requests) == 2
    s.finish_compile(phase, 0)
    assert s.active_rows == 2 and s.queue_length == 1

    run_until_idle(s, 0)
    assert all(r.tokens == answer_ids(r.problem) for r in requests)
    assert s.active_rows == 0


def test_execute_batch_limit_steps_rows_in_turn():
    s = make_scheduler(max_execute_batch=2, max_compile_batch=3)
    a, b, c = (s.add(p, 0) for p in ("9999+1=", "8888+1=", "7777+1="))
    s.finish_compile(s.schedule(0), 0)

    stepped = []
    for _ in range(3):
        phase = s.schedule(0)
        assert isinstance(phase, ExecutePhase) and len(phase.requests) == 2
        stepped.append(phase.requests)
        s.finish_execute(phase, emit(phase), 0)
    assert stepped == [[a, b], [c, a], [b, c]]
    assert [r.executor_steps for r in (a, b, c)] == [2, 2, 2]


def test_cancel_frees_queued_and_active_rows():
    s = make_scheduler(max_compile_batch=2)
    active, other = s.add("99+1=", 0), s.add("5+5=", 0)
    s.finish_compile(s.schedule(0), 0)
    queued = s.add("1+1=", 0)
    assert s.active_rows == 2 and s.queue_length == 1

    assert s.cancel(queued, Cancelled("gone"), 1)
    assert s.queue_length == 0 and queued.done and isinstance(queued.error, Cancelled)

    assert s.cancel(active, Cancelled("gone"), 1)
    assert s.active_rows == 1 and active.row is None
    assert not s.cancel(active, Cancelled("again"), 2)  # already finished

    run_until_idle(s, 2)
    assert other.tokens == answer_ids("5+5=")
    assert active.tokens == [] and s.active_rows == 0
    assert s.take_finished() == [queued, active, other]


def test_cancel_while_a_phase_runs_drops_its_result():
    s = make_scheduler(max_compile_batch=2)
    a, b = s.add("1+1=", 0), s.add("2+2=", 0)
    s.finish_compile(s.schedule(0), 0)

    step = s.schedule(0)
    s.cancel(a, Cancelled("gone"), 0)  # the client left while the step ran
    stepped = s.finish_execute(step, emit(step), 1)
    assert stepped == [b] and a.tokens == [] and s.active_rows == 1

    c = s.add("3+3=", 1)
    compile_c = s.schedule(1)
    s.cancel(c, Cancelled("gone"), 1)
    s.finish_compile(compile_c, 2)
    assert c.state is State.DONE and s.active_rows == 1


def test_deadline_expires_queued_and_active_requests():
    s = make_scheduler(max_compile_batch=1)
    active = s.add("99+1=", 0, deadline_ns=10 * MS)
    s.finish_compile(s.schedule(0), 0)
    queued = s.add("1+2=", 0, deadline_ns=5 * MS)
    s.finish_execute(s.schedule(0), [END + 1], 0)  # a step, so that compile is next

    phase = s.schedule(5 * MS)
    assert isinstance(phase, ExecutePhase)  # the queued one expired instead of compiling
    assert queued.done and isinstance(queued.error, DeadlineExceeded)
    s.finish_execute(phase, emit(phase), 5 * MS)

    phase = s.schedule(10 * MS)
    assert isinstance(phase, Idle) and phase.wake_ns is None
    assert active.done and isinstance(active.error, DeadlineExceeded)
    assert s.active_rows == 0 and s.queue_length == 0


def test_idle_wakes_at_the_nearest_deadline():
    s = make_scheduler(max_queue_delay_ns=100 * MS)
    s.add("1+2=", 0, deadline_ns=30 * MS)
    assert s.schedule(0) == Idle(30 * MS)


def test_step_limit_cuts_off_a_row_that_never_ends():
    s = make_scheduler(step_limit=3, max_queue_delay_ns=0)
    r = s.add("1+2=", 0)
    s.finish_compile(s.schedule(0), 0)
    for _ in range(3):
        s.finish_execute(s.schedule(0), [3], 0)  # always "0", never <end>
    assert r.done and r.stop_reason is StopReason.STEP_LIMIT and r.tokens == [3, 3, 3]
    assert s.active_rows == 0


def test_a_failing_request_does_not_fail_its_batch_mates():
    s = make_scheduler(max_compile_batch=2)
    bad, good = s.add("1+1=", 0), s.add("2+2=", 0)
    phase = s.schedule(0)
    s.fail(phase, bad, ExecutionFailed("runtime error"), 0)
    s.finish_compile(phase, 0)
    run_until_idle(s, 0)
    assert isinstance(bad.error, ExecutionFailed) and bad.tokens == []
    assert good.tokens == answer_ids("2+2=") and good.error is None


def test_drain_compiles_at_once_and_refuses_new_problems():
    s = make_scheduler(max_queue_delay_ns=10_000 * MS)
    r = s.add("1+2=", 0)
    s.drain()
    with pytest.raises(ShuttingDown):
        s.add("3+4=", 0)
    phase = s.schedule(0)
    assert isinstance(phase, CompilePhase)
    s.finish_compile(phase, 0)
    run_until_idle(s, 0)
    assert r.tokens == answer_ids("1+2=")


# --- the baseline: the compile phase (prefill) emits the first token ---


def lsd_answer_ids(problem: str) -> list[int]:
    """What a perfect baseline emits: the sum's digits least significant first, then <end>."""
    a, b = problem.rstrip("=").split("+")
    return [3 + int(d) for d in reversed(str(int(a) + int(b)))] + [END]


def test_first_token_at_compile_then_one_per_step_each_a_forward_pass():
    s = make_scheduler(step_is_forward_pass=True)
    problems = ["7669+10132=", "1+2=", "99+1="]
    requests = [s.add(p, now_ns=0) for p in problems]
    phase = s.schedule(now_ns=2 * MS)
    assert isinstance(phase, CompilePhase)
    received = s.finish_compile(phase, 2 * MS, [lsd_answer_ids(p)[0] for p in problems])
    assert received == requests
    assert all(r.tokens == [lsd_answer_ids(r.problem)[0]] for r in requests)

    # the first execute step feeds each row the token its prefill emitted, not <start>
    phase = s.schedule(now_ns=3 * MS)
    assert isinstance(phase, ExecutePhase)
    assert phase.tokens == [r.tokens[0] for r in requests]
    now_ns = 3 * MS
    while isinstance(phase, ExecutePhase):
        tokens = [lsd_answer_ids(r.problem)[len(r.tokens)] for r in phase.requests]
        s.finish_execute(phase, tokens, now_ns)
        now_ns += MS
        phase = s.schedule(now_ns)

    for r in requests:
        assert r.tokens == lsd_answer_ids(r.problem) and r.stop_reason is StopReason.END
        # one forward pass per token: the prefill's, then one per decode step
        assert r.compiler_passes == len(r.tokens)
        assert r.compile_tokens == 1 and r.executor_steps == len(r.tokens) - 1
    assert s.active_rows == 0


def test_trex_counts_one_compiler_pass_whatever_the_answer_length():
    s = make_scheduler()
    request = s.add("7669+10132=", now_ns=0)
    run_until_idle(s, now_ns=0)
    assert request.compiler_passes == 1 and request.compile_tokens == 0
    assert request.executor_steps == len(request.tokens) == 6


def test_a_row_that_ends_at_its_prefill_frees_its_row_at_once():
    s = make_scheduler(step_is_forward_pass=True, step_limit=1)
    ended = s.add("1+2=", now_ns=0)
    limited = s.add("30+12=", now_ns=0)
    phase = s.schedule(now_ns=2 * MS)
    received = s.finish_compile(phase, 2 * MS, [END, 6])
    assert received == [ended, limited]
    assert ended.done and ended.stop_reason is StopReason.END and ended.tokens == [END]
    assert limited.done and limited.stop_reason is StopReason.STEP_LIMIT
    assert s.active_rows == 0 and s.idle
    assert [r.id for r in s.take_finished()] == [ended.id, limited.id]


def test_a_request_cancelled_during_its_prefill_gets_no_token():
    s = make_scheduler(step_is_forward_pass=True)
    kept, dropped = s.add("1+2=", now_ns=0), s.add("3+4=", now_ns=0)
    phase = s.schedule(now_ns=2 * MS)
    s.cancel(dropped, Cancelled("cancelled"), 2 * MS)
    assert s.finish_compile(phase, 3 * MS, [5, 9]) == [kept]
    assert kept.tokens == [5] and dropped.tokens == [] and dropped.compiler_passes == 0
    assert s.active_rows == 1

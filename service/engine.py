"""The engine: one asyncio task that asks the scheduler for the next phase and runs it
on the model runtime, and the tickets through which request handlers wait for answers.

ONNX Runtime calls run in one dedicated worker thread, so the event loop keeps
serving RPCs (and cancellations) while the compiler or executor computes, and
the runtime only ever sees one call at a time. Everything else, the scheduler
included, runs on the event loop thread and needs no locks.

The same loop serves either model kind of service.runtime.Runtime. For the baseline
the compile phase is the prefill pass, which already emits each answer's first token:
that token is handed to the scheduler and the ticket when the compile phase ends, and
each decode step is counted as a transformer forward pass (``step_is_forward_pass``).

Failure isolation: when a compiler or executor call fails, the engine reruns
the rows of that call one by one; only the rows that fail alone end with
ExecutionFailed, their batch-mates carry on. Every accepted problem ends:
answered, failed, expired, cancelled, or refused at shutdown.

Inspection (T-REX only): a problem submitted with ``record=True`` is scheduled, batched and
executed like any other, so what is recorded is what served it; after its compile phase the
engine copies its row's program and initial hidden state to the host, and after each step
its hidden state (``Trace``). Rows not recorded pay nothing: no reads are made for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.errors import Cancelled, ExecutionFailed, NotReady, ShuttingDown, Unsupported
from service.metrics import Metrics
from service.scheduler import (
    CompilePhase,
    ExecutePhase,
    Idle,
    Request,
    Scheduler,
    SchedulerConfig,
)
from service.validation import validate_problem

log = logging.getLogger(__name__)

SUMMARY_INTERVAL_S = 30.0  # the periodic throughput line; silent while idle
WARMUP_PROBLEMS = ("0+0=", "9999999999+1=", "7669+10132=", "1+9999999999=")


@dataclass
class Trace:
    """What an inspected problem's pool row held, copied to the host as it was served."""

    program: np.ndarray | None = None  # (P,) the compiled program, layout order
    initial_hidden: np.ndarray | None = None  # (H,) the hidden state before the first step
    hidden: list[np.ndarray] = field(default_factory=list)  # (H,) after each step, per token


class Ticket:
    """An accepted problem, as its request handler sees it."""

    def __init__(self, request: Request, record: bool = False):
        self.request = request
        self.trace: Trace | None = Trace() if record else None  # filled by the engine
        self._tokens: asyncio.Queue[int | None] = asyncio.Queue()  # ids, then None at the end
        self._done = asyncio.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def result(self) -> Request:
        """Wait for the end; -> the finished request, or raise the error it ended with."""
        await self._done.wait()
        if self.request.error is not None:
            raise self.request.error
        return self.request

    async def tokens(self) -> AsyncIterator[int]:
        """Each token id as soon as the executor emits it; raises the request's error, if any."""
        while (token := await self._tokens.get()) is not None:
            yield token
        await self.result()

    def _emit(self, token: int) -> None:
        self._tokens.put_nowait(token)

    def _finish(self) -> None:
        self._tokens.put_nowait(None)
        self._done.set()


@dataclass
class _Summary:
    """Counts for the periodic log line."""

    answered: int = 0
    compile_batches: int = 0
    compiled: int = 0
    execute_batches: int = 0
    stepped: int = 0
    since_ns: int = 0


class Engine:
    def __init__(self, runtime, config: SchedulerConfig, metrics: Metrics):
        self.runtime = runtime
        self.config = config
        self.metrics = metrics
        # the baseline's compile phase (prefill) emits each answer's first token
        self._emits_at_compile = getattr(runtime, "kind", "trex") == "baseline"
        if config.step_is_forward_pass != self._emits_at_compile:
            raise ValueError(
                "SchedulerConfig.step_is_forward_pass must be True for a baseline runtime and "
                "False for T-REX"
            )
        self.scheduler = Scheduler(config)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trex-runtime")
        self._tickets: dict[int, Ticket] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._summary = _Summary(since_ns=time.monotonic_ns())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    # --- lifecycle ---

    async def warm_up(self) -> None:
        """Run the compiler and executor once on a full batch before taking traffic,
        so that ONNX Runtime's first-call allocations do not land on a client."""
        rt = self.runtime
        n = min(self.config.max_compile_batch, self.config.max_rows)
        problems = [WARMUP_PROBLEMS[i % len(WARMUP_PROBLEMS)] for i in range(n)]
        started_ns = time.monotonic_ns()
        tokens = await self._in_worker(rt.generate, rt.encode(problems), self.config.step_limit)
        answers = [rt.decode(row) for row in tokens[: len(WARMUP_PROBLEMS)]]
        log.info(
            "warm-up: %d problems in %.1f ms; %s",
            n,
            (time.monotonic_ns() - started_ns) / 1e6,
            ", ".join(f"{p}{a}" for p, a in zip(WARMUP_PROBLEMS, answers)),
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="trex-engine")

    def drain(self) -> None:
        """Take no new problems; compile the queued ones without waiting for batch-mates."""
        self.scheduler.drain()
        self._wakeup.set()

    async def stop(self) -> None:
        """Finish the phase now running, refuse whatever is left, release the worker."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        now_ns = time.monotonic_ns()
        for ticket in list(self._tickets.values()):
            self.scheduler.cancel(ticket.request, ShuttingDown("the server stopped"), now_ns)
        self._deliver_finished()
        self._worker.shutdown(wait=True)

    # --- requests ---

    def submit(self, problem: str, timeout_s: float | None = None, record: bool = False) -> Ticket:
        """Validate and queue a problem; raises InvalidProblem, QueueFull, NotReady or
        ShuttingDown instead of queueing it. ``record``: fill ``ticket.trace`` as it is served
        (raises Unsupported where the model has no programs to record)."""
        if self._task is None:
            raise NotReady("the model is still loading")
        if not self.running:
            raise ShuttingDown("the server is shutting down")
        if record:
            self._check_recordable()
        validate_problem(problem, self.runtime.max_digits)
        now_ns = time.monotonic_ns()
        deadline_ns = None if timeout_s is None else now_ns + int(timeout_s * 1e9)
        request = self.scheduler.add(problem, now_ns, deadline_ns)
        ticket = Ticket(request, record)
        self._tickets[request.id] = ticket
        log.debug("request %d queued: %r", request.id, problem)
        self._update_gauges()
        self._wakeup.set()
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The handler is done with ``ticket``: if it has not finished (the client
        cancelled, or the deadline passed), stop working on it and free its row."""
        if ticket.done:
            return
        if self.scheduler.cancel(ticket.request, Cancelled("cancelled"), time.monotonic_ns()):
            log.debug("request %d cancelled", ticket.request.id)
        self._deliver_finished()
        self._update_gauges()

    async def solve(self, problem: str, timeout_s: float | None = None) -> Request:
        """Submit, wait for the answer, and release the row whatever happens to the caller."""
        ticket = self.submit(problem, timeout_s)
        try:
            return await ticket.result()
        finally:
            self.release(ticket)

    async def inspect(self, problem: str, timeout_s: float | None = None) -> tuple[Request, Trace]:
        """``solve``, recording the program and hidden states of the row that served it."""
        ticket = self.submit(problem, timeout_s, record=True)
        try:
            return await ticket.result(), ticket.trace
        finally:
            self.release(ticket)

    def _check_recordable(self) -> None:
        """Refuse to record where there is nothing a client could replay."""
        rt = self.runtime
        if getattr(rt, "kind", "trex") != "trex":
            raise Unsupported(
                f"Inspect needs a T-REX model: this server serves the {rt.kind} model "
                f"{rt.model_version}, which writes no executor program (it runs a transformer "
                "pass per token); use Solve, or a server of a T-REX export"
            )
        if getattr(rt, "executor_embedding", None) is None:
            raise Unsupported(
                f"the export of {rt.model_version} has no executor_embedding in its manifest, "
                "so its programs cannot be replayed; re-export it with trex-export"
            )

    # --- the loop ---

    async def _run(self) -> None:
        log.info("engine running: %s", self.config)
        while not self._stopping:
            try:
                await self._run_once()
            except Exception:
                # a bug in the loop must not leave clients waiting forever
                log.exception("engine loop failed; failing the requests in flight and resetting")
                self._reset()

    async def _run_once(self) -> None:
        self._wakeup.clear()
        now_ns = time.monotonic_ns()
        phase = self.scheduler.schedule(now_ns)
        self._deliver_finished()  # deadlines that expired in schedule()

        if isinstance(phase, Idle):
            self._update_gauges()
            self._log_summary(now_ns)
            timeout_s = None if phase.wake_ns is None else max(0, phase.wake_ns - now_ns) / 1e9
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout_s)
            except asyncio.TimeoutError:  # the oldest problem's wait or a deadline ran out
                pass
            return

        if isinstance(phase, CompilePhase):
            await self._compile(phase)
        else:
            await self._execute(phase)
        self._deliver_finished()
        self._update_gauges()
        self._log_summary(time.monotonic_ns())

    async def _compile(self, phase: CompilePhase) -> None:
        # one compiler call for the batch; on failure, each row alone
        problems = [r.problem for r in phase.requests]
        # the baseline's prefill emits a first token per row (-1: a row that failed)
        first = np.full(len(problems), -1, dtype=np.int64) if self._emits_at_compile else None
        try:
            tokens = await self._in_worker(self._compile_rows, problems, phase.rows)
            if first is not None:
                first[:] = tokens
        except Exception as exc:  # noqa: BLE001 - isolated below, row by row
            log.warning("compile batch of %d failed (%s); retrying one by one", len(problems), exc)
            for i, (request, row) in enumerate(zip(phase.requests, phase.rows)):
                if request.done:
                    continue
                try:
                    one = await self._in_worker(self._compile_rows, [request.problem], [row])
                    if first is not None:
                        first[i] = one[0]
                except Exception as row_exc:  # noqa: BLE001 - ends this request only
                    log.error(
                        "request %d: compiling %r failed: %s", request.id, request.problem, row_exc
                    )
                    error = ExecutionFailed(f"the compiler failed on this problem: {row_exc}")
                    self.scheduler.fail(phase, request, error, time.monotonic_ns())

        await self._record(phase, with_program=True)
        received = self.scheduler.finish_compile(phase, time.monotonic_ns(), first)
        for request in received:
            self._tickets[request.id]._emit(request.tokens[-1])
        self.metrics.observe_compile(len(phase.requests), len(received))
        self._summary.compile_batches += 1
        self._summary.compiled += len(phase.requests)

    def _compile_rows(self, problems: list[str], rows: list[int]):
        """-> the first tokens the baseline's prefill emitted (B,), or None for T-REX."""
        tokens = self.runtime.compile(self.runtime.encode(problems), rows)
        if self._emits_at_compile and tokens is None:
            raise RuntimeError("the baseline runtime's compile returned no first tokens")
        return tokens

    async def _execute(self, phase: ExecutePhase) -> None:
        # one executor step for the batch; on failure, each row alone
        rows = np.asarray(phase.rows, dtype=np.int64)
        prev = np.asarray(phase.tokens, dtype=np.int64)
        try:
            # rows in ascending order: the runtime reads a run of consecutive rows in place
            order = np.argsort(rows, kind="stable")
            tokens = np.empty_like(prev)
            tokens[order] = await self._in_worker(self.runtime.step, rows[order], prev[order])
        except Exception as exc:  # noqa: BLE001 - isolated below, row by row
            # NOTE: assumes a failed call left the pool unchanged, as the runtime writes
            # hidden states back only after the executor returned.
            log.warning("execute batch of %d failed (%s); retrying one by one", len(rows), exc)
            tokens = np.full(len(rows), -1, dtype=np.int64)
            for i, request in enumerate(phase.requests):
                if request.done:
                    continue
                try:
                    one = await self._in_worker(self.runtime.step, rows[i : i + 1], prev[i : i + 1])
                    tokens[i] = one[0]
                except Exception as row_exc:  # noqa: BLE001 - ends this request only
                    log.error("request %d: executor step failed: %s", request.id, row_exc)
                    error = ExecutionFailed(f"the executor failed on this problem: {row_exc}")
                    self.scheduler.fail(phase, request, error, time.monotonic_ns())

        await self._record(phase, with_program=False)
        stepped = self.scheduler.finish_execute(phase, tokens, time.monotonic_ns())
        for request in stepped:
            self._tickets[request.id]._emit(request.tokens[-1])
        # the baseline's decode passes are transformer forward passes, one per row stepped
        passes = len(phase.requests) if self.config.step_is_forward_pass else 0
        self.metrics.observe_execute(len(phase.requests), len(stepped), passes)
        self._summary.execute_batches += 1
        self._summary.stepped += len(phase.requests)

    async def _record(self, phase: CompilePhase | ExecutePhase, with_program: bool) -> None:
        """Copy what the phase left in the rows of its recorded requests into their traces:
        after a compile the program and initial hidden state, after a step the hidden state.

        Runs before the phase is finished, so no row has been freed or reused yet; a read
        that fails ends the recorded requests it was for, not the phase.
        """
        recorded = []
        for request, row in zip(phase.requests, phase.rows):
            ticket = self._tickets.get(request.id)
            if not request.done and ticket is not None and ticket.trace is not None:
                recorded.append((request, row, ticket.trace))
        if not recorded:
            return
        rows = [row for _, row, _ in recorded]
        try:
            reads = await self._in_worker(self._read_rows, rows, with_program)
        except Exception as exc:  # noqa: BLE001 - ends the recorded requests only
            log.error("reading rows %s for inspection failed: %s", rows, exc)
            for request, _, _ in recorded:
                error = ExecutionFailed(f"reading this problem's executor state failed: {exc}")
                self.scheduler.fail(phase, request, error, time.monotonic_ns())
            return
        for (_, _, trace), (program, hidden) in zip(recorded, reads):
            if with_program:
                trace.program, trace.initial_hidden = program, hidden
            else:
                trace.hidden.append(hidden)

    def _read_rows(self, rows: list[int], with_program: bool):
        """-> (program or None, hidden state) of each row, host copies."""
        rt = self.runtime
        return [(rt.read_program(r) if with_program else None, rt.read_hidden(r)) for r in rows]

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # --- bookkeeping ---

    def _deliver_finished(self) -> None:
        for request in self.scheduler.take_finished():
            ticket = self._tickets.pop(request.id)
            ticket._finish()
            if request.error is None:
                self.metrics.observe_answered(request)
                self._summary.answered += 1
                log.debug(
                    "request %d answered: %s%s in %.2f ms (%d steps)",
                    request.id,
                    request.problem,
                    self.runtime.decode(request.tokens),
                    (request.finish_ns - request.arrival_ns) / 1e6,
                    request.executor_steps,
                )
            else:
                log.debug("request %d ended: %r", request.id, request.error)

    def _update_gauges(self) -> None:
        self.metrics.set_load(self.scheduler.queue_length, self.scheduler.active_rows)

    def _reset(self) -> None:
        """Fail every request in flight and start over with an empty scheduler."""
        error = ExecutionFailed("internal error in the serving engine")
        for ticket in self._tickets.values():
            ticket.request.error = error
            ticket._finish()
        self._tickets.clear()
        draining = self.scheduler.draining
        self.scheduler = Scheduler(self.config)
        if draining:
            self.scheduler.drain()
        self._update_gauges()

    def _log_summary(self, now_ns: int) -> None:
        s = self._summary
        elapsed_s = (now_ns - s.since_ns) / 1e9
        if elapsed_s < SUMMARY_INTERVAL_S:
            return
        if s.answered or s.compile_batches:
            log.info(
                "%d answered in %.0f s (%.1f/s); mean batch: compile %.1f, execute %.1f",
                s.answered,
                elapsed_s,
                s.answered / elapsed_s,
                s.compiled / max(s.compile_batches, 1),
                s.stepped / max(s.execute_batches, 1),
            )
        self._summary = _Summary(since_ns=now_ns)

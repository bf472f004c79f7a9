"""The engine: one dedicated thread that asks the scheduler for the next phase and runs it
on the model runtime, phase after phase, and the tickets through which request handlers on
the asyncio event loop wait for answers.

Why a thread of its own: when the next phase was chosen and launched from the event loop, it
waited behind every gRPC callback queued there, and the runtime thread idled between phases
(bench/results/PROFILE.md: T-REX's busy 62% of a core under gRPC, 87% in-process). The engine
thread ("trex-engine") goes from one phase to the next without the loop, and the runtime only
ever sees one call at a time; the event loop keeps serving RPCs (and cancellations) meanwhile.

Who owns what:

* the event loop: ``submit``, ``release``, ``drain``, ``stop``, and the tickets (asyncio
  objects, touched on the loop only);
* the engine thread: choosing phases, runtime calls, finishing phases;
* shared, under ``self._lock``: the scheduler (a plain class, not thread-safe) and the table
  of tickets in flight. The lock is held for bookkeeping only, never across a runtime call,
  so a cancellation lands while a phase runs, as it did before (the scheduler drops a
  cancelled request's results when its phase finishes).

What a phase produced, the tokens it emitted and the requests it finished, goes to the loop
in one ``call_soon_threadsafe`` per phase, and the engine thread starts the next phase at once
instead of waiting for the loop to hand the tokens out.

The same loop serves either model kind of service.runtime.Runtime. For the baseline
the compile phase is the prefill pass, which already emits each answer's first token:
that token is handed to the scheduler and the ticket when the compile phase ends, and
each decode step is counted as a transformer forward pass (``step_is_forward_pass``).

Failure isolation: when a compiler or executor call fails, the engine reruns
the rows of that call one by one; only the rows that fail alone end with
ExecutionFailed, their batch-mates carry on. A bug in the engine thread fails the requests
in flight (ExecutionFailed) and starts over with an empty scheduler, so no client waits
forever. Every accepted problem ends: answered, failed, expired, cancelled, or refused at
shutdown.

Inspection (T-REX only): a problem submitted with ``record=True`` is scheduled, batched and
executed like any other, so what is recorded is what served it; after its compile phase the
engine copies its row's program and initial hidden state to the host, and after each step
its hidden state (``Trace``). Rows not recorded pay nothing: no reads are made for them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
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
    """An accepted problem, as its request handler sees it; lives on the event loop: the
    engine thread reaches it only through ``Engine._deliver``, run on the loop."""

    def __init__(self, request: Request, record: bool = False):
        self.request = request
        self.trace: Trace | None = Trace() if record else None  # filled by the engine
        # NOTE: a list and an event rather than an asyncio.Queue: most callers never read
        # the tokens one by one (Solve), and this is cheaper on the loop per token
        self._tokens: list[int] = []  # ids delivered so far, in emission order
        self._progress = asyncio.Event()  # set on each new token and at the end
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
        sent = 0
        while True:
            if sent < len(self._tokens):
                sent += 1
                yield self._tokens[sent - 1]
            elif self._done.is_set():
                break
            else:
                self._progress.clear()
                await self._progress.wait()
        await self.result()

    def _emit(self, token: int) -> None:
        self._tokens.append(token)
        self._progress.set()

    def _finish(self) -> None:
        self._done.set()
        self._progress.set()


@dataclass
class _Summary:
    """Counts for the periodic log line."""

    answered: int = 0
    compile_batches: int = 0
    compiled: int = 0
    execute_batches: int = 0
    stepped: int = 0
    since_ns: int = 0


Delivery = list[tuple[Ticket, int]]  # (ticket, token) pairs of one phase, in emission order


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
        # guards the scheduler, _tickets, _recorded and _summary across the two threads
        self._lock = threading.Lock()
        self._tickets: dict[int, Ticket] = {}  # request id -> ticket, until handed to the loop
        self._recorded: set[int] = set()  # ids of the tickets in flight with a trace
        self._wakeup = threading.Event()  # an arrival, a drain or stop: schedule again
        # phases' results not yet handed out on the loop, and whether a call to hand them
        # out is already queued there (under the lock)
        self._outbox: list[tuple[Delivery, list[Ticket]]] = []
        self._outbox_queued = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited: asyncio.Future | None = None  # set on the loop when the thread ends
        self._stopping = False
        self._summary = _Summary(since_ns=time.monotonic_ns())

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # --- lifecycle ---

    async def warm_up(self) -> None:
        """Run the compiler and executor once on a full batch before taking traffic,
        so that ONNX Runtime's first-call allocations do not land on a client."""
        rt = self.runtime
        n = min(self.config.max_compile_batch, self.config.max_rows)
        problems = [WARMUP_PROBLEMS[i % len(WARMUP_PROBLEMS)] for i in range(n)]
        started_ns = time.monotonic_ns()
        # NOTE: before start(), so this is the runtime's only call
        tokens = await asyncio.to_thread(rt.generate, rt.encode(problems), self.config.step_limit)
        answers = [rt.decode(row) for row in tokens[: len(WARMUP_PROBLEMS)]]
        log.info(
            "warm-up: %d problems in %.1f ms; %s",
            n,
            (time.monotonic_ns() - started_ns) / 1e6,
            ", ".join(f"{p}{a}" for p, a in zip(WARMUP_PROBLEMS, answers)),
        )

    def start(self) -> None:
        """Start the engine thread. Call it on the event loop whose handlers will wait for
        the answers: that is the loop the tickets are woken up on."""
        self._loop = asyncio.get_running_loop()
        self._exited = self._loop.create_future()
        # NOTE: a daemon, so that a loop closed without stop() cannot keep the process alive
        self._thread = threading.Thread(target=self._run, name="trex-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Take no new problems; compile the queued ones without waiting for batch-mates."""
        with self._lock:
            self.scheduler.drain()
        self._wakeup.set()

    async def stop(self) -> None:
        """Finish the phase now running, refuse whatever is left, end the engine thread."""
        self._stopping = True
        self._wakeup.set()
        if self._exited is not None:
            # the thread's last deliveries were queued before this, so they have run
            await self._exited
            self._thread.join()
        self._empty_outbox()  # NOTE: empty already, unless the loop refused a call
        with self._lock:
            now_ns = time.monotonic_ns()
            for ticket in list(self._tickets.values()):
                self.scheduler.cancel(ticket.request, ShuttingDown("the server stopped"), now_ns)
            finished = self._take_finished()
            self._update_gauges()
        self._deliver([], finished)

    # --- requests (on the event loop) ---

    def submit(self, problem: str, timeout_s: float | None = None, record: bool = False) -> Ticket:
        """Validate and queue a problem; raises InvalidProblem, QueueFull, NotReady or
        ShuttingDown instead of queueing it. ``record``: fill ``ticket.trace`` as it is served
        (raises Unsupported where the model has no programs to record)."""
        if self._thread is None:
            raise NotReady("the model is still loading")
        if not self.running:
            raise ShuttingDown("the server is shutting down")
        if record:
            self._check_recordable()
        validate_problem(problem, self.runtime.max_digits)
        now_ns = time.monotonic_ns()
        deadline_ns = None if timeout_s is None else now_ns + int(timeout_s * 1e9)
        with self._lock:
            request = self.scheduler.add(problem, now_ns, deadline_ns)
            ticket = Ticket(request, record)
            self._tickets[request.id] = ticket
            if record:
                self._recorded.add(request.id)
            self._update_gauges()
        log.debug("request %d queued: %r", request.id, problem)
        self._wakeup.set()
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The handler is done with ``ticket``: if it has not finished (the client
        cancelled, or the deadline passed), stop working on it and free its row."""
        if ticket.done:
            return
        with self._lock:
            # not in the table: it finished in the engine thread and its delivery is on its
            # way (or the engine was reset); the scheduler no longer holds it
            if self._tickets.get(ticket.request.id) is not ticket:
                return
            if self.scheduler.cancel(ticket.request, Cancelled("cancelled"), time.monotonic_ns()):
                log.debug("request %d cancelled", ticket.request.id)
            finished = self._take_finished()
            self._update_gauges()
        self._deliver([], finished)

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

    # --- the loop (on the engine thread) ---

    def _run(self) -> None:
        log.info("engine running: %s", self.config)
        try:
            while not self._stopping:
                try:
                    self._run_once()
                except Exception:
                    # a bug in the loop must not leave clients waiting forever
                    log.exception(
                        "engine loop failed; failing the requests in flight and resetting"
                    )
                    self._reset()
        finally:
            if not self._stopping:  # not an Exception: the thread ends here
                log.critical("engine thread ended; failing the requests in flight")
                self._stopping = True
                self._reset()
            self._post(self._exited_on_loop)

    def _run_once(self) -> None:
        self._wakeup.clear()  # an arrival from here on wakes the idle wait below at once
        with self._lock:
            now_ns = time.monotonic_ns()
            phase = self.scheduler.schedule(now_ns)
            expired = self._take_finished()  # deadlines that expired in schedule()
            if isinstance(phase, Idle):
                self._update_gauges()
        if expired:
            self._send([], expired)

        if isinstance(phase, Idle):
            self._log_summary(now_ns)
            timeout_s = None if phase.wake_ns is None else max(0, phase.wake_ns - now_ns) / 1e9
            # the oldest problem's wait or a deadline runs out, or an arrival wakes it
            self._wakeup.wait(timeout_s)
            return

        if isinstance(phase, CompilePhase):
            self._compile(phase)
        else:
            self._execute(phase)
        self._log_summary(time.monotonic_ns())

    def _compile(self, phase: CompilePhase) -> None:
        # one compiler call for the batch; on failure, each row alone
        problems = [r.problem for r in phase.requests]
        # the baseline's prefill emits a first token per row (-1: a row that failed)
        first = np.full(len(problems), -1, dtype=np.int64) if self._emits_at_compile else None
        finished: list[Ticket] = []
        try:
            tokens = self._compile_rows(problems, phase.rows)
            if first is not None:
                first[:] = tokens
        except Exception as exc:  # noqa: BLE001 - isolated below, row by row
            log.warning("compile batch of %d failed (%s); retrying one by one", len(problems), exc)
            for i, (request, row) in enumerate(zip(phase.requests, phase.rows)):
                if request.done:
                    continue
                try:
                    one = self._compile_rows([request.problem], [row])
                    if first is not None:
                        first[i] = one[0]
                except Exception as row_exc:  # noqa: BLE001 - ends this request only
                    log.error(
                        "request %d: compiling %r failed: %s", request.id, request.problem, row_exc
                    )
                    error = ExecutionFailed(f"the compiler failed on this problem: {row_exc}")
                    finished += self._fail(phase, [request], error)

        finished += self._record(phase, with_program=True)
        with self._lock:
            received = self.scheduler.finish_compile(phase, time.monotonic_ns(), first)
            emitted = [(self._tickets[r.id], r.tokens[-1]) for r in received]
            finished += self._take_finished()
            self._update_gauges()
            self._summary.compile_batches += 1
            self._summary.compiled += len(phase.requests)
        self._send(emitted, finished)
        self.metrics.observe_compile(len(phase.requests), len(received))

    def _compile_rows(self, problems: list[str], rows: list[int]):
        """-> the first tokens the baseline's prefill emitted (B,), or None for T-REX."""
        tokens = self.runtime.compile(self.runtime.encode(problems), rows)
        if self._emits_at_compile and tokens is None:
            raise RuntimeError("the baseline runtime's compile returned no first tokens")
        return tokens

    def _execute(self, phase: ExecutePhase) -> None:
        # one executor step for the batch; on failure, each row alone
        rows = np.asarray(phase.rows, dtype=np.int64)
        prev = np.asarray(phase.tokens, dtype=np.int64)
        finished: list[Ticket] = []
        try:
            # rows in ascending order: the runtime reads a run of consecutive rows in place
            order = np.argsort(rows, kind="stable")
            tokens = np.empty_like(prev)
            tokens[order] = self.runtime.step(rows[order], prev[order])
        except Exception as exc:  # noqa: BLE001 - isolated below, row by row
            # NOTE: assumes a failed call left the pool unchanged, as the runtime writes
            # hidden states back only after the executor returned.
            log.warning("execute batch of %d failed (%s); retrying one by one", len(rows), exc)
            tokens = np.full(len(rows), -1, dtype=np.int64)
            for i, request in enumerate(phase.requests):
                if request.done:
                    continue
                try:
                    tokens[i] = self.runtime.step(rows[i : i + 1], prev[i : i + 1])[0]
                except Exception as row_exc:  # noqa: BLE001 - ends this request only
                    log.error("request %d: executor step failed: %s", request.id, row_exc)
                    error = ExecutionFailed(f"the executor failed on this problem: {row_exc}")
                    finished += self._fail(phase, [request], error)

        finished += self._record(phase, with_program=False)
        with self._lock:
            stepped = self.scheduler.finish_execute(phase, tokens.tolist(), time.monotonic_ns())
            emitted = [(self._tickets[r.id], r.tokens[-1]) for r in stepped]
            finished += self._take_finished()
            self._update_gauges()
            self._summary.execute_batches += 1
            self._summary.stepped += len(phase.requests)
        self._send(emitted, finished)
        # the baseline's decode passes are transformer forward passes, one per row stepped
        passes = len(phase.requests) if self.config.step_is_forward_pass else 0
        self.metrics.observe_execute(len(phase.requests), len(stepped), passes)

    def _fail(self, phase, requests: list[Request], error: Exception) -> list[Ticket]:
        """End these requests of the running phase with ``error``; -> their tickets."""
        with self._lock:
            for request in requests:
                self.scheduler.fail(phase, request, error, time.monotonic_ns())
            return self._take_finished()

    def _record(self, phase: CompilePhase | ExecutePhase, with_program: bool) -> list[Ticket]:
        """Copy what the phase left in the rows of its recorded requests into their traces:
        after a compile the program and initial hidden state, after a step the hidden state.

        Runs before the phase is finished, so no row has been freed for another phase or
        reused yet; a read that fails ends the recorded requests it was for, not the phase.
        -> the tickets of the requests that ended so.
        """
        # NOTE: read without the lock: a recorded request of this phase was added to the
        # set before the phase was scheduled, and only leaves it once finished
        if not self._recorded:
            return []
        with self._lock:
            recorded = []
            for request, row in zip(phase.requests, phase.rows):
                ticket = self._tickets.get(request.id)
                if not request.done and ticket is not None and ticket.trace is not None:
                    recorded.append((request, row, ticket.trace))
        if not recorded:
            return []
        rows = [row for _, row, _ in recorded]
        try:
            reads = self._read_rows(rows, with_program)
        except Exception as exc:  # noqa: BLE001 - ends the recorded requests only
            log.error("reading rows %s for inspection failed: %s", rows, exc)
            error = ExecutionFailed(f"reading this problem's executor state failed: {exc}")
            return self._fail(phase, [request for request, _, _ in recorded], error)
        # the traces are read on the loop only once their ticket is done, after this phase
        for (_, _, trace), (program, hidden) in zip(recorded, reads):
            if with_program:
                trace.program, trace.initial_hidden = program, hidden
            else:
                trace.hidden.append(hidden)
        return []

    def _read_rows(self, rows: list[int], with_program: bool):
        """-> (program or None, hidden state) of each row, host copies."""
        rt = self.runtime
        return [(rt.read_program(r) if with_program else None, rt.read_hidden(r)) for r in rows]

    def _send(self, emitted: Delivery, finished: list[Ticket]) -> None:
        """Hand a phase's results to the loop; from the engine thread.

        One call on the loop hands out the results of every phase finished since it was
        queued: while the loop is busy, later phases add to the outbox and cost the engine
        thread neither a wake-up write nor the GIL hand-over that follows it.
        """
        with self._lock:
            self._outbox.append((emitted, finished))
            if self._outbox_queued:
                return
            self._outbox_queued = True
        self._post(self._empty_outbox)

    def _empty_outbox(self) -> None:
        """On the loop: deliver what the engine thread sent, oldest phase first."""
        with self._lock:
            outbox, self._outbox = self._outbox, []
            self._outbox_queued = False
        for emitted, finished in outbox:
            self._deliver(emitted, finished)

    def _post(self, callback: Callable, *args) -> None:
        """Run ``callback(*args)`` on the event loop, soon; from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to wait for an answer
            if not self._stopping:
                log.warning("the event loop closed without stopping the engine; stopping")
            self._stopping = True

    # --- bookkeeping ---

    def _take_finished(self) -> list[Ticket]:
        """The tickets of the requests the scheduler finished since the last call, out of the
        table; with the lock held. Whoever takes them delivers them, on the loop."""
        tickets = []
        for request in self.scheduler.take_finished():
            tickets.append(self._tickets.pop(request.id))
            self._recorded.discard(request.id)
            if request.error is None:
                self._summary.answered += 1
        return tickets

    def _deliver(self, emitted: Delivery, finished: list[Ticket]) -> None:
        """On the loop: hand one phase's tokens to their tickets, then end the finished ones."""
        for ticket, token in emitted:
            if not ticket.done:  # a ticket released meanwhile takes no more tokens
                ticket._emit(token)
        debug = log.isEnabledFor(logging.DEBUG)
        for ticket in finished:
            ticket._finish()
            request = ticket.request
            if request.error is None:
                self.metrics.observe_answered(request)
                if debug:
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

    def _exited_on_loop(self) -> None:
        if not self._exited.done():
            self._exited.set_result(None)

    def _update_gauges(self) -> None:
        """With the lock held."""
        self.metrics.set_load(self.scheduler.queue_length, self.scheduler.active_rows)

    def _reset(self) -> None:
        """Fail every request in flight and start over with an empty scheduler."""
        error = ExecutionFailed("internal error in the serving engine")
        with self._lock:
            tickets = list(self._tickets.values())
            for ticket in tickets:
                ticket.request.error = error
            self._tickets.clear()
            self._recorded.clear()
            draining = self.scheduler.draining
            self.scheduler = Scheduler(self.config)
            if draining:
                self.scheduler.drain()
            self._update_gauges()
        self._send([], tickets)

    def _log_summary(self, now_ns: int) -> None:
        with self._lock:
            s = self._summary
            elapsed_s = (now_ns - s.since_ns) / 1e9
            if elapsed_s < SUMMARY_INTERVAL_S:
                return
            self._summary = _Summary(since_ns=now_ns)
        if s.answered or s.compile_batches:
            log.info(
                "%d answered in %.0f s (%.1f/s); mean batch: compile %.1f, execute %.1f",
                s.answered,
                elapsed_s,
                s.answered / elapsed_s,
                s.compiled / max(s.compile_batches, 1),
                s.stepped / max(s.execute_batches, 1),
            )

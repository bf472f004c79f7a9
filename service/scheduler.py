"""The batching policy: which problems the compiler or the executor runs next.

Every problem costs one compiler pass, which writes its executor program into a
row of the executor pool, then one executor step per output token. The
scheduler keeps the queue of problems waiting to be compiled and the set of
active rows, and alternates two phases:

    compile  one compiler call on a batch of queued problems, each given a free row
    execute  one executor step on the active rows

Rows join between steps and leave as soon as they emit ``<end>`` (or hit the
step limit), so a short answer never waits for a long one (continuous batching).

The same policy serves the token-by-token baseline: its compile phase is the prefill
pass over the problem, which writes the row's key-value cache and already emits the
answer's first token (``finish_compile`` takes those tokens), and its execute phase is
one decode pass per row. Each of those passes is a transformer forward pass, so with
``step_is_forward_pass`` a request counts every step in ``compiler_passes`` too.

This is plain synchronous code with no I/O and no locks: service/engine.py calls it
from its engine thread and from the event loop, holding one lock around every call, and
runs the chosen phase on the model runtime. Time is passed in as ``now_ns`` (any
monotonic clock) so tests drive it without sleeping.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from service.errors import DeadlineExceeded, QueueFull, ShuttingDown


@dataclass
class SchedulerConfig:
    max_rows: int = 256  # executor pool rows: problems compiled and executing at once
    max_compile_batch: int = 64  # problems per compiler call
    max_execute_batch: int = 256  # rows per executor call
    max_queue_delay_ns: int = 2_000_000  # how long a lone problem waits for batch-mates
    max_queue: int = 1024  # problems waiting to be compiled; more are refused
    step_limit: int = 12  # executor steps per problem before it is cut off
    start_id: int = 1  # the executor's input at its first step
    end_id: int = 2  # the token that ends an answer
    # the baseline: an execute step is a transformer forward pass (a decode pass), counted
    # in Request.compiler_passes like the compile phase's prefill pass
    step_is_forward_pass: bool = False

    def __post_init__(self):
        for name in ("max_rows", "max_compile_batch", "max_execute_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.step_limit < 1:
            raise ValueError(f"step_limit must be at least 1, got {self.step_limit}")
        if self.max_queue_delay_ns < 0:
            raise ValueError(f"max_queue_delay_ns must be >= 0, got {self.max_queue_delay_ns}")


class State(enum.Enum):
    QUEUED = "queued"  # waiting for a compile phase
    COMPILING = "compiling"  # in the compile phase now running
    ACTIVE = "active"  # holds a pool row; stepped by execute phases
    DONE = "done"  # answered, failed or cancelled; holds no row


class StopReason(enum.Enum):
    END = "end"  # the executor emitted <end>
    STEP_LIMIT = "step_limit"  # cut off after step_limit steps


@dataclass(eq=False)
class Request:
    """One problem on its way through the scheduler; the engine reads the outcome here."""

    id: int
    problem: str
    arrival_ns: int
    deadline_ns: int | None = None
    state: State = State.QUEUED
    row: int | None = None
    tokens: list[int] = field(default_factory=list)  # emitted ids, <end> included
    stop_reason: StopReason | None = None
    error: Exception | None = None  # set when it finished without an answer
    # transformer forward passes: T-REX's one compiler pass; the baseline's prefill and
    # each of its decode passes
    compiler_passes: int = 0
    compile_tokens: int = 0  # tokens the compile phase emitted (the baseline's first)
    compile_start_ns: int | None = None
    compile_end_ns: int | None = None
    finish_ns: int | None = None

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    @property
    def executor_steps(self) -> int:
        """Execute steps it took: one per token, but for those the compile phase emitted."""
        return len(self.tokens) - self.compile_tokens


@dataclass
class CompilePhase:
    """Run the compiler once on these problems, writing each program into its row."""

    requests: list[Request]
    rows: list[int]  # rows[i] belongs to requests[i]


@dataclass
class ExecutePhase:
    """Run one executor step on these rows, each fed its previous token."""

    requests: list[Request]
    rows: list[int]
    tokens: list[int]  # previous token of each row: <start> at its first step


@dataclass
class Idle:
    """Nothing to run; call schedule() again on a new arrival or at ``wake_ns``."""

    wake_ns: int | None  # None: only an arrival can make work


Phase = CompilePhase | ExecutePhase | Idle


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self._ids = itertools.count(1)
        self._queue: deque[Request] = deque()  # arrival order
        self._active: OrderedDict[int, Request] = OrderedDict()  # least recently stepped first
        self._free_rows = list(range(config.max_rows))  # a heap: lowest row first
        self._running: CompilePhase | ExecutePhase | None = None
        self._last_phase: type | None = None
        self._finished: list[Request] = []
        self._draining = False

    # --- state the engine reports as gauges ---

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def active_rows(self) -> int:
        """Rows holding a program: being compiled, or executing."""
        return self.config.max_rows - len(self._free_rows)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def idle(self) -> bool:
        return not self._queue and not self._active and self._running is None

    # --- requests in and out ---

    def add(self, problem: str, now_ns: int, deadline_ns: int | None = None) -> Request:
        """Queue a validated problem; raises QueueFull or ShuttingDown instead."""
        if self._draining:
            raise ShuttingDown("the server is shutting down")
        if len(self._queue) >= self.config.max_queue:
            raise QueueFull(f"{len(self._queue)} problems are waiting (the limit); retry later")
        request = Request(next(self._ids), problem, now_ns, deadline_ns)
        self._queue.append(request)
        return request

    def cancel(self, request: Request, error: Exception, now_ns: int) -> bool:
        """End a request that has not finished, freeing its row; False if it had finished.

        Safe while a phase runs: the engine starts no other phase before this one
        returns, and the phase's results for a finished request are dropped.
        """
        if request.done:
            return False
        if request.state is State.QUEUED:
            self._queue.remove(request)
        self._active.pop(request.id, None)
        self._finish(request, now_ns, error=error)
        return True

    def take_finished(self) -> list[Request]:
        """Requests that finished (answered, failed, expired) since the last call."""
        finished, self._finished = self._finished, []
        return finished

    def drain(self) -> None:
        """Refuse new problems and compile queued ones without waiting for batch-mates."""
        self._draining = True

    # --- phases ---

    def schedule(self, now_ns: int) -> Phase:
        """Choose the next phase.

        1. Expire: queued or active requests past their deadline finish with
           DeadlineExceeded and give back their rows.
        2. Compile when problems wait and a row is free, and either
           - rows are executing and the last phase was a step: phases alternate,
             so new problems join after at most one step and running rows wait
             at most one compiler pass; or
           - nothing is executing, and the batch is full (max_compile_batch or
             every free row), the oldest problem has waited max_queue_delay_ns,
             or the scheduler is draining.
        3. Execute when rows are active: one step for up to max_execute_batch of
           them, least recently stepped first so that all advance evenly.
        4. Otherwise idle until the oldest problem's delay or a deadline runs out.
        """
        assert self._running is None, "schedule() called while a phase is running"
        cfg = self.config

        # expire requests whose deadline passed
        for request in [*self._queue, *self._active.values()]:
            if request.deadline_ns is not None and now_ns >= request.deadline_ns:
                self.cancel(request, DeadlineExceeded("deadline exceeded"), now_ns)

        # compile newly arrived problems
        if self._queue and self._free_rows:
            batch = min(len(self._queue), len(self._free_rows), cfg.max_compile_batch)
            if self._active:
                ready = self._last_phase is not CompilePhase
            else:
                full = batch == min(len(self._free_rows), cfg.max_compile_batch)
                waited_ns = now_ns - self._queue[0].arrival_ns
                ready = full or waited_ns >= cfg.max_queue_delay_ns or self._draining
            if ready:
                return self._start_compile(batch, now_ns)

        # one step for the active rows
        if self._active:
            requests = list(itertools.islice(self._active.values(), cfg.max_execute_batch))
            phase = ExecutePhase(
                requests=requests,
                rows=[r.row for r in requests],
                tokens=[r.tokens[-1] if r.tokens else cfg.start_id for r in requests],
            )
            self._running = phase
            return phase

        # idle: wake when the oldest problem stops waiting for batch-mates, or a deadline
        wakes = [r.deadline_ns for r in self._queue if r.deadline_ns is not None]
        if self._queue:
            wakes.append(self._queue[0].arrival_ns + cfg.max_queue_delay_ns)
        return Idle(min(wakes) if wakes else None)

    def _start_compile(self, batch: int, now_ns: int) -> CompilePhase:
        requests = [self._queue.popleft() for _ in range(batch)]
        rows = [heapq.heappop(self._free_rows) for _ in range(batch)]
        for request, row in zip(requests, rows):
            request.state = State.COMPILING
            request.row = row
            request.compile_start_ns = now_ns
        phase = CompilePhase(requests, rows)
        self._running = phase
        return phase

    def finish_compile(self, phase: CompilePhase, now_ns: int, tokens=None) -> list[Request]:
        """The compiler wrote every program of the phase: those rows start executing.

        ``tokens``: the token each row's compile pass emitted (the baseline's prefill), or
        None (T-REX's compiler emits none). -> the requests that received a token; one that
        emitted <end> or reached the step limit finishes at once and frees its row.
        """
        self._end_phase(phase)
        received = []
        for i, request in enumerate(phase.requests):
            if request.done:  # cancelled while compiling
                continue
            request.state = State.ACTIVE
            request.compiler_passes += 1
            request.compile_end_ns = now_ns
            self._active[request.id] = request
            if tokens is not None:
                request.compile_tokens += 1
                self._record(request, int(tokens[i]), now_ns)
                received.append(request)
        return received

    def finish_execute(self, phase: ExecutePhase, tokens, now_ns: int) -> list[Request]:
        """Record the token each row emitted; -> the requests that received one.

        A row that emitted <end> or reached the step limit finishes and frees its row.
        """
        self._end_phase(phase)
        stepped = []
        for request, token in zip(phase.requests, tokens):
            if request.done:  # cancelled while stepping
                continue
            if self.config.step_is_forward_pass:
                request.compiler_passes += 1
            self._record(request, int(token), now_ns)
            stepped.append(request)
        return stepped

    def _record(self, request: Request, token: int, now_ns: int) -> None:
        """An active request emitted ``token``: it finishes on <end> or at the step limit,
        else goes to the back of the line of rows to step."""
        request.tokens.append(token)
        if token == self.config.end_id:
            self._active.pop(request.id)
            self._finish(request, now_ns, stop=StopReason.END)
        elif len(request.tokens) >= self.config.step_limit:
            self._active.pop(request.id)
            self._finish(request, now_ns, stop=StopReason.STEP_LIMIT)
        else:
            self._active.move_to_end(request.id)  # stepped: to the back of the line

    def fail(
        self, phase: CompilePhase | ExecutePhase, request: Request, error: Exception, now_ns: int
    ) -> None:
        """One request of the running phase failed in the runtime: finish it with ``error``.

        Call it for each failing request before finish_compile / finish_execute of
        the same phase, which then carry on with the others.
        """
        assert phase is self._running and request in phase.requests
        self.cancel(request, error, now_ns)

    def _end_phase(self, phase: CompilePhase | ExecutePhase) -> None:
        assert phase is self._running, "finishing a phase that is not running"
        self._running = None
        self._last_phase = type(phase)

    def _finish(
        self,
        request: Request,
        now_ns: int,
        *,
        stop: StopReason | None = None,
        error: Exception | None = None,
    ) -> None:
        if request.row is not None:
            heapq.heappush(self._free_rows, request.row)
            request.row = None
        request.state = State.DONE
        request.stop_reason = stop
        request.error = error
        request.finish_ns = now_ns
        self._finished.append(request)

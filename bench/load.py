"""Load generators: a closed loop of N clients, and an open loop of Poisson arrivals.

Both drive any *solver*, an object with ``async solve(problem) -> Reply``: ``GrpcSolver``
calls a server's Solve RPC over grpc.aio, ``EngineSolver`` calls the engine in this process.
So the gRPC and the engine-only figures come from the same loop code.

A load point has a warm-up, then a measured window of ``duration_s``. ``probe()`` is awaited
at both ends of the window (server CPU time and metrics), and only requests that finished
inside the window count, so requests in flight at the edges neither inflate nor deflate
the throughput. Every loop is bounded: by the window, by ``max_requests``, and by a drain
timeout after which unfinished requests are cancelled and counted as such.

Open loop: arrival times are drawn in advance (exponential gaps at ``rate``), and latency
is measured from the scheduled arrival, not from when the request was actually sent, so a
slow client or server cannot hide queueing delay (coordinated omission). A request whose
arrival finds ``max_in_flight`` requests already waiting is not sent and counts as shed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from bench.problems import BenchProblem
from protos.trex.v1 import trex_pb2, trex_pb2_grpc

log = logging.getLogger(__name__)

OK = "OK"
SHED = "SHED"  # open loop: not sent, too many requests in flight already
clock = time.perf_counter


@dataclass
class Reply:
    code: str  # "OK" or the gRPC status code name
    answer: str = ""
    tokens: int = 0  # emitted tokens, <end> included
    compiler_passes: int = 0
    executor_steps: int = 0
    message: str = ""  # why it failed


@dataclass
class Outcome:
    index: int  # into the problem list
    reply: Reply
    sent_s: float  # closed loop: when sent; open loop: its scheduled arrival
    done_s: float

    @property
    def ok(self) -> bool:
        return self.reply.code == OK

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s


@dataclass
class Snapshot:
    """Counters read at one end of a window."""

    at_s: float
    server_cpu_s: float
    client_cpu_s: float
    samples: dict = field(default_factory=dict)  # the server's metrics


Probe = Callable[[], Awaitable[Snapshot]]


@dataclass
class PointResult:
    loop: str  # "closed", "open" or "accuracy"
    level: float  # clients (closed loop) or offered answers/s (open loop)
    outcomes: list[Outcome]  # every request of the point, warm-up and drain included
    before: Snapshot  # at the start of the window
    after: Snapshot  # at its end
    sent: int = 0
    shed: int = 0  # open loop: arrivals in the window that were not sent
    cancelled: int = 0  # still unfinished when the drain timeout ran out

    @property
    def window_s(self) -> float:
        return self.after.at_s - self.before.at_s

    def finished_in_window(self) -> list[Outcome]:
        """Requests that finished inside the window: what throughput counts."""
        return [o for o in self.outcomes if self.before.at_s <= o.done_s <= self.after.at_s]

    def timed(self) -> list[Outcome]:
        """The requests whose latency is reported: closed loop, those that finished in the
        window; open loop, those that *arrived* in it, however late they finished, so that
        an overloaded point shows its queueing."""
        if self.loop != "open":
            return self.finished_in_window()
        return [o for o in self.outcomes if self.before.at_s <= o.sent_s < self.after.at_s]


# --- solvers ---


class GrpcSolver:
    """Solve RPCs over ``channels`` grpc.aio channels, taken in turn."""

    def __init__(self, target: str, channels: int = 1, timeout_s: float = 30.0):
        self.target, self.timeout_s = target, timeout_s
        self._channels = [grpc.aio.insecure_channel(target) for _ in range(channels)]
        self._stubs = [trex_pb2_grpc.SolverStub(c) for c in self._channels]
        self._turn = 0

    async def solve(self, problem: str) -> Reply:
        self._turn = (self._turn + 1) % len(self._stubs)
        try:
            r = await self._stubs[self._turn].Solve(
                trex_pb2.SolveRequest(problem=problem), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return Reply(exc.code().name, message=exc.details() or "")
        return Reply(OK, r.answer, len(r.tokens), r.compiler_passes, r.executor_steps)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class EngineSolver:
    """``Engine.solve`` in this process: the scheduler and runtime without gRPC."""

    def __init__(self, engine, timeout_s: float = 30.0):
        self.engine, self.timeout_s = engine, timeout_s

    async def solve(self, problem: str) -> Reply:
        from service.errors import ServiceError
        from service.server import status_of

        try:
            r = await self.engine.solve(problem, self.timeout_s)
        except ServiceError as exc:
            code, message = status_of(exc)
            return Reply(code.name, message=message)
        answer = self.engine.runtime.decode(r.tokens)
        return Reply(OK, answer, len(r.tokens), r.compiler_passes, r.executor_steps)

    async def close(self) -> None:
        pass


# --- loops ---


async def _sleep_until(t: float) -> None:
    delay = t - clock()
    if delay > 0:
        await asyncio.sleep(delay)


async def _until(future: asyncio.Future, t: float) -> None:
    """Wait until ``future`` is done or the clock reaches ``t``, whichever comes first."""
    await asyncio.wait({future}, timeout=max(0.0, t - clock()))


async def _drain(tasks: Sequence[asyncio.Task], timeout_s: float) -> int:
    """Wait up to ``timeout_s`` for ``tasks``; cancel the rest; -> how many were cancelled."""
    if not tasks:
        return 0
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending)
        log.warning(
            "%d requests unfinished %.0f s after the window; cancelled", len(pending), timeout_s
        )
    return len(pending)


async def closed_loop(
    solver,
    problems: Sequence[BenchProblem],
    clients: int,
    *,
    probe: Probe,
    warmup_s: float,
    duration_s: float,
    max_requests: int,
    cycle: bool = True,
    drain_s: float = 60.0,
    loop: str = "closed",
) -> PointResult:
    """``clients`` callers, each sending its next problem as soon as its last one returned.

    Problems are taken in list order, shared by all clients, from the start of the list
    (``cycle``: round and round; otherwise each once, and the window ends with the last).
    """
    n = len(problems)
    outcomes: list[Outcome] = []
    taken = 0
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal taken
        while not stop.is_set() and taken < max_requests and (cycle or taken < n):
            i = taken % n
            taken += 1
            sent = clock()
            reply = await solver.solve(problems[i].text)
            outcomes.append(Outcome(i, reply, sent, clock()))

    started = clock()
    before = await probe() if warmup_s <= 0 else None
    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    everyone = asyncio.gather(*tasks)
    if before is None:
        await _until(everyone, started + warmup_s)
        before = await probe()
    await _until(everyone, before.at_s + duration_s)
    stop.set()
    after = await probe()
    cancelled = await _drain(tasks, drain_s)
    return PointResult(loop, clients, outcomes, before, after, sent=taken, cancelled=cancelled)


async def open_loop(
    solver,
    problems: Sequence[BenchProblem],
    rate: float,
    *,
    probe: Probe,
    warmup_s: float,
    duration_s: float,
    max_requests: int,
    max_in_flight: int,
    seed: int = 0,
    drain_s: float = 60.0,
) -> PointResult:
    """Poisson arrivals at ``rate`` per second; each arrival sends the next problem."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    rng = random.Random(seed)
    n = len(problems)
    outcomes: list[Outcome] = []
    in_flight: set[asyncio.Task] = set()
    shed_at: list[float] = []  # scheduled arrivals that were not sent

    async def one(i: int, scheduled: float) -> None:
        reply = await solver.solve(problems[i].text)
        outcomes.append(Outcome(i, reply, scheduled, clock()))

    started = clock()
    window_start = started + warmup_s
    window_end = window_start + duration_s
    snapshots: dict[str, Snapshot] = {}

    async def take(name: str, at: float) -> None:
        await _sleep_until(at)
        snapshots[name] = await probe()

    sampler = asyncio.create_task(take("before", window_start))
    tasks: list[asyncio.Task] = []
    t, k = started, 0
    while k < max_requests:
        t += rng.expovariate(rate)
        if t >= window_end:
            break
        if t > clock():
            await _sleep_until(t)
        if len(in_flight) >= max_in_flight:
            shed_at.append(t)
        else:
            task = asyncio.create_task(one(k % n, t))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            tasks.append(task)
        k += 1
    await sampler
    await take("after", window_end)
    before, after = snapshots["before"], snapshots["after"]
    cancelled = await _drain(tasks, drain_s)
    outcomes += [Outcome(-1, Reply(SHED), s, s) for s in shed_at]
    shed = sum(before.at_s <= s < after.at_s for s in shed_at)
    return PointResult(
        "open", rate, outcomes, before, after, sent=len(tasks), shed=shed, cancelled=cancelled
    )

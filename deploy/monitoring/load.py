"""Bounded synthetic load for trex-serve, so that every dashboard panel has something to show.

    python deploy/monitoring/load.py --target localhost:50051 --rate 50 --duration-s 300
    docker compose -f deploy/monitoring/docker-compose.yml --profile load up

A mix of the three Solver methods (Solve, SolveStream, SolveBatch) on random additions of
1 to 10 digit operands, plus a share of malformed problems that the server refuses with
INVALID_ARGUMENT, so the error panels have a series too. Calls start at --rate per second,
at most --concurrency at once, and stop after --calls calls or --duration-s seconds,
whichever comes first. Prints one JSON line: calls per method and status code.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time

import grpc

from protos.trex.v1 import trex_pb2, trex_pb2_grpc

METHODS = ("Solve", "SolveStream", "SolveBatch")
WEIGHTS = (0.75, 0.15, 0.10)
BATCH_SIZE = 4


def problem(rng: random.Random) -> str:
    a, b = (rng.randrange(10 ** rng.randint(1, 10)) for _ in range(2))
    return f"{a}+{b}="


def bad_problem(rng: random.Random) -> str:
    return rng.choice(["12+x=", "12+34", "1234=", "1+2+3=", "2*3="])


async def call(stub, method: str, problems: list[str], timeout_s: float) -> grpc.StatusCode:
    try:
        if method == "Solve":
            await stub.Solve(trex_pb2.SolveRequest(problem=problems[0]), timeout=timeout_s)
        elif method == "SolveStream":
            stream = stub.SolveStream(trex_pb2.SolveRequest(problem=problems[0]), timeout=timeout_s)
            async for _ in stream:
                pass
        else:
            await stub.SolveBatch(trex_pb2.SolveBatchRequest(problems=problems), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def run(
    target: str,
    rate: float,
    duration_s: float,
    calls: int,
    concurrency: int,
    bad_share: float,
    timeout_s: float,
    seed: int,
) -> dict[str, dict[str, int]]:
    """Send the load; -> {method: {status code name: calls}}."""
    rng = random.Random(seed)
    outcomes: dict[str, collections.Counter] = {m: collections.Counter() for m in METHODS}
    gate = asyncio.Semaphore(concurrency)
    tasks = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = trex_pb2_grpc.SolverStub(channel)

        async def one(method: str, problems: list[str]) -> None:
            async with gate:
                code = await call(stub, method, problems, timeout_s)
            outcomes[method][code.name] += 1

        start = time.monotonic()
        for n in range(calls):
            due = start + n / rate
            if due - start >= duration_s:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            method = rng.choices(METHODS, WEIGHTS)[0]
            count = BATCH_SIZE if method == "SolveBatch" else 1
            make = bad_problem if rng.random() < bad_share else problem
            tasks.append(asyncio.create_task(one(method, [make(rng) for _ in range(count)])))
        await asyncio.gather(*tasks)
    return {m: dict(c) for m, c in outcomes.items() if c}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--target", default="localhost:50051", help="gRPC HOST:PORT")
    ap.add_argument("--rate", type=float, default=20.0, help="calls started per second")
    ap.add_argument("--duration-s", type=float, default=60.0, help="stop starting calls after")
    ap.add_argument("--calls", type=int, default=100_000, help="stop after this many calls")
    ap.add_argument("--concurrency", type=int, default=32, help="calls in flight at most")
    ap.add_argument("--bad-share", type=float, default=0.05, help="share of malformed problems")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each call")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.rate <= 0 or args.concurrency < 1:
        ap.error("--rate must be positive and --concurrency at least 1")
    outcomes = asyncio.run(
        run(
            args.target,
            args.rate,
            args.duration_s,
            args.calls,
            args.concurrency,
            args.bad_share,
            args.timeout_s,
            args.seed,
        )
    )
    print(json.dumps(outcomes, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command-line client of the T-REX solve service.

    trex-client --target localhost:50051 7669+10132=
    trex-client --target localhost:50051 --file problems.txt --stats
    printf '1+2=\\n30+12=\\n' | trex-client --target localhost:50051
    trex-client --target localhost:50051 --stream 9999999999+1=
    trex-client --target localhost:50051 --inspect 7669+10132= --out inspect.json [--summary]

--stream prints each digit as it arrives when the model emits the answer as it is written
(T-REX); a model that emits the least significant digit first (the baseline) has its answer
printed whole when the stream ends.

--inspect calls Inspect on one problem (T-REX only) and writes the reply to --out as JSON:
the answer, the tokens, the executor program (every parameter, or with --summary statistics
per named tensor) with its layout, the executor's token embedding and the hidden state after
every step, field names as in protos/trex/v1/trex.proto. The answer is printed.

Problems come from the command line, or one per line from --file (``-`` for stdin), or
from stdin when neither is given. Answers are printed one per line in input order, with
--stats followed by a tab and the per-request figures the server reports. A problem the
server refuses leaves an empty line on stdout (so lines stay aligned with the input) and
its line number, status code and message on stderr; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass

import grpc
from google.protobuf import json_format

from protos.trex.v1 import trex_pb2, trex_pb2_grpc


@dataclass
class Outcome:
    problem: str
    response: trex_pb2.SolveResponse | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    round_trip_s: float = 0.0
    printed: bool = False  # the answer's digits went to stdout as they were streamed


def format_stats(outcome: Outcome) -> str:
    r = outcome.response
    tokens = len(r.tokens)
    return " ".join(
        [
            f"tokens={tokens}",
            f"compiler_passes={r.compiler_passes}",
            f"executor_steps={r.executor_steps}",
            f"passes_per_token={r.compiler_passes / tokens:.3f}" if tokens else "",
            f"queue_ms={r.queue_time.ToNanoseconds() / 1e6:.3f}",
            f"compile_ms={r.compile_time.ToNanoseconds() / 1e6:.3f}",
            f"execute_ms={r.execute_time.ToNanoseconds() / 1e6:.3f}",
            f"round_trip_ms={outcome.round_trip_s * 1e3:.3f}",
            f"stop={trex_pb2.StopReason.Name(r.stop_reason)}",
            f"model={r.model_version}",
        ]
    )


async def solve_one(stub, problem: str, timeout_s: float | None, stream: bool) -> Outcome:
    outcome = Outcome(problem)
    started_s = time.perf_counter()
    try:
        if stream:
            # print each token as it arrives; the last message holds the full result
            async for message in stub.SolveStream(
                trex_pb2.SolveRequest(problem=problem), timeout=timeout_s
            ):
                if message.HasField("token"):
                    # digits only, as in the answer; <end> closes the line, in run(). Digits
                    # that come least significant first wait for the whole answer instead.
                    token = message.token
                    lsd_first = token.digit_order == trex_pb2.DIGIT_ORDER_LEAST_SIGNIFICANT_FIRST
                    if token.text.isdigit() and not lsd_first:
                        print(token.text, end="", flush=True)
                        outcome.printed = True
                else:
                    outcome.response = message.result
        else:
            outcome.response = await stub.Solve(
                trex_pb2.SolveRequest(problem=problem), timeout=timeout_s
            )
    except grpc.aio.AioRpcError as exc:
        outcome.code, outcome.message = exc.code(), exc.details() or ""
    outcome.round_trip_s = time.perf_counter() - started_s
    return outcome


async def run(
    target: str,
    problems: list[str],
    concurrency: int,
    timeout_s: float | None,
    stats: bool,
    stream: bool,
) -> int:
    """Solve ``problems``, print the answers in order; -> the number that failed."""
    failed = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = trex_pb2_grpc.SolverStub(channel)
        gate = asyncio.Semaphore(1 if stream else concurrency)

        async def gated(problem: str) -> Outcome:
            async with gate:
                return await solve_one(stub, problem, timeout_s, stream)

        tasks = [asyncio.create_task(gated(p)) for p in problems]
        for line, task in enumerate(tasks, start=1):
            outcome = await task
            if outcome.code is not grpc.StatusCode.OK:
                failed += 1
                print(
                    f"line {line}: {outcome.problem!r}: {outcome.code.name}: {outcome.message}",
                    file=sys.stderr,
                )
                print(flush=True)
                continue
            answer = "" if outcome.printed else outcome.response.answer
            print(answer + (f"\t{format_stats(outcome)}" if stats else ""), flush=True)
    return failed


async def inspect(
    target: str, problem: str, out: str, summary: bool, timeout_s: float | None
) -> int:
    """Inspect ``problem``, write the reply to ``out`` as JSON and print the answer;
    -> the exit status."""
    detail = trex_pb2.PROGRAM_DETAIL_SUMMARY if summary else trex_pb2.PROGRAM_DETAIL_FULL
    async with grpc.aio.insecure_channel(target) as channel:
        stub = trex_pb2_grpc.SolverStub(channel)
        try:
            reply = await stub.Inspect(
                trex_pb2.InspectRequest(problem=problem, program_detail=detail), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            print(f"{problem!r}: {exc.code().name}: {exc.details() or ''}", file=sys.stderr)
            return 1
    # every field, zeros and empty lists included, so the file's shape does not depend on
    # the values; float32 values print as the shortest text that reads back the same float32
    record = json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    try:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.write("\n")
    except OSError as exc:
        print(f"trex-client: cannot write {out}: {exc.strerror}", file=sys.stderr)
        return 2
    print(reply.answer, flush=True)
    return 0


def read_problems(args) -> list[str]:
    if args.problems:
        return list(args.problems)
    if args.file in (None, "-"):
        if args.file is None and sys.stdin.isatty():
            raise SystemExit("trex-client: give problems as arguments, or --file, or on stdin")
        text = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise SystemExit(f"trex-client: cannot read {args.file}: {reason}") from None
    # NOTE: only line endings are stripped; other whitespace reaches the server, which
    # says what is wrong with it
    return text.splitlines()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="trex-client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "problems",
        nargs="*",
        help="problems such as 7669+10132=; put any that start with - after --",
    )
    ap.add_argument(
        "--target",
        default=os.environ.get("TREX_TARGET", "localhost:50051"),
        help="server HOST:PORT (env TREX_TARGET; default %(default)s)",
    )
    ap.add_argument("--file", help="read problems from this file, one per line; - for stdin")
    ap.add_argument(
        "--concurrency", type=int, default=32, help="calls in flight at once (default %(default)s)"
    )
    ap.add_argument("--timeout", type=float, default=None, help="deadline of each call, seconds")
    ap.add_argument("--stats", action="store_true", help="print per-request figures")
    ap.add_argument(
        "--stream", action="store_true", help="SolveStream: print tokens as they are emitted"
    )
    ap.add_argument("--inspect", metavar="PROBLEM", help="Inspect one problem (T-REX only)")
    ap.add_argument("--out", metavar="FILE.json", help="with --inspect: where to write the reply")
    ap.add_argument(
        "--summary",
        action="store_true",
        help="with --inspect: statistics per named tensor instead of every program parameter",
    )
    args = ap.parse_args(argv)
    if args.problems and args.file:
        ap.error("give problems as arguments or with --file, not both")
    if args.inspect is not None:
        if args.problems or args.file or args.stream or args.stats:
            ap.error("--inspect takes one problem and no other problems, --stream or --stats")
        if not args.out:
            ap.error("--inspect needs --out FILE.json")
    elif args.out or args.summary:
        ap.error("--out and --summary go with --inspect")
    if args.concurrency < 1:
        ap.error("--concurrency must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        ap.error("--timeout must be a positive number of seconds")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.inspect is not None:
        return asyncio.run(inspect(args.target, args.inspect, args.out, args.summary, args.timeout))
    problems = read_problems(args)
    failed = asyncio.run(
        run(args.target, problems, args.concurrency, args.timeout, args.stats, args.stream)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

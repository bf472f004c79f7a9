"""trex-bench: load test of T-REX against the token-by-token baseline, over gRPC and in-process.

    trex-bench                                   # both exports in models/, results in bench/results
    trex-bench --quick                           # a run of about a minute, to try it out
    trex-bench --model trex=/tmp/onnx-trex --modes grpc --concurrency 1,16 --duration 5
    python -m bench.cli --help                   # every flag

For each model in turn (``--model LABEL=DIR``; by default models/onnx and models/onnx-baseline
where they exist) it starts ``trex-serve`` as a subprocess on a free loopback port, with the
same flags for every model, and measures over gRPC:

  closed loop   N clients, each sending its next problem when its last answer came back,
                for each N of --concurrency: throughput as a function of concurrency;
  open loop     Poisson arrivals at fractions (--load-fractions) of the saturated throughput
                just measured, or at --rates: latency as a function of offered load;
  accuracy      every benchmark problem once at the highest concurrency: accuracy and work
                per operand length, on the same problems for every model.

Then the engine-only mode loads the same model with the same flags into this process and
runs the closed loop against the engine directly, without gRPC, so that the cost of the gRPC
layer is the difference. Problems are the held-out set of training.data.held_out_set.

Output in --out: RESULTS.md (tables and ratios, also printed), results.json (every figure),
throughput_vs_concurrency.png, latency_vs_load.png, and logs/ (server logs, not for git).
With --profile, py-spy samples the server during an extra saturated point (profile-*.txt).

Run it on a quiet machine: the load generator and the server share the CPU, and anything
else running skews both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.load import EngineSolver, GrpcSolver, closed_loop, open_loop
from bench.problems import load_problems
from bench.servers import REPO, InProcessEngine, ServerProcess, snapshot
from bench.stats import by_group, summarize

log = logging.getLogger(__name__)

DEFAULT_MODELS = (
    ("trex", REPO / "models" / "onnx"),
    ("baseline", REPO / "models" / "onnx-baseline"),
)
QUICK = {
    "concurrency": "1,8",
    "load_fractions": "0.5,1.0",
    "duration": 1.5,
    "warmup": 0.3,
    "problems": 300,
}


@dataclass
class Model:
    label: str
    model_dir: Path
    kind: str
    model_version: str
    max_digits: int


def read_model(label: str, model_dir: Path) -> Model:
    from service.runtime import ModelLoadError, read_manifest

    try:
        manifest = read_manifest(model_dir)
    except ModelLoadError as exc:
        raise SystemExit(f"trex-bench: {label}: {exc}") from None
    kind = manifest.get("kind") or manifest["config"].get("kind") or "trex"
    return Model(
        label, model_dir, kind, manifest["model_version"], int(manifest["config"]["max_digits"])
    )


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="trex-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        action="append",
        metavar="LABEL=DIR",
        help="an export to benchmark; repeat for several (default: models/onnx as "
        "trex and models/onnx-baseline as baseline, those that exist)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument(
        "--modes", default="grpc,engine", help="grpc, engine or both (default %(default)s)"
    )
    ap.add_argument(
        "--concurrency", default="1,4,16,64,256", help="closed-loop clients, comma-separated"
    )
    ap.add_argument(
        "--load-fractions",
        default="0.25,0.5,0.75,0.9,1.1",
        help="open-loop rates as fractions of the saturated closed-loop answers/s",
    )
    ap.add_argument("--rates", default="", help="open-loop rates in answers/s; overrides fractions")
    ap.add_argument("--no-open-loop", action="store_true")
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per load point")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    ap.add_argument(
        "--problems",
        type=int,
        default=4000,
        help="held-out problems (all of them are solved once in the accuracy pass)",
    )
    ap.add_argument("--seed", type=int, default=1234, help="held-out set and arrival times")
    ap.add_argument("--max-requests", type=int, default=500_000, help="per load point, a bound")
    ap.add_argument(
        "--max-in-flight",
        type=int,
        default=4096,
        help="open loop: arrivals beyond this many unanswered requests are shed",
    )
    ap.add_argument("--timeout", type=float, default=30.0, help="deadline of each request, s")
    ap.add_argument(
        "--accuracy-timeout", type=float, default=300.0, help="time bound of the accuracy pass, s"
    )
    ap.add_argument("--channels", type=int, default=1, help="gRPC channels the clients share")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    ap.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also sample the server with py-spy for this long at saturation",
    )
    # the server's knobs: the same for every model and for the engine-only mode
    srv = ap.add_argument_group("server flags (passed to trex-serve and the in-process engine)")
    srv.add_argument("--provider", default="cpu")
    srv.add_argument("--intra-op-threads", type=int, default=1)
    srv.add_argument("--max-rows", type=int, default=256)
    srv.add_argument("--max-compile-batch", type=int, default=64)
    srv.add_argument("--max-execute-batch", type=int, default=256)
    srv.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    srv.add_argument("--max-queue", type=int, default=1024)
    srv.add_argument("--server-args", default="", help="more trex-serve flags, one string")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    args.concurrency = [int(c) for c in _floats(args.concurrency)]
    args.load_fractions = _floats(args.load_fractions)
    args.rates = _floats(args.rates)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.concurrency or min(args.concurrency) < 1:
        ap.error("--concurrency needs one or more client counts >= 1")
    if set(args.modes) - {"grpc", "engine"} or not args.modes:
        ap.error("--modes takes grpc, engine or both")
    if min(args.rates + args.load_fractions, default=1) <= 0:
        ap.error("rates and fractions must be positive")
    if args.duration <= 0 or args.warmup < 0 or args.problems < 1:
        ap.error("--duration must be positive, --warmup >= 0, --problems >= 1")
    models = []
    for spec in args.model or []:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            ap.error(f"--model takes LABEL=DIR, not {spec!r}")
        models.append((label, Path(path)))
    if not models:
        models = [(lb, p) for lb, p in DEFAULT_MODELS if (p / "manifest.json").is_file()]
        if not models:
            ap.error("no export in models/onnx or models/onnx-baseline; give --model LABEL=DIR")
    args.models = [read_model(label, path) for label, path in models]
    return args


def server_flags(args) -> list[str]:
    flags = [
        "--provider",
        args.provider,
        "--intra-op-threads",
        str(args.intra_op_threads),
        "--max-rows",
        str(args.max_rows),
        "--max-compile-batch",
        str(args.max_compile_batch),
        "--max-execute-batch",
        str(args.max_execute_batch),
        "--max-queue-delay-ms",
        str(args.max_queue_delay_ms),
        "--max-queue",
        str(args.max_queue),
        # per-request logs would cost the server more than some requests do
        "--log-level",
        "WARNING",
    ]
    return flags + shlex.split(args.server_args)


class Progress:
    """One tqdm bar over every load point of the run, when tqdm is there and stderr a tty."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="point", file=sys.stderr, disable=None)
        except ImportError:
            self.bar = None

    def start(self, what: str) -> None:
        log.info("%s", what)
        if self.bar is not None:
            self.bar.set_description(what)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _points_per_model(args) -> int:
    n = 0
    if "grpc" in args.modes:
        opens = 0 if args.no_open_loop else len(args.rates or args.load_fractions)
        n += len(args.concurrency) + opens + 1 + (args.profile > 0)
    if "engine" in args.modes:
        n += len(args.concurrency) + (args.profile > 0)
    return n


async def _profile(model: Model, mode: str, pid: int, solver, problems, args, probe) -> dict:
    """An extra saturated closed-loop point while py-spy samples process ``pid``."""
    from bench.profile import profile_point

    load = closed_loop(
        solver,
        problems,
        max(args.concurrency),
        probe=probe,
        warmup_s=args.warmup,
        duration_s=args.profile,
        max_requests=args.max_requests,
    )
    raw = args.out / f"profile-{model.label}-{mode}.txt"
    return await profile_point(pid, raw, args.profile + args.warmup, load)


async def bench_grpc(model: Model, args, problems, flags, progress: Progress) -> dict:
    out: dict = {"points": [], "groups": []}
    server = ServerProcess(model.model_dir, flags, args.out / "logs" / f"{model.label}-server.log")
    try:
        out["startup_s"] = await asyncio.to_thread(server.wait_serving)
        solver = GrpcSolver(server.target, args.channels, args.timeout)

        async def probe():
            return await snapshot(server)

        common = {
            "probe": probe,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "max_requests": args.max_requests,
        }
        for clients in args.concurrency:
            progress.start(f"{model.label} gRPC closed loop, {clients} clients")
            point = await closed_loop(solver, problems, clients, **common)
            out["points"].append({"mode": "grpc", **summarize(point, problems)})
            progress.done()
        closed = [p for p in out["points"] if p["loop"] == "closed"]
        saturated = max(p["answers_per_s"] for p in closed)

        if not args.no_open_loop:
            rates = args.rates or [f * saturated for f in args.load_fractions]
            for i, rate in enumerate(rates):
                progress.start(f"{model.label} gRPC open loop, {rate:.0f}/s")
                point = await open_loop(
                    solver,
                    problems,
                    rate,
                    max_in_flight=args.max_in_flight,
                    seed=args.seed + i,
                    **common,
                )
                out["points"].append({"mode": "grpc", **summarize(point, problems)})
                progress.done()

        clients = max(args.concurrency)
        progress.start(f"{model.label} gRPC accuracy pass, {len(problems)} problems")
        point = await closed_loop(
            solver,
            problems,
            clients,
            probe=probe,
            warmup_s=0,
            duration_s=args.accuracy_timeout,
            max_requests=len(problems),
            cycle=False,
            loop="accuracy",
        )
        out["points"].append({"mode": "grpc", **summarize(point, problems)})
        out["groups"] = by_group(point, problems)
        progress.done()

        if args.profile > 0:
            progress.start(f"{model.label} gRPC profile, {clients} clients")
            out["profile"] = await _profile(
                model, "grpc", server.pid, solver, problems, args, probe
            )
            progress.done()
        await solver.close()
    finally:
        out["server_exit"] = await asyncio.to_thread(server.stop)
        out["server_cmd"] = " ".join(server.cmd)
    return out


async def bench_engine(model: Model, args, problems, flags, progress: Progress) -> dict:
    out: dict = {"points": []}
    target = InProcessEngine(model.model_dir, flags)
    try:
        out["startup_s"] = await target.start()
        solver = EngineSolver(target.engine, args.timeout)

        async def probe():
            return await snapshot(target)

        for clients in args.concurrency:
            progress.start(f"{model.label} engine-only closed loop, {clients} clients")
            point = await closed_loop(
                solver,
                problems,
                clients,
                probe=probe,
                warmup_s=args.warmup,
                duration_s=args.duration,
                max_requests=args.max_requests,
            )
            out["points"].append({"mode": "engine", **summarize(point, problems)})
            progress.done()
        if args.profile > 0:
            progress.start(f"{model.label} engine-only profile, {max(args.concurrency)} clients")
            out["profile"] = await _profile(
                model, "engine", target.pid, solver, problems, args, probe
            )
            progress.done()
    finally:
        await target.stop()
    return out


def machine_state() -> dict:
    """What the figures depend on besides the code: the CPU, its load, versions, commit."""
    import grpc
    import onnxruntime

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def run(cmd):
        try:
            return subprocess.run(
                cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "training_running": bool(run(["pgrep", "-f", "training.train"])),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "commit": run(["git", "rev-parse", "--short", "HEAD"]),
        "dirty": bool(run(["git", "status", "--porcelain", "--untracked-files=no"])),
    }


async def run(args) -> dict:
    max_digits = min(m.max_digits for m in args.models)
    problems = await asyncio.to_thread(load_problems, args.problems, max_digits, args.seed)
    flags = server_flags(args)
    results = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine_before": machine_state(),
        "settings": {
            "server_flags": flags,
            "concurrency": args.concurrency,
            "load_fractions": [] if args.rates else args.load_fractions,
            "rates": args.rates,
            "open_loop": not args.no_open_loop,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "problems": len(problems),
            "seed": args.seed,
            "channels": args.channels,
            "timeout_s": args.timeout,
            "modes": args.modes,
        },
        "models": {},
    }
    progress = Progress(_points_per_model(args) * len(args.models))
    try:
        for model in args.models:
            entry = {
                "kind": model.kind,
                "model_dir": str(model.model_dir),
                "model_version": model.model_version,
            }
            if "grpc" in args.modes:
                entry["grpc"] = await bench_grpc(model, args, problems, flags, progress)
            if "engine" in args.modes:
                entry["engine"] = await bench_engine(model, args, problems, flags, progress)
            results["models"][model.label] = entry
    finally:
        progress.close()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    results["machine_after"] = machine_state()
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) * 0.5:
        log.warning(
            "load average %.2f on %d CPUs: the figures will be skewed by other work",
            load,
            os.cpu_count(),
        )
    args.out.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args))
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report.write(results, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

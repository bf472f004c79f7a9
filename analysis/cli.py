"""trex-analyze: figures, their numbers and a report on a T-REX checkpoint.

    trex-analyze --checkpoint models/trex.pt --out docs/analysis
    trex-analyze --checkpoint runs/x.pt --out /tmp/analysis --quick   # tiny sizes, seconds
    python -m analysis --help

Makes, into the output folder: program_distances.* (programs of one sum by carry
pattern), sum_variance.* (variance of equal-sum programs against the sum),
program_tsne.* (t-SNE of programs of random problems), hidden_trajectories.* and
hidden_cloud.csv (executor hidden states), summary.json, and README.md, the
report that shows the figures with their numbers. Prints the time it took.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from analysis import common, distances, report, trajectories, tsne_map, variance
from training import checkpoint
from training.model import ProgramLayout

# full-size defaults, and the --quick ones for a run of seconds
FULL = {"n_sums": 48, "per_sum": 1000, "tsne_n": 2000, "cloud_n": 400}
QUICK = {"n_sums": 5, "per_sum": 48, "tsne_n": 120, "cloud_n": 40}
MAX_SUM = 3000  # figure 1 draws every pair of a+b=S: (S+1)^2 distances


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="trex-analyze", description=__doc__.split("\n\n")[0])

    def sized(key: str) -> str:
        return f"(default {FULL[key]}, with --quick {QUICK[key]})"

    ap.add_argument("--checkpoint", default="models/trex.pt", help="(default %(default)s)")
    ap.add_argument("--out", default="docs/analysis", help="output folder (default %(default)s)")
    ap.add_argument(
        "--sum",
        type=int,
        default=123,
        dest="total",
        help="figure 1: all a+b with this sum (default %(default)s)",
    )
    ap.add_argument(
        "--sum-range",
        type=int,
        nargs=2,
        default=(10, 2000),
        metavar=("LO", "HI"),
        help="figure 2: sums sampled log-spaced in this range (default 10 2000)",
    )
    ap.add_argument("--n-sums", type=int, help="figure 2: sums sampled " + sized("n_sums"))
    ap.add_argument(
        "--per-sum",
        type=int,
        help="figure 2: at most this many problems per sum " + sized("per_sum"),
    )
    ap.add_argument("--tsne-n", type=int, help="figure 3: random problems " + sized("tsne_n"))
    ap.add_argument(
        "--perplexity",
        type=float,
        default=30.0,
        help="figure 3: t-SNE perplexity (default %(default)s)",
    )
    ap.add_argument(
        "--knn",
        type=int,
        default=10,
        help="figure 3: neighbours for kNN purity (default %(default)s)",
    )
    ap.add_argument(
        "--cloud-n",
        type=int,
        help="figure 4: random problems whose states form the cloud " + sized("cloud_n"),
    )
    ap.add_argument(
        "--trajectories",
        nargs="+",
        default=["17000+801", "16000+1801"],
        metavar="A+B",
        help="figure 4: problems whose trajectories are drawn; "
        "distances are measured from the first (default 17000+801 16000+1801)",
    )
    ap.add_argument(
        "--diverge-threshold",
        type=float,
        default=0.5,
        help="figure 4: distance, relative to two random states at the same step, "
        "from which trajectories count as diverged (default %(default)s)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for a smoke run of seconds (sizes given explicitly still win)",
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=500,
        help="problems per compiler pass (default %(default)s)",
    )
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.trajectory_problems = [common.parse_problem(t) for t in args.trajectories]
    except ValueError as e:
        ap.error(f"--trajectories: {e}")
    if not 0 <= args.total <= MAX_SUM:
        ap.error(f"--sum: from 0 to {MAX_SUM} (its {MAX_SUM + 1} programs' pairwise distances)")
    if not 0 <= args.sum_range[0] <= args.sum_range[1]:
        ap.error("--sum-range: 0 <= LO <= HI")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return analyze(args, sys.argv[1:] if argv is None else argv)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process


def analyze(args: argparse.Namespace, argv_shown: list[str]) -> int:
    """Every figure, summary.json and the report; 0 on success, 2 on bad input."""
    torch.manual_seed(args.seed)
    if not Path(args.checkpoint).is_file():
        print(f"trex-analyze: no checkpoint at {args.checkpoint}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    model, state = checkpoint.load(args.checkpoint)
    longest = max(
        [len(str(args.total)), len(str(args.sum_range[1]))]
        + [max(len(p.a), len(p.b)) for p in args.trajectory_problems]
    )
    if longest > model.cfg.max_digits:
        print(
            f"trex-analyze: operands of up to {model.cfg.max_digits} digits only", file=sys.stderr
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    stages = [
        (
            "distances",
            "1/4 distances of equal-sum programs",
            lambda: distances.run(model, out, args.total, args.batch_size, args.seed),
        ),
        (
            "variance",
            "2/4 variance against the sum",
            lambda: variance.run(
                model, out, *args.sum_range, args.n_sums, args.per_sum, args.batch_size, args.seed
            ),
        ),
        (
            "tsne",
            "3/4 t-SNE of programs",
            lambda: tsne_map.run(
                model, out, args.tsne_n, args.perplexity, args.knn, args.batch_size, args.seed
            ),
        ),
        (
            "trajectories",
            "4/4 hidden-state trajectories",
            lambda: trajectories.run(
                model,
                out,
                args.trajectories,
                args.cloud_n,
                args.diverge_threshold,
                args.batch_size,
                args.seed,
            ),
        ),
    ]
    summary, seconds = {}, {}
    with tqdm(stages, desc="trex-analyze", unit="figure") as bar:
        for key, desc, fn in bar:
            bar.set_postfix_str(desc)
            t0 = time.perf_counter()
            summary[key] = fn()
            seconds[key] = time.perf_counter() - t0
    total = time.perf_counter() - start

    meta = {
        "checkpoint": str(args.checkpoint),
        "step": state.get("step"),
        "held_out_accuracy": state.get("held_out_accuracy"),
        "program_size": ProgramLayout(model.cfg).size,
        "command": " ".join(["trex-analyze", *map(shlex.quote, argv_shown)]),
        "seconds": total,
        "seconds_by_figure": seconds,
        "threads": torch.get_num_threads(),
    }
    common.write_json(out / "summary.json", common.rounded({"meta": meta, **summary}))
    report.write(out / "README.md", meta, summary)
    print(
        f"trex-analyze: wrote {out}/README.md and figures in {total:.1f} s "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

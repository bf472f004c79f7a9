"""Figure 2: how much the programs of one sum vary, for many sums.

    trex-analyze --checkpoint models/trex.pt --sum-range 10 2000 --n-sums 48

For each sampled sum S (log-spaced), the problems a + b = S (all of them, or a
random ``--per-sum`` of them) are compiled and their total variance (mean squared
distance to their centroid) is plotted against S. As a control, the same first
operands are paired with the same second operands shuffled, so operand digits and
lengths are alike but the sums differ: a ratio below 1 means programs of one sum
are more alike than programs of the same operands with other sums. Written:
sum_variance.png and sum_variance.csv (one row per sum, with the variance of each
program part).
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from analysis import common
from training import data
from training.model import ProgramLayout, TRex

NAME = "sum_variance"


def sampled_sums(lo: int, hi: int, n: int) -> list[int]:
    """``n`` (or fewer, after rounding) log-spaced integer sums from lo to hi."""
    return sorted({round(s) for s in np.geomspace(max(lo, 1), hi, n)})


def pattern_entropy(patterns: list) -> float:
    """Shannon entropy, in bits, of the carry patterns in one set of problems."""
    counts = np.unique([repr(p) for p in patterns], return_counts=True)[1]
    q = counts / counts.sum()
    return float(-(q * np.log2(q)).sum())


def run(
    model: TRex, out: Path, lo: int, hi: int, n_sums: int, per_sum: int, batch_size: int, seed: int
) -> dict:
    rng = np.random.default_rng(seed)
    layout = ProgramLayout(model.cfg)
    rows = []
    for total in tqdm(sampled_sums(lo, hi, n_sums), desc="sums", leave=False):
        a_values = np.arange(total + 1)
        if a_values.size > per_sum:
            a_values = np.sort(rng.choice(a_values, per_sum, replace=False))
        problems = common.equal_sum_problems(total, [int(a) for a in a_values])
        b_values = rng.permutation([int(p.b) for p in problems])
        control = [data.Problem(p.a, str(b)) for p, b in zip(problems, b_values)]
        patterns = [common.carry_places(int(p.a), int(p.b)) for p in problems]
        tr = common.trace(model, problems, batch_size, desc=f"sum {total}")
        ctrl = common.trace(model, control, batch_size, desc=f"shuffled {total}")
        var = common.total_variance(tr.programs)
        cvar = common.total_variance(ctrl.programs)
        row = {
            "sum": total,
            "problems": len(problems),
            "variance": var,
            "shuffled_variance": cvar,
            "ratio": var / cvar if cvar > 0 else float("nan"),
            "accuracy": common.accuracy(problems, tr),
            "mean_carries": float(np.mean([len(p) for p in patterns])),
            "carry_patterns": len(set(patterns)),
            "carry_pattern_entropy_bits": pattern_entropy(patterns),
        }
        for name, (a, b) in layout.offsets.items():
            row[f"variance_{name}"] = common.total_variance(tr.programs[:, a:b])
        rows.append(row)

    with open(out / f"{NAME}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    sums = np.array([r["sum"] for r in rows])
    var = np.array([r["variance"] for r in rows])
    ratio = np.array([r["ratio"] for r in rows])
    part_share = {
        name: float(
            np.mean([r[f"variance_{name}"] / r["variance"] for r in rows if r["variance"] > 0])
        )
        for name in layout.offsets
    }
    summary = {
        "sums": len(rows),
        "sum_range": [int(sums.min()), int(sums.max())],
        "per_sum_cap": per_sum,
        "variance_min": float(var.min()),
        "variance_median": float(np.median(var)),
        "variance_max": float(var.max()),
        "ratio_median": float(np.nanmedian(ratio)),
        "ratio_min": float(np.nanmin(ratio)),
        "ratio_max": float(np.nanmax(ratio)),
        "sums_with_ratio_below_1": int((ratio < 1).sum()),
        "spearman_variance_vs_sum": common.spearman(var, sums),
        "spearman_variance_vs_carry_pattern_entropy": common.spearman(
            var, [r["carry_pattern_entropy_bits"] for r in rows]
        ),
        "mean_share_of_variance_by_part": part_share,
        "accuracy": float(
            np.average([r["accuracy"] for r in rows], weights=[r["problems"] for r in rows])
        ),
    }
    _plot(out / f"{NAME}.png", rows, summary)
    return summary


def _plot(path: Path, rows: list[dict], s: dict) -> None:
    sums = [r["sum"] for r in rows]
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    ax.plot(sums, [r["variance"] for r in rows], "-", color="C0", lw=1, label="a+b = S (equal sum)")
    sc = ax.scatter(
        sums,
        [r["variance"] for r in rows],
        c=[r["carry_pattern_entropy_bits"] for r in rows],
        cmap="viridis",
        s=28,
        zorder=3,
    )
    fig.colorbar(
        sc,
        ax=[ax, ax2],
        fraction=0.03,
        pad=0.02,
        label="entropy of the carry patterns in the set (bits)",
    )
    ax.plot(
        sums,
        [r["shuffled_variance"] for r in rows],
        "s--",
        ms=3,
        color="grey",
        label="same a's and b's, b shuffled (sums differ)",
    )
    ax.set_xscale("log")
    ax.set_ylabel("total variance of the programs")
    ax.legend(fontsize=9)
    ax.set_title(
        "Variance of the programs within each equal-sum set\n"
        f"median equal-sum / shuffled = {s['ratio_median']:.2f}; "
        f"Spearman(variance, S) = {s['spearman_variance_vs_sum']:.2f}\n"
        f"Spearman(variance, carry-pattern entropy) = "
        f"{s['spearman_variance_vs_carry_pattern_entropy']:.2f}",
        fontsize=10,
    )
    ax2.plot(sums, [r["ratio"] for r in rows], "o-", ms=4, color="C3")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylabel("equal-sum / shuffled")
    ax2.set_xlabel("sum S (log scale)")
    for k in range(1, 12):
        if sums[0] < 10**k <= sums[-1]:
            for a in (ax, ax2):
                a.axvline(10**k, color="k", lw=0.5, ls=":")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)

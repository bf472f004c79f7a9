"""Figure 1: pairwise distances between the programs of every a + b with one sum.

    trex-analyze --checkpoint models/trex.pt --sum 123     (part of the full run)

All problems a + b = S (a, b >= 0, no leading zeros) are compiled; the Euclidean
distance between every two flat program vectors is drawn as a heatmap whose rows
are grouped by carry pattern (which places carry into the next). Written:
program_distances.png, program_distances.csv (the matrix, rows and columns in the
drawn order) and program_distances.json (the order, patterns, answers, summary).
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from analysis import common
from training.model import TRex

NAME = "program_distances"


def distance_matrix(programs: np.ndarray) -> np.ndarray:
    """Exact pairwise Euclidean distances, float64: each entry is computed from the
    difference of the two vectors (no Gram-matrix shortcut), so the matrix is
    symmetric and its diagonal is zero to the last bit."""
    x = torch.from_numpy(programs.astype(np.float64))
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").numpy()


def pattern_summary(
    d: np.ndarray, patterns: list[str], rng: np.random.Generator, permutations: int = 200
) -> dict:
    """How much carry patterns explain the distances.

    ratio: mean distance between programs whose patterns differ over the mean
    between those whose patterns match (> 1: same pattern, closer programs);
    its p-value is the share of random relabellings (pattern counts kept) that
    reach the same ratio. nn_agreement: share of programs whose nearest other
    program has the same pattern, with its chance level.
    """
    n = len(patterns)
    labels = np.unique(patterns, return_inverse=True)[1]
    iu = np.triu_indices(n, 1)
    dist = d[iu]

    def ratio(lab):
        same = lab[iu[0]] == lab[iu[1]]
        if same.all() or not same.any():
            return float("nan")
        return float(dist[~same].mean() / dist[same].mean())

    observed = ratio(labels)
    same = labels[iu[0]] == labels[iu[1]]
    if np.isnan(observed):
        p_value = float("nan")
    else:
        hits = sum(ratio(rng.permutation(labels)) >= observed for _ in range(permutations))
        p_value = (hits + 1) / (permutations + 1)
    off = d + np.diag(np.full(n, np.inf))
    nearest = off.argmin(1)
    counts = np.bincount(labels)
    return {
        "mean_distance_same_pattern": float(dist[same].mean()) if same.any() else float("nan"),
        "mean_distance_different_pattern": float(dist[~same].mean())
        if (~same).any()
        else float("nan"),
        "ratio_different_over_same": observed,
        "ratio_permutation_p_value": p_value,
        "permutations": permutations,
        "nn_same_pattern": float((labels[nearest] == labels).mean()) if n > 1 else float("nan"),
        "nn_same_pattern_chance": float((counts * (counts - 1)).sum() / (n * (n - 1)))
        if n > 1
        else float("nan"),
    }


def run(model: TRex, out: Path, total: int, batch_size: int, seed: int) -> dict:
    problems = common.equal_sum_problems(total)
    tr = common.trace(model, problems, batch_size, desc=f"sum {total}")
    ints = [(int(p.a), int(p.b)) for p in problems]
    places = [common.carry_places(a, b) for a, b in ints]
    # drawn order: fewer carries first, then by which places carry, then by a
    order = sorted(range(len(problems)), key=lambda i: (len(places[i]), places[i], ints[i][0]))
    problems = [problems[i] for i in order]
    ints = [ints[i] for i in order]
    places = [places[i] for i in order]
    patterns = [common.carry_pattern(a, b) for a, b in ints]
    emitted = tr.answers()
    answers = [emitted[i] for i in order]
    d = distance_matrix(tr.programs[order])

    summary = pattern_summary(d, patterns, np.random.default_rng(seed))
    iu = np.triu_indices(len(problems), 1)
    a_arr = np.array([a for a, _ in ints])
    hamming = np.array([[len(set(p) ^ set(q)) for q in places] for p in places])
    # a+b against b+a (always the same carry pattern)
    where = {ab: i for i, ab in enumerate(ints)}
    swapped = [d[i, where[(b, a)]] for i, (a, b) in enumerate(ints) if a < b]
    summary.update(
        sum=total,
        mean_distance_swapped_operands=float(np.mean(swapped)) if swapped else float("nan"),
        problems=len(problems),
        patterns={p: patterns.count(p) for p in dict.fromkeys(patterns)},
        accuracy=sum(g == p.answer for p, g in zip(problems, answers)) / len(problems),
        mean_distance=float(d[iu].mean()) if iu[0].size else float("nan"),
        spearman_distance_vs_abs_delta_a=common.spearman(d[iu], np.abs(a_arr[:, None] - a_arr)[iu]),
        spearman_distance_vs_carry_places_differing=common.spearman(d[iu], hamming[iu]),
    )

    texts = [p.text for p in problems]
    with open(out / f"{NAME}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["problem", *texts])
        for t, row in zip(texts, d):
            w.writerow([t, *(f"{v:.6g}" for v in row)])
    common.write_json(
        out / f"{NAME}.json",
        {
            "summary": common.rounded(summary),
            "problems": [
                {"problem": t, "carry_pattern": pat, "expected": p.answer, "emitted": g}
                for t, pat, p, g in zip(texts, patterns, problems, answers)
            ],
        },
    )
    _plot(out / f"{NAME}.png", d, patterns, total, summary)
    return summary


def _plot(path: Path, d: np.ndarray, patterns: list[str], total: int, s: dict) -> None:
    n = len(patterns)
    fig, ax = plt.subplots(figsize=(9.5, 8.0))
    im = ax.imshow(d, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="Euclidean distance between programs")
    # one block per carry pattern
    starts = [0] + [i for i in range(1, n) if patterns[i] != patterns[i - 1]] + [n]
    centres, labels = [], []
    for i, (a, b) in enumerate(itertools.pairwise(starts)):
        ax.axhline(a - 0.5, color="white", lw=0.8)
        ax.axvline(a - 0.5, color="white", lw=0.8)
        centres.append((a + b - 1) / 2)
        labels.append(f"{i + 1}: " + patterns[a].replace(", ", ",\n") + f" ({b - a})")
    ax.set_yticks(centres, labels, fontsize=8)
    ax.set_xticks(centres, [str(i + 1) for i in range(len(centres))], fontsize=8)
    ax.set_xlabel(
        "carry pattern (numbered as on the left); problems within a block by increasing a"
    )
    ax.set_title(
        f"Programs of all a+b={total}: pairwise distance, grouped by carry pattern\n"
        f"mean distance, patterns differ / match = {s['ratio_different_over_same']:.2f}"
        f"  (permutation p = {s['ratio_permutation_p_value']:.3g})",
        fontsize=10,
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)

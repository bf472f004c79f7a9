"""Figure 4: executor hidden-state trajectories over a cloud of hidden states.

    trex-analyze --checkpoint models/trex.pt --trajectories 17000+801 16000+1801

The hidden states of greedy runs of random problems (every step up to <end>)
form a background cloud; PCA fitted on that cloud maps it and the trajectories
of the chosen problems (by default two with the same sum) to 2D. Each point of a
trajectory is the state after one step, labelled by the token emitted from it;
the star is h0. Divergence is measured in the full hidden space: at step t the
distance between two trajectories over the typical distance between two random
cloud states at that step (sqrt(2 * total variance) of the step's states); the
distance between the two programs is put on the same scale for comparison.
Written: hidden_trajectories.png, hidden_trajectories.json (the trajectories,
full and projected, and the per-step distances) and hidden_cloud.csv.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.decomposition import PCA

from analysis import common
from training.model import TRex

NAME = "hidden_trajectories"


def step_spread(cloud_h0: np.ndarray, cloud_states: list[np.ndarray], steps: int) -> np.ndarray:
    """RMS distance between two random cloud states at each step 0 (h0) .. steps;
    steps past every cloud run fall back to all states pooled."""
    pooled = np.concatenate(cloud_states)
    out = [np.sqrt(2 * common.total_variance(cloud_h0))]
    for t in range(steps):
        at_t = [s[t] for s in cloud_states if len(s) > t]
        x = np.stack(at_t) if len(at_t) >= 2 else pooled
        out.append(np.sqrt(2 * common.total_variance(x)))
    return np.array(out)


def run(
    model: TRex,
    out: Path,
    texts: list[str],
    cloud_n: int,
    threshold: float,
    batch_size: int,
    seed: int,
) -> dict:
    cloud_problems = common.random_problems(random.Random(seed + 1), cloud_n, model.cfg.max_digits)
    cloud = common.trace(model, cloud_problems, batch_size, desc="state cloud")
    problems = [common.parse_problem(t) for t in texts]
    tr = common.trace(model, problems, batch_size, desc="trajectories")

    cloud_x = np.concatenate(cloud.states)
    cloud_step = np.concatenate([np.arange(1, len(s) + 1) for s in cloud.states])
    cloud_tok = np.concatenate([np.array(t) for t in cloud.tokens])
    pca = PCA(n_components=2).fit(cloud_x)

    # distances in the full hidden space, step 0 being h0
    full = [np.vstack([h0[None], s]) for h0, s in zip(tr.h0, tr.states)]
    longest = max(len(f) for f in full)
    spread = step_spread(cloud.h0, cloud.states, longest - 1)
    program_spread = np.sqrt(2 * common.total_variance(cloud.programs))
    pairs = []
    for k in range(1, len(problems)):
        n = min(len(full[0]), len(full[k]))
        dist = np.linalg.norm(full[0][:n] - full[k][:n], axis=1)
        rel = dist / spread[:n]
        prog_dist = float(np.linalg.norm(tr.programs[0].astype(np.float64) - tr.programs[k]))
        over = np.nonzero(rel >= threshold)[0]
        toks0, toksk = tr.tokens[0], tr.tokens[k]
        differ = [t + 1 for t in range(min(len(toks0), len(toksk))) if toks0[t] != toksk[t]]
        pairs.append(
            {
                "problems": [problems[0].text, problems[k].text],
                "distance_by_step": dist.tolist(),
                "relative_distance_by_step": rel.tolist(),
                "divergence_step": int(over[0]) if over.size else None,
                "max_relative_distance": float(rel.max()),
                "step_of_max_relative_distance": int(rel.argmax()),
                "first_step_with_different_tokens": differ[0] if differ else None,
                "program_distance": prog_dist,
                "program_distance_relative": prog_dist / program_spread,
            }
        )

    answers = tr.answers()
    trajectories = []
    for p, toks, f, got in zip(problems, tr.tokens, full, answers):
        xy = pca.transform(f)
        trajectories.append(
            {
                "problem": p.text,
                "expected": p.answer,
                "emitted": got,
                "correct": got == p.answer,
                "labels": [common.token_label(t) for t in toks],
                "h0_2d": xy[0].tolist(),
                "states_2d": xy[1:].tolist(),
                "states": f[1:].tolist(),
                "h0": f[0].tolist(),
            }
        )
    summary = {
        "problems": [p.text for p in problems],
        "program_spread": float(program_spread),
        "cloud_problems": len(cloud_problems),
        "cloud_states": len(cloud_x),
        "cloud_accuracy": common.accuracy(cloud_problems, cloud),
        "pca_explained_variance": pca.explained_variance_ratio_.tolist(),
        "threshold": threshold,
        "spread_by_step": spread.tolist(),
        "trajectory_lengths": [len(t["labels"]) for t in trajectories],
        "all_correct": all(t["correct"] for t in trajectories),
        "trajectories": [
            {k: t[k] for k in ("problem", "expected", "emitted", "correct", "labels")}
            for t in trajectories
        ],
        "pairs": pairs,
    }
    common.write_json(
        out / f"{NAME}.json",
        {
            "summary": common.rounded(summary),
            "trajectories": common.rounded(trajectories, 5),
        },
    )
    cloud_xy = pca.transform(cloud_x)
    with open(out / "hidden_cloud.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "step", "token"])
        for (x, y), s, t in zip(cloud_xy, cloud_step, cloud_tok):
            w.writerow([f"{x:.4f}", f"{y:.4f}", int(s), common.token_label(int(t))])
    _plot(out / f"{NAME}.png", cloud_xy, cloud_step, trajectories, summary)
    return summary


def _plot(path: Path, cloud_xy, cloud_step, trajectories: list[dict], s: dict) -> None:
    fig, ax = plt.subplots(figsize=(10, 8.5))
    sc = ax.scatter(
        cloud_xy[:, 0], cloud_xy[:, 1], c=cloud_step, cmap="viridis", s=6, alpha=0.45, lw=0
    )
    cb = fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02, label="step (background cloud)")
    cb.solids.set_alpha(1)
    colours = ["crimson", "black", "darkorange", "magenta"]
    offsets = [(6, 6), (6, -12), (-14, 6), (-14, -12)]
    for i, t in enumerate(trajectories):
        colour = colours[i % len(colours)]
        pts = np.array([t["h0_2d"], *t["states_2d"]])
        ax.plot(pts[:, 0], pts[:, 1], "-", color=colour, lw=1.5, alpha=0.8)
        ax.plot(
            pts[1:, 0],
            pts[1:, 1],
            "o",
            color=colour,
            ms=6,
            label=f"{t['problem']} → {t['emitted'] or '∅'}" + ("" if t["correct"] else " (wrong)"),
        )
        ax.plot(*pts[0], "*", color=colour, ms=14, mec="k")
        dx, dy = offsets[i % len(offsets)]
        ax.annotate(
            "h0",
            pts[0],
            xytext=(-30, -4 - 14 * (i % len(offsets))),
            textcoords="offset points",
            color=colour,
            fontsize=9,
        )
        for (x, y), label in zip(pts[1:], t["labels"]):
            ax.annotate(
                label,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                color=colour,
                fontsize=11,
                fontweight="bold",
            )
    ev = s["pca_explained_variance"]
    title = (
        f"Executor hidden states: {s['cloud_states']} states of {s['cloud_problems']} random "
        f"problems (PCA, {100 * sum(ev):.0f}% of variance)"
    )
    for p in s["pairs"]:
        step = p["divergence_step"]
        reach = (
            f"relative distance ≥ {s['threshold']} from step {step}"
            if step is not None
            else f"relative distance never reaches {s['threshold']}"
        )
        title += (
            f"\n{p['problems'][0]} vs {p['problems'][1]}: {reach}; "
            f"max {p['max_relative_distance']:.2f} at step {p['step_of_max_relative_distance']}"
        )
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=9, loc="best")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)

"""The Markdown report of ``trex-analyze`` (written as README.md in the output
folder, next to the figures); run ``trex-analyze --checkpoint models/trex.pt`` to
make it. It states in numbers what each figure shows.
"""

from __future__ import annotations

import math
from pathlib import Path


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _pct(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def write(path: Path, meta: dict, s: dict) -> None:
    d, v, t, h = s["distances"], s["variance"], s["tsne"], s["trajectories"]
    lines = [
        "# T-REX: what the compiler writes and how the executor runs it",
        "",
        f"Checkpoint `{meta['checkpoint']}`"
        + (f", training step {meta['step']}" if meta.get("step") is not None else "")
        + (
            f", held-out accuracy {_pct(meta['held_out_accuracy'])} when saved"
            if meta.get("held_out_accuracy") is not None
            else ""
        )
        + ".",
        (
            f"Made by `{meta['command']}` in {meta['seconds']:.0f} s "
            f"({meta['threads']} torch threads). All numbers are also in `summary.json`."
        ),
        "",
        (
            "A *program* is the flat vector of executor weights that the compiler writes for one "
            f"problem ({meta['program_size']} numbers: GRU weights and biases, output layer, h0)."
        ),
        "",
    ]

    # 1
    same, diff = d["mean_distance_same_pattern"], d["mean_distance_different_pattern"]
    ratio = d["ratio_different_over_same"]
    lines += [
        f"## 1. Programs of all a+b={d['sum']}, grouped by carry pattern",
        "",
        "![pairwise program distances](program_distances.png)",
        "",
        f"- {d['problems']} problems (a, b ≥ 0, no leading zeros) in {len(d['patterns'])} carry "
        "patterns: " + "; ".join(f"{p} ({n})" for p, n in d["patterns"].items()) + ".",
        (
            f"- Mean distance between programs whose carry patterns differ: {_f(diff)}; "
            f"whose patterns match: {_f(same)}; ratio **{_f(ratio)}** "
            f"(permutation p = {_f(d['ratio_permutation_p_value'])}, "
            f"{d['permutations']} relabellings)."
        ),
        (
            f"- The nearest other program has the same carry pattern for {_pct(d['nn_same_pattern'])} "
            f"of the problems (chance {_pct(d['nn_same_pattern_chance'])})."
        ),
        (
            f"- a+b and b+a (same pattern): mean distance {_f(d['mean_distance_swapped_operands'])}, "
            f"against {_f(same)} for any two programs of one pattern."
        ),
        (
            f"- Spearman correlation of distance with |Δa|: {_f(d['spearman_distance_vs_abs_delta_a'])}; "
            "with the number of places whose carry differs: "
            f"{_f(d['spearman_distance_vs_carry_places_differing'])}."
        ),
        (
            f"- Answers correct: {_pct(d['accuracy'])}. Data: `program_distances.csv` (matrix), "
            "`program_distances.json`."
        ),
        "",
    ]
    if not math.isnan(ratio):
        lines += [
            (
                "Programs with the same carry pattern are closer to each other than programs with "
                "different patterns."
                if ratio > 1
                else "Carry patterns do not make programs closer: equal-pattern pairs are no nearer "
                "than the others."
            ),
            "",
        ]

    # 2
    lines += [
        "## 2. Variance within equal-sum sets, against the sum",
        "",
        "![variance of equal-sum programs](sum_variance.png)",
        "",
        (
            f"- {v['sums']} sums from {v['sum_range'][0]} to {v['sum_range'][1]} (log-spaced; at most "
            f"{v['per_sum_cap']} problems a+b=S each). Total variance of the programs (mean squared "
            f"distance to their centroid): min {_f(v['variance_min'])}, median "
            f"{_f(v['variance_median'])}, max {_f(v['variance_max'])}; Spearman with S: "
            f"{_f(v['spearman_variance_vs_sum'])}; with the entropy of the carry patterns in the "
            f"set: {_f(v['spearman_variance_vs_carry_pattern_entropy'])}."
        ),
        (
            "- Control: the same first and second operands with the second ones shuffled (so the "
            "sums differ). Equal-sum variance over control variance: median "
            f"**{_f(v['ratio_median'])}** (range {_f(v['ratio_min'])}–{_f(v['ratio_max'])}; "
            f"below 1 for {v['sums_with_ratio_below_1']} of {v['sums']} sums)."
        ),
        "- Share of the equal-sum variance by program part: "
        + ", ".join(f"{k} {_pct(x)}" for k, x in v["mean_share_of_variance_by_part"].items())
        + ".",
        f"- Answers correct: {_pct(v['accuracy'])}. Data: `sum_variance.csv`.",
        "",
    ]

    # 3
    lines += [
        "## 3. t-SNE map of programs of random problems",
        "",
        "![t-SNE of programs](program_tsne.png)",
        "",
        (
            f"{t['problems']} random problems; PCA to {t['pca_dims']} dimensions "
            f"({_pct(t['pca_explained_variance'])} of the variance), then t-SNE (perplexity "
            f"{_f(t['perplexity'])}). kNN purity: share of each program's {t['k']} nearest "
            "neighbours with the same value."
        ),
        "",
        "| attribute | purity in map | purity in program space (PCA) | chance | map / chance |",
        "| --- | --- | --- | --- | --- |",
    ]
    names = {
        "carries": "number of carries",
        "balance": "balance \\|len(a)-len(b)\\|",
        "longer_operand": "longer operand length",
        "log10_sum": "sum (its number of digits)",
    }
    for key, p in t["knn_purity"].items():
        lines.append(
            f"| {names.get(key, key)} | {_f(p['map'])} | {_f(p['program_space'])} | "
            f"{_f(p['chance'])} | {_f(p['map_over_chance'])} |"
        )
    best = max(t["knn_purity"], key=lambda k: t["knn_purity"][k]["map_over_chance"])
    lines += [
        "",
        (
            f"Highest purity over chance in the map: {names.get(best, best)}, "
            f"{_f(t['knn_purity'][best]['map_over_chance'])}×. Answers correct: "
            f"{_pct(t['accuracy'])}. Data: `program_tsne.csv`."
        ),
        "",
    ]

    # 4
    lines += [
        "## 4. Executor hidden-state trajectories",
        "",
        "![hidden-state trajectories](hidden_trajectories.png)",
        "",
        (
            f"Background: {h['cloud_states']} hidden states of {h['cloud_problems']} random problems, "
            "PCA fitted on them (PC1 "
            f"{_pct(h['pca_explained_variance'][0])}, PC2 {_pct(h['pca_explained_variance'][1])} "
            "of the variance). Trajectories:"
        ),
        "",
    ]
    for tr in h["trajectories"]:
        lines.append(
            f"- `{tr['problem']}` emits {' '.join(tr['labels'])} "
            f"({len(tr['labels'])} steps; {'correct' if tr['correct'] else 'wrong'})."
        )
    for p in h["pairs"]:
        rel = p["relative_distance_by_step"]
        step = p["divergence_step"]
        lines += [
            "",
            (
                f"Euclidean distance between the hidden states of `{p['problems'][0]}` and "
                f"`{p['problems'][1]}` at each step (0 = h0), and relative: over the RMS distance "
                "between two random cloud states at that step:"
            ),
            "",
            "| step | " + " | ".join(str(i) for i in range(len(rel))) + " |",
            "| --- |" + " --- |" * len(rel),
            "| distance | " + " | ".join(_f(x, 2) for x in p["distance_by_step"]) + " |",
            "| relative distance | " + " | ".join(_f(x, 2) for x in rel) + " |",
            "",
            (
                f"Divergence step (first step with relative distance ≥ {h['threshold']}): **{step}**"
                if step is not None
                else f"The trajectories never reach relative distance {h['threshold']}"
            )
            + f"; largest {_f(p['max_relative_distance'])} at step "
            f"{p['step_of_max_relative_distance']}. "
            + (
                f"Their programs are {_f(p['program_distance'])} apart, "
                f"{_f(p['program_distance_relative'])} of the RMS distance between the programs of "
                "two random problems. "
            )
            + (
                "The two runs emit the same tokens at every step."
                if p["first_step_with_different_tokens"] is None
                else f"The emitted tokens first differ at step {p['first_step_with_different_tokens']}."
            ),
        ]
    lines += ["", "Data: `hidden_trajectories.json`, `hidden_cloud.csv`.", ""]
    path.write_text("\n".join(lines))

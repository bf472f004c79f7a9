"""Figure 3: a t-SNE map of the programs of random problems, coloured four ways.

    trex-analyze --checkpoint models/trex.pt --tsne-n 2000

Random problems from the training generator (no leading zeros) are compiled;
their programs are reduced to 50 dimensions with PCA and mapped to 2D with
t-SNE. Panels colour the same map by number of carries, operand balance
|len(a) - len(b)|, the longer operand's length, and log10 of the sum. For each
attribute the kNN purity says how often a point's k nearest neighbours share its
value (the sum as its number of digits), in the map and in the 50-dimensional
program space, against the chance level. Written: program_tsne.png and
program_tsne.csv (one row per problem, with its map coordinates).
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.neighbors import NearestNeighbors

from analysis import common
from training.model import TRex

NAME = "program_tsne"

# attribute key -> (panel title, discrete value used for purity)
ATTRIBUTES = {
    "carries": "number of carries",
    "balance": "balance |len(a) - len(b)|",
    "longer_operand": "longer operand length",
    "log10_sum": "log10(sum)  (purity: digits of the sum)",
}


def knn_purity(points: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """Mean share of each point's k nearest other points with its label, and the
    share expected if neighbours were drawn at random."""
    n = len(labels)
    k = min(k, n - 1)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points, return_distance=False)
    # the first neighbour is the point itself unless duplicates tie with it: drop self
    neigh = np.array([[j for j in row if j != i][:k] for i, row in enumerate(idx)])
    purity = float((labels[neigh] == labels[:, None]).mean())
    counts = np.unique(labels, return_counts=True)[1]
    chance = float((counts * (counts - 1)).sum() / (n * (n - 1)))
    return purity, chance


def tsne(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        x
    )


def run(
    model: TRex, out: Path, n: int, perplexity: float, k: int, batch_size: int, seed: int
) -> dict:
    problems = common.random_problems(random.Random(seed), n, model.cfg.max_digits)
    tr = common.trace(model, problems, batch_size, desc="random problems")
    ints = [(int(p.a), int(p.b)) for p in problems]
    attrs = {
        "carries": np.array([len(common.carry_places(a, b)) for a, b in ints]),
        "balance": np.array([abs(la - lb) for la, lb in (p.lengths for p in problems)]),
        "longer_operand": np.array([max(p.lengths) for p in problems]),
        "log10_sum": np.array([math.log10(a + b) if a + b else 0.0 for a, b in ints]),
    }
    discrete = dict(attrs, log10_sum=np.array([len(p.answer) for p in problems]))

    x = tr.programs.astype(np.float64)
    dims = min(50, len(problems) - 1, x.shape[1])
    pca = PCA(n_components=dims, random_state=seed).fit(x)
    reduced = pca.transform(x)
    perplexity = min(perplexity, (len(problems) - 1) / 3)
    xy = tsne(reduced, perplexity, seed)

    purity = {}
    for key in attrs:
        in_map, chance = knn_purity(xy, discrete[key], k)
        in_space, _ = knn_purity(reduced, discrete[key], k)
        purity[key] = {
            "map": in_map,
            "program_space": in_space,
            "chance": chance,
            "map_over_chance": in_map / chance if chance else float("nan"),
        }

    answers = tr.answers()
    with open(out / f"{NAME}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["problem", "expected", "emitted", *attrs, "x", "y"])
        for i, p in enumerate(problems):
            w.writerow(
                [
                    p.text,
                    p.answer,
                    answers[i],
                    *(attrs[a][i] for a in attrs),
                    f"{xy[i, 0]:.4f}",
                    f"{xy[i, 1]:.4f}",
                ]
            )

    summary = {
        "problems": len(problems),
        "pca_dims": dims,
        "pca_explained_variance": float(pca.explained_variance_ratio_.sum()),
        "perplexity": perplexity,
        "k": min(k, len(problems) - 1),
        "knn_purity": purity,
        "accuracy": common.accuracy(problems, tr),
    }
    _plot(out / f"{NAME}.png", xy, attrs, purity)
    return summary


def _plot(path: Path, xy: np.ndarray, attrs: dict, purity: dict) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 10.5))
    for ax, key in zip(axes.flat, attrs):
        v = attrs[key]
        is_int = key != "log10_sum"
        cmap = plt.get_cmap("viridis" if is_int else "plasma")
        if is_int:
            vals = np.unique(v)
            bounds = np.append(vals - 0.5, vals[-1] + 0.5)
            norm = plt.matplotlib.colors.BoundaryNorm(bounds, cmap.N)
        else:
            norm = None
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, cmap=cmap, norm=norm, s=5, lw=0)
        cb = fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
        if is_int and len(vals) <= 12:
            cb.set_ticks(vals)
        p = purity[key]
        ax.set_title(
            f"{ATTRIBUTES[key]}\nkNN purity {p['map']:.2f} in map, "
            f"{p['program_space']:.2f} in program space (chance {p['chance']:.2f})",
            fontsize=9,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("t-SNE of generated programs of random problems", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

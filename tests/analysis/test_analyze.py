"""trex-analyze at a tiny size: a small random model (and the shipped one, when
models/trex.pt exists) through the whole command, then the written numbers are
checked against each other and against the model itself.

    python -m pytest tests/analysis -q
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import cli, common
from training import checkpoint, data, train, vocab
from training.model import ModelConfig, ProgramLayout, TRex

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "trex.pt"
FIGURES = ["program_distances", "sum_variance", "program_tsne", "hidden_trajectories"]
TINY = [
    "--quick",
    "--n-sums",
    "3",
    "--per-sum",
    "16",
    "--tsne-n",
    "60",
    "--cloud-n",
    "20",
    "--threads",
    "1",
]
TOTAL = 123


def tiny_model(path: Path) -> Path:
    """A small randomly initialised model: its programs never emit <end>."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, n_slots=12, hidden=24, embed=8)
    checkpoint.save(path, TRex(cfg).eval(), step=0)
    return path


def briefly_trained_model(path: Path) -> Path:
    """The same small model after 120 training steps (a few seconds): wrong answers,
    but runs that end with <end> after a varying number of digits."""
    train.main(
        [
            "--out",
            str(path),
            "--steps",
            "120",
            "--eval-every",
            "120",
            "--seed",
            "1",
            "--d-model",
            "32",
            "--n-layers",
            "2",
            "--d-ff",
            "64",
            "--hidden",
            "24",
            "--embed",
            "8",
            "--batch-size",
            "64",
            "--eval-problems",
            "50",
            "--threads",
            "1",
            "--warmup",
            "10",
        ]
    )
    return path


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    return briefly_trained_model(tmp_path_factory.mktemp("trained") / "trained.pt")


@pytest.fixture(
    scope="module",
    params=[
        "random",
        "trained",
        pytest.param(
            "shipped",
            marks=pytest.mark.skipif(not SHIPPED.exists(), reason="models/trex.pt not present"),
        ),
    ],
)
def run(request, tmp_path_factory, trained_ckpt):
    """(checkpoint path, output folder) after one tiny analysis run."""
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt = {
        "random": lambda: tiny_model(tmp / "tiny.pt"),
        "trained": lambda: trained_ckpt,
        "shipped": lambda: SHIPPED,
    }[request.param]()
    out = tmp / "analysis"
    assert cli.main(["--checkpoint", str(ckpt), "--out", str(out), "--sum", str(TOTAL), *TINY]) == 0
    return ckpt, out


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def digit_sum(n: int) -> int:
    return sum(map(int, str(n)))


def test_every_figure_and_its_numbers_are_written(run):
    _, out = run
    for name in FIGURES:
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    for name in [
        "program_distances.csv",
        "program_distances.json",
        "sum_variance.csv",
        "program_tsne.csv",
        "hidden_trajectories.json",
        "hidden_cloud.csv",
        "summary.json",
        "README.md",
    ]:
        assert (out / name).stat().st_size > 0, name
    report = (out / "README.md").read_text()
    for i, name in enumerate(FIGURES, 1):
        assert f"({name}.png)" in report, name
        assert f"## {i}." in report
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"meta", "distances", "variance", "tsne", "trajectories"}
    assert summary["meta"]["seconds"] > 0


def test_distance_matrix_is_symmetric_zero_on_diagonal_and_matches_the_programs(run):
    ckpt, out = run
    rows = read_csv(out / "program_distances.csv")
    texts = rows[0][1:]
    assert [r[0] for r in rows[1:]] == texts
    d = np.array([[float(x) for x in r[1:]] for r in rows[1:]])
    n = TOTAL + 1
    assert d.shape == (n, n)
    assert np.array_equal(d, d.T)
    assert np.all(np.diag(d) == 0) and np.all(d[~np.eye(n, dtype=bool)] > 0)
    # every a+b=123 without leading zeros, each once
    assert sorted(texts) == sorted(f"{a}+{TOTAL - a}=" for a in range(n))

    # grouped by carry pattern: each pattern is one contiguous block
    info = json.loads((out / "program_distances.json").read_text())
    patterns = [p["carry_pattern"] for p in info["problems"]]
    runs = [p for i, p in enumerate(patterns) if i == 0 or p != patterns[i - 1]]
    assert len(runs) == len(set(patterns)) == len(info["summary"]["patterns"])
    by_text = dict(zip(texts, patterns))
    assert by_text["0+123="] == "none"
    assert by_text["9+114="] == "ones→tens"
    assert by_text["60+63="] == "tens→hundreds"
    assert by_text["99+24="] == "ones→tens, tens→hundreds"

    swapped = [
        d[texts.index(f"{a}+{TOTAL - a}="), texts.index(f"{TOTAL - a}+{a}=")]
        for a in range(n)
        if a < TOTAL - a
    ]
    assert info["summary"]["mean_distance_swapped_operands"] == pytest.approx(
        np.mean(swapped), rel=1e-3
    )

    # an entry is the distance between the two programs the model writes
    model, _ = checkpoint.load(ckpt)
    i, j = texts.index("17+106="), texts.index("58+65=")
    with torch.no_grad():
        prog = model.compiler(data.encode_problems([texts[i], texts[j]])).double()
    assert d[i, j] == pytest.approx(float(torch.dist(prog[0], prog[1])), rel=1e-4)


def test_trajectories_are_as_long_as_the_answers(run):
    ckpt, out = run
    model, _ = checkpoint.load(ckpt)
    info = json.loads((out / "hidden_trajectories.json").read_text())
    trajectories = info["trajectories"]
    assert [t["problem"] for t in trajectories] == ["17000+801=", "16000+1801="]
    for t in trajectories:
        steps = len(t["labels"])
        assert len(t["states_2d"]) == len(t["states"]) == steps
        assert all(len(s) == model.cfg.hidden for s in t["states"])
        if t["labels"][-1] == "end":  # the emitted digits, then <end>
            assert steps == len(t["emitted"]) + 1
            assert "".join(t["labels"][:-1]) == t["emitted"]
        else:  # never ended: every step the executor may take
            assert steps == model.cfg.max_steps
        if ckpt == SHIPPED:
            assert t["emitted"] == t["expected"] and steps == len(t["expected"]) + 1
    if ckpt.name == "trained.pt":  # this model's runs do end: the first branch above ran
        assert all(t["labels"][-1] == "end" for t in trajectories)
    # distances are measured from h0 (step 0) to the last common step
    pair = info["summary"]["pairs"][0]
    assert len(pair["relative_distance_by_step"]) == 1 + min(len(t["labels"]) for t in trajectories)
    first, second = (np.array(t["states"]) for t in trajectories)
    n = min(len(first), len(second))
    assert pair["distance_by_step"][1:] == pytest.approx(
        np.linalg.norm(first[:n] - second[:n], axis=1).tolist(), rel=1e-3, abs=1e-4
    )
    with torch.no_grad():
        prog = model.compiler(data.encode_problems(pair["problems"])).double()
    assert pair["program_distance"] == pytest.approx(float(torch.dist(prog[0], prog[1])), rel=1e-3)


def test_variance_rows_add_up(run):
    ckpt, out = run
    model, _ = checkpoint.load(ckpt)
    with open(out / "sum_variance.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert 1 <= len(rows) <= 3
    parts = ProgramLayout(model.cfg).offsets
    for r in rows:
        total, n = float(r["variance"]), int(r["problems"])
        assert n == min(int(r["sum"]) + 1, 16)
        assert total > 0 and float(r["shuffled_variance"]) > 0
        # the total variance is the sum of the variances of the program's parts
        assert sum(float(r[f"variance_{p}"]) for p in parts) == pytest.approx(total, rel=1e-6)
        assert float(r["ratio"]) == pytest.approx(total / float(r["shuffled_variance"]), rel=1e-9)


def test_tsne_rows_describe_their_problems(run):
    _, out = run
    with open(out / "program_tsne.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len({r["problem"] for r in rows}) == 60
    for r in rows:
        p = data.parse(r["problem"])
        a, b = int(p.a), int(p.b)
        assert p.a == str(a) and p.b == str(b)  # no leading zeros
        # each carry takes 9 off the digit sum of a + b
        assert int(r["carries"]) * 9 == digit_sum(a) + digit_sum(b) - digit_sum(a + b)
        assert int(r["balance"]) == abs(len(p.a) - len(p.b))
        assert np.isfinite(float(r["x"])) and np.isfinite(float(r["y"]))
    purity = json.loads((out / "summary.json").read_text())["tsne"]["knn_purity"]
    for p in purity.values():
        assert 0 <= p["map"] <= 1 and 0 < p["chance"] <= 1


def test_trace_matches_generate(trained_ckpt):
    model, _ = checkpoint.load(trained_ckpt)
    problems = [common.parse_problem(t) for t in ["17000+801", "1+2", "9999999999+1", "0+0"]]
    tr = common.trace(model, problems, batch_size=3)
    assert len({len(t) for t in tr.tokens}) > 1  # runs of different lengths, cut at <end>
    tokens, _, states = model.generate(data.encode_problems([p.text for p in problems]))
    for i, toks in enumerate(tokens.tolist()):
        n = toks.index(vocab.END_ID) + 1 if vocab.END_ID in toks else len(toks)
        assert tr.tokens[i] == toks[:n]
        assert np.allclose(tr.states[i], states[i, :n].numpy(), atol=1e-6)
    assert np.allclose(tr.h0, model.executor.initial_state(torch.from_numpy(tr.programs)).numpy())


def test_carry_places_agree_with_digit_sums():
    rng = random.Random(0)
    for _ in range(2000):
        a, b = rng.randrange(10 ** rng.randint(1, 10)), rng.randrange(10 ** rng.randint(1, 10))
        assert 9 * len(common.carry_places(a, b)) == digit_sum(a) + digit_sum(b) - digit_sum(a + b)
    assert common.carry_places(999, 1) == (0, 1, 2)
    assert common.carry_pattern(999, 1) == "ones→tens, tens→hundreds, hundreds→thousands"
    assert common.carry_pattern(123, 0) == "none"


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(out)]) == 2
    ckpt = tiny_model(tmp_path / "tiny.pt")
    too_long = ["--sum-range", "10", "1" + "0" * 11]  # longer than any operand the model reads
    assert cli.main(["--checkpoint", str(ckpt), "--out", str(out), *too_long]) == 2
    for bad in (["--trajectories", "12+x"], ["--sum", "-1"], ["--sum", "5000"]):
        with pytest.raises(SystemExit):
            cli.main(["--checkpoint", str(ckpt), "--out", str(out), *bad])
    assert not out.exists()

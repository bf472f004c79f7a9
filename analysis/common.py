"""Helpers shared by the figure modules of ``trex-analyze`` (run it as
``trex-analyze --checkpoint models/trex.pt``): problem sets, carry patterns,
compiled programs and greedy executor traces with their hidden states.

Everything model-related goes through the model's own API: ``model.compiler``
writes the programs, ``model.executor.initial_state`` and ``model.executor.step``
run them, exactly as ``TRex.generate`` does.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training import data, vocab
from training.model import TRex

PLACE_NAMES = (
    "ones",
    "tens",
    "hundreds",
    "thousands",
    "ten-thousands",
    "hundred-thousands",
    "millions",
    "ten-millions",
    "hundred-millions",
    "billions",
    "ten-billions",
)


def place_name(i: int) -> str:
    return PLACE_NAMES[i] if i < len(PLACE_NAMES) else f"10^{i}"


def carry_places(a: int, b: int) -> tuple[int, ...]:
    """Places (0 = ones) whose column sum carries into the next place, for a + b."""
    out, carry, i = [], 0, 0
    while a or b:
        carry = int(a % 10 + b % 10 + carry >= 10)
        if carry:
            out.append(i)
        a, b, i = a // 10, b // 10, i + 1
    return tuple(out)


def carry_pattern(a: int, b: int) -> str:
    """Where a + b carries, e.g. ``"ones→tens, tens→hundreds"``; ``"none"`` if nowhere."""
    places = carry_places(a, b)
    if not places:
        return "none"
    return ", ".join(f"{place_name(i)}→{place_name(i + 1)}" for i in places)


def equal_sum_problems(total: int, values: list[int] | None = None) -> list[data.Problem]:
    """Every a + b = ``total`` with a, b >= 0 written without leading zeros
    (or only those whose a is in ``values``), in increasing a."""
    a_values = range(total + 1) if values is None else sorted(values)
    return [data.Problem(str(a), str(total - a)) for a in a_values]


def random_problems(rng: random.Random, n: int, max_digits: int) -> list[data.Problem]:
    """``n`` distinct problems from the training generator (operand lengths uniform,
    a quarter carry-heavy), without leading zeros."""
    seen: dict[str, data.Problem] = {}
    while len(seen) < n:
        p = data.sample_problem(rng, max_digits=max_digits, p_leading_zeros=0.0)
        seen.setdefault(p.text, p)
    return list(seen.values())


def parse_problem(text: str) -> data.Problem:
    """``"17000+801"`` or ``"17000+801="`` -> Problem."""
    text = text.strip()
    if not text.endswith("="):
        text += "="
    p = data.parse(text)
    if not (p.a.isdigit() and p.b.isdigit()):
        raise ValueError(f"not an addition problem: {text!r}")
    return p


def token_label(token: int) -> str:
    return "end" if token == vocab.END_ID else vocab.TOKENS[token]


@dataclass
class Trace:
    """Greedy runs of a list of problems.

    programs  (N, P) flat programs, float32
    h0        (N, H) initial hidden states (part of each program)
    tokens    per problem, the emitted ids up to and including the first <end>
              (or all ``max_steps`` when it never ends)
    states    per problem, (len(tokens), H): the hidden state after each step,
              the one the emitted token was read from
    """

    programs: np.ndarray
    h0: np.ndarray
    tokens: list[list[int]]
    states: list[np.ndarray]

    def answers(self) -> list[str]:
        return [vocab.decode(t) for t in self.tokens]


@torch.no_grad()
def trace(
    model: TRex, problems: list[data.Problem], batch_size: int = 500, desc: str = "programs"
) -> Trace:
    """Compile every problem once and run its program greedily, keeping the
    program, h0, the emitted tokens and every step's hidden state."""
    programs, h0s, tokens, states = [], [], [], []
    texts = [p.text for p in problems]
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False, unit="batch"):
        ids = data.encode_problems(texts[i : i + batch_size])
        prog = model.compiler(ids)
        h = model.executor.initial_state(prog)
        programs.append(prog.numpy().astype(np.float32))
        h0s.append(h.numpy().copy())
        tok = torch.full((ids.shape[0],), vocab.START_ID, dtype=torch.long)
        done = torch.zeros_like(tok, dtype=torch.bool)
        step_tokens, step_states = [], []
        for _ in range(model.cfg.max_steps):
            logits, h = model.executor.step(prog, h, tok)
            tok = logits.argmax(-1)
            step_tokens.append(tok)
            step_states.append(h)
            done |= tok == vocab.END_ID
            if bool(done.all()):
                break
        tok_mat = torch.stack(step_tokens, 1).tolist()
        st = torch.stack(step_states, 1).numpy()
        for toks, s in zip(tok_mat, st):
            n = toks.index(vocab.END_ID) + 1 if vocab.END_ID in toks else len(toks)
            tokens.append(toks[:n])
            states.append(s[:n].copy())
    return Trace(np.concatenate(programs), np.concatenate(h0s), tokens, states)


def accuracy(problems: list[data.Problem], tr: Trace) -> float:
    got = tr.answers()
    return sum(g == p.answer for p, g in zip(problems, got)) / max(len(problems), 1)


def total_variance(x: np.ndarray) -> float:
    """Mean squared distance to the centroid (the trace of the covariance)."""
    x = x.astype(np.float64)
    return float(((x - x.mean(0)) ** 2).sum(1).mean())


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); nan if either is constant."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=True) + "\n")


def rounded(x, digits: int = 4):
    """Floats rounded for JSON and Markdown, recursively; nan stays nan."""
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, digits) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(f"{float(x):.{digits}g}")
    if isinstance(x, np.integer):
        return int(x)
    return x

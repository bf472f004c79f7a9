"""Addition problems, generated on the fly with exact integer arithmetic.

A problem is the text ``a+b=`` with operands of 1 to ``max_digits`` digits;
leading zeros are allowed as long as the operand stays within ``max_digits``
characters. The answer is the canonical decimal sum, without leading zeros.

Held-out problems are chosen by a hash of the problem text, so training can
reject them without keeping a list, and the test set is a fixed, seeded sample
of them plus a few hand-picked edge cases (also rejected by training).
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from training import vocab

HELD_OUT_MODULUS = 100  # one problem in a hundred is reserved for testing

EDGE_CASES = (
    "0+0=",
    "0+9999999999=",
    "9999999999+0=",
    "9999999999+1=",
    "1+9999999999=",
    "9999999999+9999999999=",
    "5000000000+5000000000=",
    "0000000000+0000000001=",
    "0000000009+0000000001=",
    "99999+1=",
    "1+99999=",
    "999999999+1=",
    "4999999999+5000000001=",
    "1234567890+8765432110=",
    "7669+10132=",
)
_EDGE_SET = frozenset(EDGE_CASES)


@dataclass(frozen=True)
class Problem:
    a: str
    b: str

    @property
    def text(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(int(self.a) + int(self.b))

    @property
    def lengths(self) -> tuple[int, int]:
        """Operand lengths in significant digits (a zero operand has length 1)."""
        return len(self.a.lstrip("0") or "0"), len(self.b.lstrip("0") or "0")


def parse(text: str) -> Problem:
    a, b = text.rstrip("=").split("+")
    return Problem(a, b)


def is_held_out(text: str) -> bool:
    """True for problems reserved for evaluation; training never yields them."""
    if text in _EDGE_SET:
        return True
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_MODULUS == 0


def _pair_digits(rng: random.Random, la: int, lb: int, p_chain: float):
    """Digits of a and b, least significant first.

    With probability ``p_chain`` per place the place is made to propagate a
    carry (digit sum 9, or a 9 above the shorter operand). Uniform operands
    almost never hold long carry chains, so training would not learn them.
    """
    a = [rng.randrange(10) for _ in range(la)]
    b = [rng.randrange(10) for _ in range(lb)]
    for i in range(max(la, lb)):
        if rng.random() >= p_chain:
            continue
        if i < la and i < lb:
            b[i] = 9 - a[i]
        elif i < la:
            a[i] = 9
        else:
            b[i] = 9
    # the leading digit of a multi-digit operand is never zero
    if la > 1 and a[-1] == 0:
        a[-1] = rng.randrange(1, 10)
    if lb > 1 and b[-1] == 0:
        b[-1] = rng.randrange(1, 10)
    return a, b


def _with_zeros(rng: random.Random, digits: list[int], max_digits: int) -> str:
    s = "".join(str(d) for d in reversed(digits))
    return s.zfill(rng.randint(len(s), max_digits))


def sample_problem(
    rng: random.Random,
    max_digits: int = 10,
    p_leading_zeros: float = 0.05,
    p_carry_heavy: float = 0.25,
    p_all_carry: float = 0.0,
) -> Problem:
    """One problem; each operand's length is uniform over 1..max_digits, so short
    and long problems are equally common.

    With probability ``p_all_carry`` every digit is drawn from 5 to 9, so every
    place where both operands have a digit makes a carry (``9999+9999=``); the
    chains that ``p_carry_heavy`` builds propagate a carry instead. At 0 the
    stream of problems is exactly that of a generator without the option.
    """
    la, lb = rng.randint(1, max_digits), rng.randint(1, max_digits)
    if p_all_carry and rng.random() < p_all_carry:
        a = [rng.randrange(5, 10) for _ in range(la)]
        b = [rng.randrange(5, 10) for _ in range(lb)]
    else:
        p_chain = rng.choice((0.5, 0.8, 0.95)) if rng.random() < p_carry_heavy else 0.0
        a, b = _pair_digits(rng, la, lb, p_chain)
    za = rng.random() < p_leading_zeros
    zb = rng.random() < p_leading_zeros
    return Problem(
        _with_zeros(rng, a, max_digits) if za else "".join(map(str, reversed(a))),
        _with_zeros(rng, b, max_digits) if zb else "".join(map(str, reversed(b))),
    )


def training_problems(
    rng: random.Random, n: int, max_digits: int = 10, p_all_carry: float = 0.0
) -> list[Problem]:
    """``n`` fresh training problems, none of them held out."""
    out = []
    while len(out) < n:
        p = sample_problem(rng, max_digits, p_all_carry=p_all_carry)
        if not is_held_out(p.text):
            out.append(p)
    return out


def held_out_set(n: int = 20_000, seed: int = 1234, max_digits: int = 10) -> list[Problem]:
    """The fixed test set: the edge cases, then unique held-out problems spread
    evenly over every pair of operand lengths.

    Pairs of short operands have few held-out problems (two one-digit operands
    have one in a hundred of 100), so those cells hold what exists and the
    others make up the count.

    Drawing it means rejecting 99 of every 100 candidates (a minute for the
    full set), so the result is cached on disk under ``$TREX_CACHE`` (default
    ~/.cache/trex), keyed by the arguments and by this file's contents.
    """
    key = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    cache_dir = Path(os.environ.get("TREX_CACHE", Path.home() / ".cache" / "trex"))
    cached = cache_dir / f"held-out-{n}-{seed}-{max_digits}-{key}.txt"
    if cached.exists():
        return [parse(t) for t in cached.read_text().split()]
    problems = _draw_held_out(n, seed, max_digits)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("\n".join(p.text for p in problems) + "\n")
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home only costs the next caller the same minute
    return problems


def _draw_held_out(n: int, seed: int, max_digits: int) -> list[Problem]:
    seen = set(EDGE_CASES)
    out = [parse(t) for t in EDGE_CASES]
    cells = [(la, lb) for la in range(1, max_digits + 1) for lb in range(1, max_digits + 1)]
    per_cell = -(-(n - len(out)) // len(cells))
    cell_rng = {cell: random.Random(f"{seed}:{cell}") for cell in cells}
    budget = {cell: 200 * per_cell + 2000 for cell in cells}
    quota = {cell: per_cell for cell in cells}
    while len(out) < n and any(budget[c] > 0 and quota[c] > 0 for c in cells):
        for cell in cells:
            if budget[cell] <= 0 or quota[cell] <= 0 or len(out) >= n:
                continue
            r = cell_rng[cell]
            budget[cell] -= 1
            p_chain = r.choice((0.0, 0.0, 0.5, 0.9))
            a, b = _pair_digits(r, *cell, p_chain)
            p = Problem(
                _with_zeros(r, a, max_digits)
                if r.random() < 0.05
                else "".join(map(str, reversed(a))),
                _with_zeros(r, b, max_digits)
                if r.random() < 0.05
                else "".join(map(str, reversed(b))),
            )
            if p.text in seen or not is_held_out(p.text):
                continue
            seen.add(p.text)
            out.append(p)
            quota[cell] -= 1
            # a cell that ran dry leaves its share to the others
        if all(quota[c] <= 0 or budget[c] <= 0 for c in cells) and len(out) < n:
            for c in cells:
                if budget[c] > 0:
                    quota[c] += 1
    return out


def encode_problems(texts: list[str]) -> torch.Tensor:
    """(B, T) compiler input ids, right-padded with ``<pad>``."""
    width = max(len(t) for t in texts)
    ids = torch.full((len(texts), width), vocab.PAD_ID, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = torch.tensor(vocab.encode(t))
    return ids


def encode_answers(answers: list[str], max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing executor inputs and targets, both (B, max_steps).

    inputs:  <start> d1 ... dn  <pad>...
    targets: d1 ... dn <end>    <pad>...
    """
    inputs = torch.full((len(answers), max_steps), vocab.PAD_ID, dtype=torch.long)
    targets = torch.full((len(answers), max_steps), vocab.PAD_ID, dtype=torch.long)
    for i, ans in enumerate(answers):
        ids = vocab.encode(ans)
        inputs[i, 0] = vocab.START_ID
        inputs[i, 1 : len(ids) + 1] = torch.tensor(ids)
        targets[i, : len(ids)] = torch.tensor(ids)
        targets[i, len(ids)] = vocab.END_ID
    return inputs, targets

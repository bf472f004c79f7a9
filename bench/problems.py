"""The benchmark's problems: the held-out set of training.data, in one fixed shuffled order.

Both models are given the same list in the same order, so every load point of every model
starts on the same problems. The order is shuffled because held_out_set lists edge cases
first and then walks the operand-length cells in turn; a load generator that took them in
that order would send bursts of similar problems.

Groups: problems are grouped by the significant digits of their longer operand, the length
that sets the answer's length and so the number of tokens each model writes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

log = logging.getLogger(__name__)

# (label, smallest, largest) significant digits of the longer operand; 10 on its own, as the
# longest problems are where one compiler pass per answer saves most
GROUPS = (("1-3", 1, 3), ("4-6", 4, 6), ("7-9", 7, 9), ("10", 10, 10))
ALL = "all"


@dataclass(frozen=True)
class BenchProblem:
    text: str  # e.g. "7669+10132="
    answer: str  # the correct sum, without leading zeros
    digits: int  # significant digits of the longer operand

    @property
    def group(self) -> str:
        return group_of(self.digits)


def group_of(digits: int) -> str:
    for label, low, high in GROUPS:
        if low <= digits <= high:
            return label
    # NOTE: only for models trained on more than 10 digits; such problems get their own group
    return str(digits)


def load_problems(n: int, max_digits: int = 10, seed: int = 1234) -> list[BenchProblem]:
    """``n`` held-out problems (``held_out_set(n, seed)``), shuffled with ``seed``."""
    # NOTE: imports torch (training.data builds tensors elsewhere); only the bench process pays
    from training.data import held_out_set

    problems = [
        BenchProblem(p.text, p.answer, max(p.lengths))
        for p in held_out_set(n, seed=seed, max_digits=max_digits)
    ]
    random.Random(seed).shuffle(problems)
    log.info("%d held-out problems (seed %d, up to %d digits)", len(problems), seed, max_digits)
    return problems

"""Interpretability analysis of a T-REX checkpoint: what the compiler writes into
its programs, and how the executor's hidden state moves while it writes an answer.

    trex-analyze --checkpoint models/trex.pt --out docs/analysis

See ``analysis.cli`` for the flags; each figure has its own module.
"""

import matplotlib

matplotlib.use("Agg")  # figures go to files only; set before any module imports pyplot

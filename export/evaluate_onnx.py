"""Held-out exact-match accuracy of an exported model (T-REX or the baseline), run in ONNX
Runtime.

    python -m export.evaluate_onnx --model-dir models/onnx --problems 20000
    python -m export.evaluate_onnx --model-dir models/onnx-baseline --problems 2000
    python -m export.evaluate_onnx --model-dir models/onnx --report runs/eval_onnx.json

The problems are ``training.data.held_out_set`` and the report is ``training.evaluate``'s
(overall, per operand length, per longer operand, cost per output token), so the figures
compare one to one with ``trex-eval`` on the checkpoint. Decoding goes through
``service.runtime.Runtime``, the code that serves.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from service.runtime import POOLS, PROVIDERS, Runtime
from training import data
from training import evaluate as torch_eval

log = logging.getLogger(__name__)


class RuntimeModel:
    """A ``Runtime`` behind the one method of ``training.model.TRex`` (or ``Baseline``) that
    ``training.evaluate`` calls, ``generate``, so its report code runs unchanged; ``kind``
    tells ``training.evaluate`` which of the two it stands for.

    NOTE: ``training.evaluate.evaluate`` takes a model rather than a solver function; this
    adapter is the price of reusing it.
    """

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.kind = runtime.kind

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_steps: int | None = None):
        """ids (B, T) -> tokens (B, steps) in emission order, like ``TRex.generate`` (with no
        logits or states) or ``Baseline.generate``."""
        tokens = torch.from_numpy(self.runtime.generate(ids.numpy().astype("int64"), max_steps))
        return tokens if self.kind == "baseline" else (tokens, None, None)


def evaluate(runtime: Runtime, problems: list[data.Problem]) -> dict:
    """``training.evaluate.evaluate``'s report, with answers from ONNX Runtime."""
    t0 = time.perf_counter()
    report = torch_eval.evaluate(RuntimeModel(runtime), problems, batch_size=runtime.max_rows)
    report["seconds"] = time.perf_counter() - t0
    report["model_version"] = runtime.model_version
    report["providers"] = runtime.providers
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model-dir", default="models/onnx")
    ap.add_argument("--problems", type=int, default=20_000, help="held-out problems to score")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the held-out set")
    ap.add_argument("--provider", choices=PROVIDERS, default="auto")
    ap.add_argument("--pool", choices=POOLS, default="auto")
    ap.add_argument("--batch-size", type=int, default=512, help="pool rows, problems per pass")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    ap.add_argument("--report", help="where the JSON report goes (optional)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    rt = Runtime(
        args.model_dir,
        provider=args.provider,
        intra_op_threads=args.threads,
        max_rows=args.batch_size,
        pool=args.pool,
    )
    problems = data.held_out_set(args.problems, seed=args.seed, max_digits=rt.max_digits)
    report = evaluate(rt, problems)
    print(f"{rt.kind} model {rt.model_version}, providers {rt.providers}")
    print(torch_eval.format_report(report))
    print(f"{report['seconds']:.1f} s")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.report}")


if __name__ == "__main__":
    main()

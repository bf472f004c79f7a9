"""Exact-match evaluation of a T-REX checkpoint on the held-out set.

trex-eval --checkpoint models/trex.pt --report runs/eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from training import checkpoint, data, vocab
from training.baseline import Baseline, reversed_answer
from training.model import TRex


def is_baseline(model) -> bool:
    """The token-by-token baseline, in torch or behind an adapter that says so with
    ``kind = "baseline"`` (export/evaluate_onnx.py's ONNX Runtime model)."""
    return isinstance(model, Baseline) or getattr(model, "kind", None) == "baseline"


def _emitted(row: list[int]) -> int:
    """Tokens a row emitted: up to and including its <end>, or all of them."""
    return row.index(vocab.END_ID) + 1 if vocab.END_ID in row else len(row)


def solve(model: TRex | Baseline, texts: list[str], batch_size: int = 1000):
    """Greedy answers for ``texts`` and their cost in forward passes.

    T-REX: one compiler pass per answer, then executor steps. The baseline:
    one transformer pass per emitted token (the prefill writes the first).
    """
    answers, steps, passes = [], 0, 0
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        if is_baseline(model):
            for row in model.generate(data.encode_problems(chunk)).tolist():
                answers.append(reversed_answer(vocab.decode(row)))
                passes += _emitted(row)
        else:
            tokens, _, _ = model.generate(data.encode_problems(chunk))
            for row in tokens.tolist():
                answers.append(vocab.decode(row))
                steps += _emitted(row)
            passes += len(chunk)
    return answers, {"forward_passes": passes, "executor_steps": steps}


def evaluate(model: TRex | Baseline, problems: list[data.Problem], batch_size: int = 1000) -> dict:
    texts = [p.text for p in problems]
    answers, cost = solve(model, texts, batch_size)
    by_len = defaultdict(lambda: [0, 0])
    by_max = defaultdict(lambda: [0, 0])
    correct, out_tokens, failures = 0, 0, []
    for p, got in zip(problems, answers):
        ok = got == p.answer
        correct += ok
        out_tokens += len(p.answer) + 1  # the digits and <end>
        la, lb = p.lengths
        for n in {la, lb}:
            by_len[n][0] += ok
            by_len[n][1] += 1
        by_max[max(la, lb)][0] += ok
        by_max[max(la, lb)][1] += 1
        if not ok and len(failures) < 20:
            failures.append({"problem": p.text, "expected": p.answer, "got": got})
    n = len(problems)
    return {
        "problems": n,
        "accuracy": correct / n,
        "accuracy_by_operand_length": {
            str(k): {"accuracy": c / t, "problems": t} for k, (c, t) in sorted(by_len.items())
        },
        "accuracy_by_longer_operand": {
            str(k): {"accuracy": c / t, "problems": t} for k, (c, t) in sorted(by_max.items())
        },
        "output_tokens": out_tokens,
        "model": "baseline" if is_baseline(model) else "trex",
        # transformer forward passes: the compiler's, or each of the baseline's
        "forward_passes": cost["forward_passes"],
        "forward_passes_per_answer": cost["forward_passes"] / n,
        "forward_passes_per_output_token": cost["forward_passes"] / out_tokens,
        "executor_steps_per_output_token": cost["executor_steps"] / out_tokens,
        "failures": failures,
    }


def format_report(r: dict) -> str:
    lines = [
        f"held-out problems: {r['problems']}",
        f"exact match: {100 * r['accuracy']:.3f}%",
        f"transformer forward passes per answer: {r['forward_passes_per_answer']:.3f}",
        f"transformer forward passes per output token: {r['forward_passes_per_output_token']:.4f}",
        f"executor steps per output token: {r['executor_steps_per_output_token']:.4f}",
        "by operand length (a problem counts under both of its operands):",
    ]
    for k, v in r["accuracy_by_operand_length"].items():
        lines.append(f"  {k:>2} digits: {100 * v['accuracy']:7.3f}%  ({v['problems']} problems)")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", default="models/trex.pt")
    ap.add_argument("--problems", type=int, default=20_000, help="held-out problems to score")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the held-out set")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--report", default="runs/eval.json", help="where the JSON report goes")
    args = ap.parse_args(argv)

    torch.set_grad_enabled(False)
    model, _ = checkpoint.load(args.checkpoint)
    problems = data.held_out_set(args.problems, seed=args.seed, max_digits=model.cfg.max_digits)
    t0 = time.perf_counter()
    report = evaluate(model, problems, args.batch_size)
    report["seconds"] = time.perf_counter() - t0
    report["checkpoint"] = str(args.checkpoint)
    print(format_report(report))
    if args.report:
        from pathlib import Path

        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.report}")


if __name__ == "__main__":
    main()

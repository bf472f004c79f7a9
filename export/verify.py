"""Checks that exported graphs compute what the torch model computes.

Used by ``trex-export`` (always ``quick_check``; ``verify`` with ``--verify N``) and by the
parity tests (tests/export/test_parity.py). Not a command of its own.

* ``quick_check``: every graph, straight from its file, on a few problems of different
  lengths and batch sizes; returns the largest absolute difference from torch.
* ``compare``: on held-out problems, (1) each graph fed exactly torch's inputs, (2) a whole
  ONNX run carrying its own state, against torch's and against torch's own float32 rounding
  drift from a float64 run, and (3) answers of ``service.runtime.Runtime`` vs torch's.
* ``failures``: what in a ``compare`` result is out of tolerance.

Why two kinds of logit difference: each graph alone differs from torch by float32 rounding
(~5e-6 on logits of magnitude ~20), but the executor is a recurrence, and a trained one
amplifies rounding step by step: over 12 steps torch float32 itself drifts ~1e-4 from
float64 (measured on an early checkpoint), and a whole ONNX run drifts from torch by the same
order. So the graph difference is held to ``LOGIT_TOL`` and the drift to a multiple of
torch's own.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export import evaluate_onnx, graphs
from service.runtime import Runtime
from training import data, vocab
from training.model import TRex

log = logging.getLogger(__name__)

LOGIT_TOL = 1e-4  # per graph, same inputs: programs and logits
DRIFT_FACTOR = 4.0  # a whole run may drift from torch at most this many times torch's own drift
# two logits closer than this at a step where torch and ONNX chose differently count as a tie
# broken by rounding, not as a wrong graph
TIE_TOL = 1e-4
QUICK_PROBLEMS = ["7669+10132=", "0+0=", "9999999999+1=", "12+3456789=", "5+5="]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def quick_check(model: TRex, model_dir: Path) -> float:
    """Largest absolute difference between torch and each graph, over a few problems at
    batch 1 and in a padded batch; ``inf`` when a graph's tokens or pool bookkeeping is off.
    A numpy step with the manifest's ``executor_embedding`` is held to the same bound, so an
    export whose manifest could not replay its programs is refused."""
    d = Path(model_dir)
    s = {name: _session(d / f"{name}.onnx") for name in graphs.GRAPH_NAMES}
    embedding = _manifest_embedding(d)
    layout = model.executor.layout
    parts, step = list(layout.shapes), graphs.step_parts(model)
    a, b = layout.offsets["h0"]
    worst = 0.0
    for texts in (QUICK_PROBLEMS[:1], QUICK_PROBLEMS):
        B = len(texts)
        ids = data.encode_problems(texts)
        start = np.full(B, vocab.START_ID, np.int64)
        with torch.no_grad():
            p_t = model.compiler(ids)
            logits_t, h_t = model.executor.step(p_t, p_t[:, a:b], torch.from_numpy(start))
        (p_o,) = s["compiler"].run(None, {"ids": ids.numpy()})
        split = {n: np.ascontiguousarray(v) for n, v in _split(layout, p_o).items()}
        tok, h_o, logits_o = s["executor"].run(
            None, {"programs": p_o, "hidden": split["h0"], "tokens": start}
        )
        tok_s, h_s, logits_s = s["executor_split"].run(
            None, {**{n: split[n] for n in step}, "hidden": split["h0"], "tokens": start}
        )
        # the manifest's embedding replays the graph's step outside ONNX Runtime
        logits_n, h_n = _numpy_step(split, embedding, start)
        worst = max(
            worst,
            _diff(p_o, p_t),
            _diff(logits_o, logits_t),
            _diff(h_o, h_t),
            _diff(logits_s, logits_t),
            _diff(h_s, h_t),
            _diff(logits_n, logits_o),
            _diff(h_n, h_o),
        )
        if not (np.array_equal(tok, logits_o.argmax(-1)) and np.array_equal(tok_s, tok)):
            return float("inf")

        # the pool graphs: rows written out of order into a larger pool, then stepped
        N = B + 3
        rows = np.arange(N - 1, N - 1 - B, -1, dtype=np.int64)
        feed = {f"pool_{n}": np.zeros((N, *layout.shapes[n]), np.float32) for n in parts}
        feed.update(pool_hidden=np.zeros((N, h_o.shape[1]), np.float32), rows=rows, programs=p_o)
        written = dict(
            zip([o.name for o in s["pool_write"].get_outputs()], s["pool_write"].run(None, feed))
        )
        feed = {f"pool_{n}": written[f"pool_{n}_out"] for n in step}
        feed.update(pool_hidden=written["pool_hidden_out"], rows=rows, tokens=start)
        tok_p, pool_h, logits_p = s["executor_pool"].run(None, feed)
        untouched = np.delete(np.arange(N), rows)
        worst = max(
            worst,
            _diff(logits_p, logits_t),
            _diff(pool_h[rows], h_t),
            _diff(written["pool_h0_out"][rows], split["h0"]),
        )
        if not (np.array_equal(tok_p, tok) and not pool_h[untouched].any()):
            return float("inf")
    return worst


def _manifest_embedding(model_dir: Path) -> np.ndarray:
    """The executor embedding (V, E) that the export's manifest.json carries."""
    entry = json.loads((model_dir / "manifest.json").read_text())["executor_embedding"]
    return np.asarray(entry["values"], np.float32).reshape(entry["shape"])


def _numpy_step(parts: dict[str, np.ndarray], embedding: np.ndarray, tokens: np.ndarray):
    """One GRU step (gates r, z, n as torch orders them) in plain numpy: what a client
    replaying a program computes; -> logits (B, V), new hidden (B, H)."""
    x = embedding[tokens]  # (B, E)
    h = parts["h0"]
    gi = np.einsum("bge,be->bg", parts["w_ih"], x) + parts["b_ih"]  # (B, 3H)
    gh = np.einsum("bgh,bh->bg", parts["w_hh"], h) + parts["b_hh"]
    i_r, i_z, i_n = np.split(gi, 3, axis=1)
    h_r, h_z, h_n = np.split(gh, 3, axis=1)
    r = 1 / (1 + np.exp(-(i_r + h_r)))
    z = 1 / (1 + np.exp(-(i_z + h_z)))
    h = (1 - z) * np.tanh(i_n + r * h_n) + z * h
    return np.einsum("bvh,bh->bv", parts["w_out"], h) + parts["b_out"], h


def _split(layout, programs: np.ndarray) -> dict[str, np.ndarray]:
    """(B, P) flat programs -> named (B, *shape) parts, as ``ProgramLayout.split``."""
    B = programs.shape[0]
    return {
        n: programs[:, a:b].reshape(B, *layout.shapes[n]) for n, (a, b) in layout.offsets.items()
    }


def _diff(a: np.ndarray, b) -> float:
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    return float(np.abs(a - b).max())


def compare(
    model: TRex,
    model_dir: Path,
    problems: list[data.Problem],
    batch_size: int = 500,
    runtime: Runtime | None = None,
    float64_reference: bool = True,
) -> dict:
    """torch vs ONNX Runtime (CPU) on ``problems``.

    Differences of the graphs themselves, each fed exactly the inputs torch had:
      max_program_diff  compiler.onnx vs torch, same ids
      max_logit_diff    executor.onnx and executor_split.onnx vs torch at every greedy step,
                        same program, hidden state and previous token (torch's)
      max_hidden_diff   the same steps' new hidden states
    Drift of a whole ONNX run (its own programs and hidden states carried through every step,
    torch's tokens fed back so that the steps still compare):
      drift_logit_diff  ONNX run vs torch float32 run
      float32_drift     torch float32 run vs torch float64 run (with ``float64_reference``):
                        the rounding noise a float32 run has anyway, the yardstick for the above
    Answers of ``service.runtime.Runtime`` decoding on its own vs torch's:
      answer_mismatches rows whose answers differ although torch's two best logits, at the
                        first step where the tokens differ, are further apart than ``TIE_TOL``
      near_ties         rows that differ at a closer tie (rounding decides those)
    """
    d = Path(model_dir)
    comp, ex = _session(d / "compiler.onnx"), _session(d / "executor.onnx")
    ex_split = _session(d / "executor_split.onnx")
    step = graphs.step_parts(model)
    rt = runtime or Runtime(d, provider="cpu", max_rows=batch_size)
    m64 = copy.deepcopy(model).double() if float64_reference else None
    layout = model.executor.layout
    a, b = layout.offsets["h0"]
    keys = ("max_program_diff", "max_logit_diff", "max_hidden_diff", "drift_logit_diff")
    stats = dict.fromkeys(keys + (("float32_drift",) if m64 else ()), 0.0)

    def worse(key: str, value: float) -> None:
        stats[key] = max(stats[key], value)

    mismatches, near_ties, examples = 0, 0, []
    for i in range(0, len(problems), batch_size):
        texts = [p.text for p in problems[i : i + batch_size]]
        ids = data.encode_problems(texts)
        with torch.no_grad():
            tokens_t, logits_t, states_t = model.generate(ids)  # (B, S), (B, S, V), (B, S, H)
            programs_t = model.compiler(ids)  # (B, P)
            programs_64 = m64.compiler(ids) if m64 else None
        (programs_o,) = comp.run(None, {"ids": ids.numpy()})
        worse("max_program_diff", _diff(programs_o, programs_t))

        parts_t = {
            n: np.ascontiguousarray(v) for n, v in _split(layout, programs_t.numpy()).items()
        }
        h_t = programs_t[:, a:b].numpy()  # torch's state before each step
        h_o = programs_o[:, a:b]  # the ONNX run's own state
        h_64 = programs_64[:, a:b] if m64 else None
        prev = np.full(len(texts), vocab.START_ID, np.int64)
        for t in range(tokens_t.shape[1]):
            # same inputs as torch: the graphs' own difference
            feed = {"programs": programs_t.numpy(), "hidden": h_t, "tokens": prev}
            _, h_same, logits_same = ex.run(None, feed)
            feed = {n: parts_t[n] for n in step} | {"hidden": h_t, "tokens": prev}
            _, h_split, logits_split = ex_split.run(None, feed)
            for logits, h in ((logits_same, h_same), (logits_split, h_split)):
                worse("max_logit_diff", _diff(logits, logits_t[:, t]))
                worse("max_hidden_diff", _diff(h, states_t[:, t]))
            # the ONNX run carrying its own programs and state
            feed = {"programs": programs_o, "hidden": h_o, "tokens": prev}
            _, h_o, logits_o = ex.run(None, feed)
            worse("drift_logit_diff", _diff(logits_o, logits_t[:, t]))
            if m64:
                with torch.no_grad():
                    logits_64, h_64 = m64.executor.step(programs_64, h_64, torch.from_numpy(prev))
                worse("float32_drift", _diff(logits_t[:, t].double().numpy(), logits_64))
            h_t, prev = states_t[:, t].numpy(), tokens_t[:, t].numpy()

        # the served path decoding on its own
        tokens_o = rt.generate(ids.numpy())
        differ, ties, found = compare_answers(
            rt, texts, tokens_t.tolist(), tokens_o.tolist(), logits_t
        )
        mismatches, near_ties = mismatches + differ, near_ties + ties
        examples = (examples + found)[:10]
    result = {
        "problems": len(problems),
        **stats,
        "answer_mismatches": mismatches,
        "near_ties": near_ties,
        "mismatch_examples": examples,
    }
    log.info(
        "parity on %d problems: max |logit diff| %.2e (same inputs), program %.2e,"
        " hidden %.2e; drift of a whole run %.2e (torch float32 vs float64: %s);"
        " %d answers differ, %d near ties",
        len(problems),
        stats["max_logit_diff"],
        stats["max_program_diff"],
        stats["max_hidden_diff"],
        stats["drift_logit_diff"],
        f"{stats['float32_drift']:.2e}" if m64 else "not measured",
        mismatches,
        near_ties,
    )
    return result


def compare_answers(rt: Runtime, texts, torch_ids, onnx_ids, torch_logits):
    """Rows whose decoded answers differ between torch and ONNX Runtime.

    A difference where torch's two best logits, at the first differing step, are within
    ``TIE_TOL`` is a near tie (rounding decides it), not a mismatch.
    -> (mismatches, near ties, up to 10 examples)
    """
    mismatches, near_ties, examples = 0, 0, []
    for r, text in enumerate(texts):
        want, got = rt.decode(torch_ids[r]), rt.decode(onnx_ids[r])
        if want == got:
            continue
        t = first_difference(torch_ids[r], onnx_ids[r])
        top2 = torch.topk(torch_logits[r, t], 2).values
        if float(top2[0] - top2[1]) < TIE_TOL:
            near_ties += 1
            continue
        mismatches += 1
        if len(examples) < 10:
            examples.append({"problem": text, "torch": want, "onnx": got, "step": t})
    return mismatches, near_ties, examples


def first_difference(a: list[int], b: list[int]) -> int:
    """First step where two greedy runs emitted different tokens, up to either's <end>."""
    for t in range(min(len(a), len(b))):
        if a[t] != b[t]:
            return t
    return min(len(a), len(b)) - 1


def verify(model: TRex, model_dir: Path, n_problems: int, seed: int = 1234) -> dict:
    """Parity and ONNX Runtime accuracy on ``n_problems`` held-out problems."""
    problems = data.held_out_set(n_problems, seed=seed, max_digits=model.cfg.max_digits)
    rt = Runtime(model_dir, provider="cpu", max_rows=500)
    parity = compare(model, model_dir, problems, runtime=rt)
    bad = failures(parity)
    if bad:
        raise RuntimeError(f"{model_dir}: ONNX Runtime disagrees with torch: {'; '.join(bad)}")
    return {"parity": parity, "accuracy": accuracy_summary(rt, problems, seed)}


def accuracy_summary(rt: Runtime, problems: list, seed: int) -> dict:
    """Exact match through ONNX Runtime, overall and by operand length, for the manifest."""
    report = evaluate_onnx.evaluate(rt, problems)
    return {
        "problems": report["problems"],
        "seed": seed,
        "accuracy": report["accuracy"],
        "accuracy_by_operand_length": report["accuracy_by_operand_length"],
    }


def failures(result: dict) -> list[str]:
    """The parts of a ``compare`` result that are out of tolerance (empty: all good)."""
    out = []
    for key in ("max_program_diff", "max_logit_diff"):
        if not result[key] < LOGIT_TOL:
            out.append(f"{key} {result[key]:.2e} >= {LOGIT_TOL}")
    if "float32_drift" in result:
        limit = max(LOGIT_TOL, DRIFT_FACTOR * result["float32_drift"])
        if not result["drift_logit_diff"] <= limit:
            out.append(f"drift_logit_diff {result['drift_logit_diff']:.2e} > {limit:.2e}")
    if result["answer_mismatches"]:
        out.append(
            f"{result['answer_mismatches']} answers differ, e.g. {result['mismatch_examples'][:3]}"
        )
    return out

"""Checks that the exported baseline graphs (export/baseline_graphs.py) compute what the torch
baseline computes.

Used by ``trex-export`` on a baseline checkpoint (always ``quick_check``; ``verify`` with
``--verify N``) and by tests/export/test_baseline_parity.py. Not a command of its own.

* ``quick_check``: both graphs straight from their files, on a few problems at batch 1 and in
  a padded batch, fed torch's inputs, decode with a cache longer than the row and garbage in
  its masked positions; returns the largest absolute difference from torch (logits, keys,
  values), ``inf`` when tokens, places or the key mask differ.
* ``compare``: on held-out problems, (1) each graph fed exactly torch's inputs: the prefill on
  the problems, decode at every greedy step on torch's cache and token; (2) the served path,
  ``service.runtime.Runtime`` with its own pool of caches, fed torch's tokens back so that the
  steps still compare (the drift of a whole ONNX run); (3) the answers of that path decoding on
  its own against torch's.
* ``failures``: what in a ``compare`` result is out of tolerance.

Unlike the T-REX executor, the baseline carries no recurrent state that amplifies rounding:
each step recomputes attention over cached keys and values, so the whole-run drift is held to
the same ``LOGIT_TOL`` as a single graph.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.verify import accuracy_summary, compare_answers
from service.runtime import Runtime
from training import data, vocab
from training.baseline import Baseline

log = logging.getLogger(__name__)

LOGIT_TOL = 1e-4  # logits, keys and values, same inputs; and the whole-run drift of logits
QUICK_PROBLEMS = ["7669+10132=", "0+0=", "9999999999+1=", "12+3456789=", "5+5="]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _diff(a: np.ndarray, b) -> float:
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    return float(np.abs(a - b).max()) if a.size else 0.0


def _rows_major(t: torch.Tensor) -> np.ndarray:
    """(n_layers, B, h, K, dh) torch cache -> (B, K, n_layers, h, dh), the graphs' layout."""
    return np.ascontiguousarray(t.permute(1, 3, 0, 2, 4).numpy())


class TorchRun:
    """Greedy decoding in torch with the cache, keeping what each step saw and produced:
    ``tokens`` (B, S), ``logits`` (B, S, V), and per decode step t >= 1 the cache it read
    (``caches[t - 1]``: k, v, places, key_ok) and the new key and value it wrote."""

    def __init__(self, model: Baseline, ids: torch.Tensor, max_steps: int | None = None):
        max_steps = max_steps or model.cfg.max_steps
        B = ids.shape[0]
        with torch.no_grad():
            logits, k, v, places, ok = model.prefill(ids)
            self.prefill = (logits, k, v, places, ok)
            tok = logits.argmax(-1)
            toks, all_logits, self.caches, self.new_kv = [tok], [logits], [], []
            done = tok == vocab.END_ID
            for step in range(1, max_steps):
                if bool(done.all()):
                    break
                steps = torch.full((B,), step, dtype=torch.long)
                self.caches.append((k, v, places, ok))
                logits, nk, nv = model.decode(tok, steps, k, v, places, ok)
                self.new_kv.append((nk, nv))
                k, v = torch.cat([k, nk], dim=3), torch.cat([v, nv], dim=3)
                places = torch.cat([places, steps.unsqueeze(1)], dim=1)
                ok = torch.cat([ok, torch.ones(B, 1, dtype=torch.bool)], dim=1)
                tok = logits.argmax(-1)
                toks.append(tok)
                all_logits.append(logits)
                done |= tok == vocab.END_ID
        self.tokens = torch.stack(toks, 1)  # (B, S)
        self.logits = torch.stack(all_logits, 1)  # (B, S, V)


def quick_check(model: Baseline, model_dir: Path) -> float:
    """Largest absolute difference between torch and the two graphs on a few problems;
    ``inf`` when an argmax, a place or the key mask is off."""
    d = Path(model_dir)
    prefill, decode = _session(d / "prefill.onnx"), _session(d / "decode.onnx")
    rng = np.random.default_rng(0)
    worst = 0.0
    for texts in (QUICK_PROBLEMS[:1], QUICK_PROBLEMS):
        ids = data.encode_problems(texts)
        B = len(texts)
        with torch.no_grad():
            logits_t, k_t, v_t, places_t, ok_t = model.prefill(ids)
            tok_t = logits_t.argmax(-1)
            steps = torch.ones(B, dtype=torch.long)
            dlogits_t, nk_t, nv_t = model.decode(tok_t, steps, k_t, v_t, places_t, ok_t)
        tok, logits, k, v, places, ok = prefill.run(None, {"ids": ids.numpy()})
        worst = max(
            worst,
            _diff(logits, logits_t),
            _diff(k, _rows_major(k_t)),
            _diff(v, _rows_major(v_t)),
        )
        if not (
            np.array_equal(tok, tok_t.numpy())
            and np.array_equal(places, places_t.numpy())
            and np.array_equal(ok, ok_t.numpy())
        ):
            return float("inf")

        # decode on a cache 5 positions longer than the rows, garbage in the masked positions
        extra = 5
        garbage = rng.normal(0, 50, (B, extra, *k.shape[2:])).astype(np.float32)
        feed = {
            "tokens": tok,
            "steps": steps.numpy(),
            "past_k": np.concatenate([k, garbage], 1),
            "past_v": np.concatenate([v, -garbage], 1),
            "past_places": np.concatenate([places, rng.integers(0, 5, (B, extra))], 1),
            "past_ok": np.concatenate([ok, np.zeros((B, extra), np.bool_)], 1),
        }
        dtok, dlogits, nk, nv = decode.run(None, feed)
        worst = max(
            worst,
            _diff(dlogits, dlogits_t),
            _diff(nk, nk_t[:, :, :, 0].transpose(0, 1)),
            _diff(nv, nv_t[:, :, :, 0].transpose(0, 1)),
        )
        if not np.array_equal(dtok, dlogits.argmax(-1)):
            return float("inf")
    return worst


def compare(
    model: Baseline,
    model_dir: Path,
    problems: list[data.Problem],
    batch_size: int = 500,
    runtime: Runtime | None = None,
) -> dict:
    """torch vs ONNX Runtime (CPU) on ``problems``.

    The graphs fed exactly torch's inputs:
      max_logit_diff   prefill.onnx at '=' and decode.onnx at every greedy step, on torch's
                       cache and previous token
      max_kv_diff      the keys and values both graphs write
    The served path (``Runtime``'s own pool of caches, torch's tokens fed back):
      drift_logit_diff logits of every decode step vs torch's
    Answers of ``Runtime`` decoding on its own vs torch's:
      answer_mismatches rows whose answers differ although torch's two best logits, at the
                        first step where the tokens differ, are further apart than TIE_TOL
      near_ties         rows that differ at a closer tie (rounding decides those)
    """
    d = Path(model_dir)
    prefill, decode = _session(d / "prefill.onnx"), _session(d / "decode.onnx")
    rt = runtime or Runtime(d, provider="cpu", max_rows=batch_size)
    if rt.kind != "baseline":
        raise ValueError(f"{model_dir}: a {rt.kind} export, not a baseline one")
    stats = dict.fromkeys(("max_logit_diff", "max_kv_diff", "drift_logit_diff"), 0.0)

    def worse(key: str, value: float) -> None:
        stats[key] = max(stats[key], value)

    mismatches, near_ties, examples = 0, 0, []
    for i in range(0, len(problems), min(batch_size, rt.max_rows)):
        texts = [p.text for p in problems[i : i + min(batch_size, rt.max_rows)]]
        ids = data.encode_problems(texts)
        B = len(texts)
        ref = TorchRun(model, ids)
        S = ref.tokens.shape[1]

        # (1) the graphs on torch's inputs
        _, logits, k, v, _, _ = prefill.run(None, {"ids": ids.numpy()})
        worse("max_logit_diff", _diff(logits, ref.logits[:, 0]))
        k_t, v_t = ref.prefill[1], ref.prefill[2]
        worse("max_kv_diff", max(_diff(k, _rows_major(k_t)), _diff(v, _rows_major(v_t))))
        for t in range(1, S):
            ck, cv, cp, cok = ref.caches[t - 1]
            feed = {
                "tokens": ref.tokens[:, t - 1].numpy(),
                "steps": np.full(B, t, np.int64),
                "past_k": _rows_major(ck),
                "past_v": _rows_major(cv),
                "past_places": cp.numpy(),
                "past_ok": cok.numpy(),
            }
            _, logits, nk, nv = decode.run(None, feed)
            worse("max_logit_diff", _diff(logits, ref.logits[:, t]))
            nk_t, nv_t = ref.new_kv[t - 1]
            nk_t, nv_t = nk_t[:, :, :, 0].transpose(0, 1), nv_t[:, :, :, 0].transpose(0, 1)
            worse("max_kv_diff", max(_diff(nk, nk_t), _diff(nv, nv_t)))

        # (2) the served path on its own caches, torch's tokens fed back
        rows = np.arange(B, dtype=np.int64)
        first = rt.compile(ids.numpy(), rows)
        if not np.array_equal(first, ref.tokens[:, 0].numpy()):
            worse("drift_logit_diff", float("inf"))
        for t in range(1, S):
            _, logits = rt.step_logits(rows, ref.tokens[:, t - 1].numpy())
            worse("drift_logit_diff", _diff(logits, ref.logits[:, t]))

        # (3) the served path decoding on its own
        tokens_o = rt.generate(ids.numpy())
        differ, ties, found = compare_answers(
            rt, texts, ref.tokens.tolist(), tokens_o.tolist(), ref.logits
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
        "baseline parity on %d problems: max |logit diff| %.2e, keys/values %.2e (same inputs);"
        " served path with its own caches %.2e; %d answers differ, %d near ties",
        len(problems),
        stats["max_logit_diff"],
        stats["max_kv_diff"],
        stats["drift_logit_diff"],
        mismatches,
        near_ties,
    )
    return result


def verify(model: Baseline, model_dir: Path, n_problems: int, seed: int = 1234) -> dict:
    """Parity and ONNX Runtime accuracy on ``n_problems`` held-out problems."""
    problems = data.held_out_set(n_problems, seed=seed, max_digits=model.cfg.max_digits)
    rt = Runtime(model_dir, provider="cpu", max_rows=500, kind="baseline")
    parity = compare(model, model_dir, problems, runtime=rt)
    bad = failures(parity)
    if bad:
        raise RuntimeError(f"{model_dir}: ONNX Runtime disagrees with torch: {'; '.join(bad)}")
    return {"parity": parity, "accuracy": accuracy_summary(rt, problems, seed)}


def failures(result: dict) -> list[str]:
    """The parts of a ``compare`` result that are out of tolerance (empty: all good)."""
    out = []
    for key in ("max_logit_diff", "max_kv_diff", "drift_logit_diff"):
        if not result[key] < LOGIT_TOL:
            out.append(f"{key} {result[key]:.2e} >= {LOGIT_TOL}")
    if result["answer_mismatches"]:
        out.append(
            f"{result['answer_mismatches']} answers differ, e.g. {result['mismatch_examples'][:3]}"
        )
    return out

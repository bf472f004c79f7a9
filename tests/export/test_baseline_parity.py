"""The exported baseline graphs against the torch baseline, and what trex-export writes for a
baseline checkpoint.

python -m pytest tests/export/test_baseline_parity.py -q -s      # -s shows the differences
TREX_TEST_BASELINE_CHECKPOINT=runs/baseline1.pt python -m pytest tests/export -q -s
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch

from export import baseline_graphs, evaluate_onnx, onnx_export, verify_baseline
from service.runtime import ModelLoadError, Runtime
from training import data
from training import evaluate as torch_eval
from training.baseline import reversed_answer

N_PARITY = 2000


def test_manifest_describes_the_baseline_export(
    baseline_onnx_dir, baseline_model, baseline_checkpoint
):
    m = json.loads((baseline_onnx_dir / "manifest.json").read_text())
    cfg = baseline_model.cfg
    assert m["kind"] == "baseline"
    assert m["answer_order"] == "least_significant_first"
    assert "program" not in m
    assert m["vocab"] == ["<pad>", "<start>", "<end>", *"0123456789", "+", "="]
    assert m["config"] == cfg.to_dict()
    assert m["cache"] == {
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "n_places": cfg.n_places,
        "max_problem_len": 2 * cfg.max_digits + 2,
        "max_len": 2 * cfg.max_digits + 2 + cfg.max_steps - 1,
    }
    assert m["opset"] == onnx_export.OPSET
    ckpt_sha = hashlib.sha256(baseline_checkpoint.read_bytes()).hexdigest()
    assert m["checkpoint"]["sha256"] == ckpt_sha
    assert m["model_version"].startswith("baseline-") and ckpt_sha[:12] in m["model_version"]
    assert set(m["graphs"]) == set(onnx_export.BASELINE_GRAPH_FILES) == {"prefill", "decode"}
    for name, entry in m["graphs"].items():
        path = baseline_onnx_dir / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == onnx_export.OPSET

        def dims(values):
            return {
                v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in values
            }

        assert dims(model.graph.input) == {i["name"]: i["shape"] for i in entry["inputs"]}, name
        # outputs too: the fixed head axes are pinned, the dynamic ones named
        assert dims(model.graph.output) == {o["name"]: o["shape"] for o in entry["outputs"]}, name
    decode_inputs = {i["name"]: i["shape"] for i in m["graphs"]["decode"]["inputs"]}
    assert decode_inputs["past_k"][:2] == ["batch", "cache"]
    assert m["graphs"]["prefill"]["inputs"][0]["shape"] == ["batch", "seq"]


def test_parity_with_torch_on_held_out_problems(baseline_onnx_dir, baseline_model):
    problems = data.held_out_set(N_PARITY, max_digits=baseline_model.cfg.max_digits)
    assert len(problems) >= N_PARITY
    result = verify_baseline.compare(baseline_model, baseline_onnx_dir, problems)
    print(
        f"\nbaseline parity on {result['problems']} held-out problems: "
        f"max |logit diff| {result['max_logit_diff']:.2e}, keys/values "
        f"{result['max_kv_diff']:.2e} (same inputs); served path with its own caches "
        f"{result['drift_logit_diff']:.2e}; answers differing {result['answer_mismatches']}, "
        f"near ties {result['near_ties']}"
    )
    assert result["max_logit_diff"] < 1e-4
    assert result["max_kv_diff"] < 1e-4
    assert result["drift_logit_diff"] < 1e-4
    assert result["answer_mismatches"] == 0, result["mismatch_examples"]
    assert verify_baseline.failures(result) == []


def test_graphs_take_any_batch_length_and_cache_size(baseline_onnx_dir, baseline_model):
    """Batch 1, odd batches, every operand length, and decode on a cache longer than the row
    with garbage in its masked positions give torch's logits, keys and values."""
    assert (
        verify_baseline.quick_check(baseline_model, baseline_onnx_dir) < verify_baseline.LOGIT_TOL
    )
    rt = Runtime(baseline_onnx_dir, provider="cpu", max_rows=8)
    for texts in (["1+1="], ["9999999999+9999999999=", "3+4=", "12+0000000345="]):
        ids = data.encode_problems(texts)
        with torch.no_grad():
            tokens_t = baseline_model.generate(ids)
        got = rt.generate(ids.numpy())
        for row_t, row_o in zip(tokens_t.tolist(), got):
            assert rt.decode(row_o) == rt.decode(row_t)
            # the runtime reverses the emitted digits, as training.baseline does
            assert rt.decode(row_t) == reversed_answer(data.vocab.decode(row_t))


def test_onnx_evaluation_reproduces_the_torch_report(baseline_onnx_dir, baseline_model):
    problems = data.held_out_set(300, seed=7, max_digits=baseline_model.cfg.max_digits)
    rt = Runtime(baseline_onnx_dir, provider="cpu", max_rows=128)
    onnx_report = evaluate_onnx.evaluate(rt, problems)
    torch_report = torch_eval.evaluate(baseline_model, problems)
    for key in (
        "problems",
        "accuracy",
        "accuracy_by_operand_length",
        "output_tokens",
        "model",
        "forward_passes",
        "forward_passes_per_output_token",
        "failures",
    ):
        assert onnx_report[key] == torch_report[key], key
    assert onnx_report["model"] == "baseline"
    print(torch_eval.format_report(onnx_report))


def test_export_command_detects_a_baseline_checkpoint(baseline_checkpoint, tmp_path, capsys):
    out = tmp_path / "onnx-baseline"
    onnx_export.main(
        ["--checkpoint", str(baseline_checkpoint), "--out", str(out), "--verify", "30"]
    )
    printed = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "baseline"
    assert sorted(p.name for p in out.iterdir()) == ["decode.onnx", "manifest.json", "prefill.onnx"]
    assert f"exported {m['model_version']}" in printed and "answers differing 0" in printed
    assert m["verification"]["problems"] == 30 and m["verification"]["answer_mismatches"] == 0
    assert m["accuracy"]["problems"] == 30 and "onnxruntime" in m["accuracy"]["source"]
    assert not list(tmp_path.glob(".onnx-baseline-*")), "the scratch folder was left behind"
    # the runtime loads what the command wrote, as a baseline, and refuses to take it for T-REX
    rt = Runtime(out, provider="cpu", kind="baseline")
    assert (rt.kind, rt.model_version) == ("baseline", m["model_version"])
    with pytest.raises(ModelLoadError, match="a baseline model, but trex was asked for"):
        Runtime(out, provider="cpu", kind="trex")


def test_decode_graph_ignores_masked_cache_positions(baseline_onnx_dir, baseline_model):
    """What the runtime relies on to keep fixed-size caches: positions with past_ok false,
    whatever they hold, change nothing, and a longer cache gives the same logits."""
    import onnxruntime as ort

    sess = ort.InferenceSession(
        str(baseline_onnx_dir / "decode.onnx"), providers=["CPUExecutionProvider"]
    )
    ids = data.encode_problems(["7669+10132=", "5+5="])
    with torch.no_grad():
        logits, k, v, places, ok = baseline_model.prefill(ids)
    k_rows, v_rows = k.permute(1, 3, 0, 2, 4).numpy(), v.permute(1, 3, 0, 2, 4).numpy()
    base = {
        "tokens": logits.argmax(-1).numpy(),
        "steps": np.ones(2, np.int64),
        "past_k": k_rows,
        "past_v": v_rows,
        "past_places": places.numpy(),
        "past_ok": ok.numpy(),
    }
    _, want, _, _ = sess.run(None, base)
    rng = np.random.default_rng(1)
    junk = rng.normal(0, 1e3, (2, 7, *k_rows.shape[2:])).astype(np.float32)
    longer = {
        **base,
        "past_k": np.concatenate([k_rows, junk], 1),
        "past_v": np.concatenate([v_rows, junk[::-1]], 1),
        "past_places": np.concatenate([base["past_places"], rng.integers(0, 13, (2, 7))], 1),
        "past_ok": np.concatenate([base["past_ok"], np.zeros((2, 7), np.bool_)], 1),
    }
    _, got, _, _ = sess.run(None, longer)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and the mask is what does it: the same junk unmasked changes the logits
    longer["past_ok"] = np.ones_like(longer["past_ok"])
    _, unmasked, _, _ = sess.run(None, longer)
    assert np.abs(unmasked - want).max() > 1e-3


def test_cache_shape_fits_the_longest_problem_and_answer(baseline_model):
    c = baseline_graphs.cache_shape(baseline_model)
    longest = data.encode_problems(["9999999999+9999999999="]).shape[1]
    assert c["max_problem_len"] == longest
    assert c["max_len"] == longest + baseline_model.cfg.max_steps - 1


def test_bench_times_the_served_calls(baseline_onnx_dir):
    from export import bench_baseline

    rt, rows = bench_baseline.bench(baseline_onnx_dir, [1, 3], threads=1, repeats=2, max_rows=8)
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        timings = [v for k, v in r.items() if k not in ("batch", "trimmed length")]
        assert len(timings) == 5 and all(np.isfinite(timings)) and min(timings) > 0
        assert r["trimmed length"] <= rt.cache["max_len"]

"""The exported graphs against the torch model, and what trex-export writes.

python -m pytest tests/export -q -s      # -s shows the measured differences
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch

from export import evaluate_onnx, onnx_export, verify
from service.runtime import Runtime
from training import data
from training import evaluate as torch_eval

N_PARITY = 2000


def test_manifest_describes_the_export(onnx_model_dir, trex_model, trex_checkpoint):
    m = json.loads((onnx_model_dir / "manifest.json").read_text())
    cfg = trex_model.cfg
    layout = trex_model.executor.layout
    assert m["vocab"] == ["<pad>", "<start>", "<end>", *"0123456789", "+", "="]
    assert m["config"] == cfg.to_dict()
    assert m["program"]["size"] == layout.size
    assert m["program"]["layout"] == layout.to_list()
    embedding = np.asarray(m["executor_embedding"]["values"], np.float32)
    assert m["executor_embedding"]["shape"] == [cfg.vocab_size, cfg.embed]
    np.testing.assert_array_equal(embedding, trex_model.executor.embed.weight.detach().numpy())
    assert m["opset"] == onnx_export.OPSET
    ckpt_sha = hashlib.sha256(trex_checkpoint.read_bytes()).hexdigest()
    assert m["checkpoint"]["sha256"] == ckpt_sha
    assert ckpt_sha[:12] in m["model_version"]
    assert set(m["graphs"]) == set(onnx_export.GRAPH_FILES)
    for name, entry in m["graphs"].items():
        path = onnx_model_dir / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == onnx_export.OPSET
        # names and symbolic axes as the manifest says
        inputs = {
            i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input
        }
        assert inputs == {i["name"]: i["shape"] for i in entry["inputs"]}, name
        assert [o.name for o in model.graph.output] == [o["name"] for o in entry["outputs"]]
    assert m["graphs"]["compiler"]["inputs"][0]["shape"] == ["batch", "seq"]
    assert m["graphs"]["executor"]["inputs"][0]["shape"] == ["batch", layout.size]


def test_parity_with_torch_on_held_out_problems(onnx_model_dir, trex_model):
    problems = data.held_out_set(N_PARITY, max_digits=trex_model.cfg.max_digits)
    assert len(problems) >= N_PARITY
    result = verify.compare(trex_model, onnx_model_dir, problems)
    print(
        f"\nparity on {result['problems']} held-out problems: "
        f"max |logit diff| {result['max_logit_diff']:.2e} (same inputs), "
        f"programs {result['max_program_diff']:.2e}, hidden {result['max_hidden_diff']:.2e}; "
        f"whole-run drift {result['drift_logit_diff']:.2e} "
        f"(torch float32 vs float64: {result['float32_drift']:.2e}); "
        f"answers differing {result['answer_mismatches']}, near ties {result['near_ties']}"
    )
    assert result["max_logit_diff"] < 1e-4
    assert result["max_program_diff"] < 1e-4
    assert result["answer_mismatches"] == 0, result["mismatch_examples"]
    assert verify.failures(result) == []


def test_graphs_take_any_batch_and_length(onnx_model_dir, trex_model):
    """Batch 1, odd batches and every operand length give torch's programs and logits."""
    assert verify.quick_check(trex_model, onnx_model_dir) < verify.LOGIT_TOL
    rt = Runtime(onnx_model_dir, provider="cpu", max_rows=8)
    for texts in (["1+1="], ["9999999999+9999999999=", "3+4=", "12+0000000345="]):
        ids = data.encode_problems(texts)
        with torch.no_grad():
            tokens_t, _, _ = trex_model.generate(ids)
        got = rt.generate(ids.numpy())
        for row_t, row_o in zip(tokens_t.tolist(), got):
            assert rt.decode(row_o) == rt.decode(row_t)


def test_onnx_evaluation_reproduces_the_torch_report(onnx_model_dir, trex_model):
    problems = data.held_out_set(300, seed=7, max_digits=trex_model.cfg.max_digits)
    rt = Runtime(onnx_model_dir, provider="cpu", max_rows=128)
    onnx_report = evaluate_onnx.evaluate(rt, problems)
    torch_report = torch_eval.evaluate(trex_model, problems)
    for key in (
        "problems",
        "accuracy",
        "accuracy_by_operand_length",
        "output_tokens",
        "executor_steps_per_output_token",
        "failures",
    ):
        assert onnx_report[key] == torch_report[key], key
    print(torch_eval.format_report(onnx_report))


def test_export_command_takes_accuracy_from_the_eval_report(trex_checkpoint, tmp_path, capsys):
    report = {
        "checkpoint": str(trex_checkpoint),
        "problems": 20,
        "accuracy": 0.75,
        "accuracy_by_operand_length": {"1": {"accuracy": 0.75, "problems": 20}},
    }
    report_path = tmp_path / "eval.json"
    report_path.write_text(json.dumps(report))
    out = tmp_path / "onnx"
    onnx_export.main(
        [
            "--checkpoint",
            str(trex_checkpoint),
            "--out",
            str(out),
            "--eval-report",
            str(report_path),
            "--verify",
            "0",
        ]
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["accuracy"]["accuracy"] == 0.75 and m["accuracy"]["problems"] == 20
    assert "eval.json" in m["accuracy"]["source"]
    assert "exported" in capsys.readouterr().out
    assert not list(tmp_path.glob(".onnx-*")), "the scratch folder was left behind"
    # the runtime loads what the command wrote
    assert Runtime(out, provider="cpu").model_version == m["model_version"]


def test_eval_report_of_another_checkpoint_is_refused(trex_checkpoint, tmp_path):
    other = tmp_path / "other.pt"
    other.write_bytes(trex_checkpoint.read_bytes() + b"different")
    report_path = tmp_path / "eval.json"
    report_path.write_text(
        json.dumps(
            {
                "checkpoint": str(other),
                "problems": 1,
                "accuracy": 1.0,
                "accuracy_by_operand_length": {},
            }
        )
    )
    sha = onnx_export.sha256_file(trex_checkpoint)
    with pytest.raises(ValueError, match="evaluates .*other.pt"):
        onnx_export.accuracy_from_report(report_path, trex_checkpoint, sha)
    with pytest.raises(ValueError, match="no 'accuracy'"):
        report_path.write_text(json.dumps({"checkpoint": str(trex_checkpoint)}))
        onnx_export.accuracy_from_report(report_path, trex_checkpoint, sha)


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        onnx_export.load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"config": {"no_such_field": 1}, "vocab": list(data.vocab.TOKENS), "model": {}}, bad)
    with pytest.raises(ValueError, match="does not match training/model.py"):
        onnx_export.load_checkpoint(bad)


def test_unrolled_executor_gives_the_one_step_tokens(onnx_model_dir, trex_model, tmp_path):
    """The K-step graph measured by export/bench_executor.py emits what K single steps do."""
    from export import bench_executor

    for name in ("executor.onnx", "executor_split.onnx"):
        (tmp_path / name).write_bytes((onnx_model_dir / name).read_bytes())
    rows = bench_executor.bench_k_steps(trex_model, tmp_path, 3, [1, 5], threads=1, repeats=2)
    assert [r[0] for r in rows] == [1, 5] and all(np.isfinite(r[1:]).all() for r in rows)
    assert (tmp_path / "executor_k3.onnx").is_file()

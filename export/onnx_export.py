"""Export a T-REX or baseline checkpoint to ONNX graphs and a manifest that the serving
runtime loads; the checkpoint's config says which of the two it is.

    trex-export --checkpoint models/trex.pt --out models/onnx --eval-report runs/eval.json
    trex-export --checkpoint models/baseline.pt --out models/onnx-baseline
    python -m export.onnx_export --checkpoint runs/try1.pt --out /tmp/onnx --verify 2000

A baseline checkpoint (training/baseline.py) gets prefill.onnx and decode.onnx, the
transformer with a key-value cache (export/baseline_graphs.py has their signatures), checked
by export/verify_baseline.py, and a manifest with ``"kind": "baseline"``, the cache's sizes in
``cache`` and ``"answer_order": "least_significant_first"`` in place of the program layout.
What follows describes T-REX's graphs.

Writes into ``--out``: compiler.onnx, executor.onnx, executor_split.onnx, pool_write.onnx
and executor_pool.onnx (export/graphs.py has their signatures; batch, sequence and pool axes
are dynamic) and manifest.json: vocabulary, program layout, model config, opset, model
version, the SHA-256, inputs and outputs of every graph, the held-out accuracy, and the
executor's shared token embedding (``executor_embedding``: shape [V, E] and values, row by
token id), so that a program can be replayed outside ONNX Runtime.

Every graph passes ``onnx.checker.check_model`` and is run in ONNX Runtime against the torch
model on a few problems before anything is written to ``--out``. ``--verify N`` (default
2000; 0 skips it) then compares N held-out problems in ONNX Runtime (through
``service.runtime``) and torch: logits, programs and answers must agree (export/verify.py),
the differences go into the manifest, and so does the ONNX accuracy. ``--eval-report`` takes
the held-out accuracy from a ``trex-eval`` report instead (``--verify`` still checks parity);
a report that names another checkpoint is refused.

Executor design, one step per call (served) versus K steps inside one graph, measured on
this machine's CPU with ``python -m export.bench_executor`` (12 steps, 1 thread, microseconds):

    batch   12 x one-step graph (program pre-split)   1 x unrolled 12-step graph
        1                      332                                225
       16                      560                                481
       64                    2,175                              2,019
      256                   10,729                             12,431

The unrolled graph saves only the per-call overhead, 7-13 us a step, nothing at large
batches, and it would fix K steps for every row of a call, so rows could not join or leave
between steps as continuous batching needs: one step per call is served. (Against the
flat-program executor.onnx the unrolled graph looked ~2x faster at batch 256; that was the
executor slicing, i.e. copying, each flat program at every step, which the served graphs
avoid by splitting programs once, in the pool.) Details: export/DESIGN.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import onnx
import torch

from export import baseline_graphs, graphs
from export.graphs import OPSET
from training import checkpoint
from training.baseline import Baseline
from training.model import TRex

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1  # service.runtime.MANIFEST_FORMAT reads this
GRAPH_FILES = {name: f"{name}.onnx" for name in graphs.GRAPH_NAMES}
BASELINE_GRAPH_FILES = {name: f"{name}.onnx" for name in baseline_graphs.GRAPH_NAMES}
QUICK_CHECK_TOL = 1e-4


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def kind_of(model: TRex | Baseline) -> str:
    """The manifest's ``kind``: "baseline" for the token-by-token baseline, else "trex"."""
    return "baseline" if isinstance(model, Baseline) else "trex"


def load_checkpoint(path: str | Path) -> tuple[TRex | Baseline, dict]:
    """The model and checkpoint dictionary, with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return checkpoint.load(path)
    except (TypeError, KeyError, RuntimeError) as e:
        # a config or state dict that training/model.py no longer has
        raise ValueError(f"{path}: does not match training/model.py ({e})") from e


def model_version(state: dict, digest: str, kind: str = "trex") -> str:
    """``<kind>-s<step>-<12 hex of the checkpoint's SHA-256>`` (``trex-...`` or
    ``baseline-...``), or without the step if the checkpoint has none."""
    step = state.get("step")
    return f"{kind}-s{step}-{digest[:12]}" if step is not None else f"{kind}-{digest[:12]}"


def accuracy_from_report(report_path: Path, ckpt_path: Path, ckpt_sha: str) -> dict:
    """The held-out accuracy of a ``trex-eval`` JSON report, once it is clear that the report
    was made from this checkpoint (same path, or a file with the same SHA-256)."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{report_path}: cannot read the evaluation report ({e})") from e
    for key in ("accuracy", "problems", "accuracy_by_operand_length", "checkpoint"):
        if key not in report:
            raise ValueError(f"{report_path}: no {key!r}; is it a trex-eval report?")
    named = Path(report["checkpoint"])
    same = named.is_file() and (
        named.resolve() == ckpt_path.resolve() or sha256_file(named) == ckpt_sha
    )
    if not same:
        raise ValueError(
            f"{report_path}: evaluates {named}, not {ckpt_path} (or that file is gone); "
            "run trex-eval on this checkpoint, or use --verify"
        )
    # NOTE: a checkpoint rewritten since the report (training still running) has the same
    # path; compare the report's time with the checkpoint's when that matters.
    return {
        "source": f"trex-eval report {report_path.name}",
        "problems": report["problems"],
        "accuracy": report["accuracy"],
        "accuracy_by_operand_length": report["accuracy_by_operand_length"],
    }


def export_graphs(model: TRex | Baseline, out_dir: Path, opset: int = OPSET) -> dict[str, dict]:
    """Writes every graph of the model's kind into ``out_dir`` and returns their manifest
    entries."""
    baseline = isinstance(model, Baseline)
    sigs = (baseline_graphs if baseline else graphs).signatures(model)
    entries = {}
    for name, file in (BASELINE_GRAPH_FILES if baseline else GRAPH_FILES).items():
        path = out_dir / file
        if baseline:
            baseline_graphs.export_graph(model, name, path, opset)
        else:
            graphs.export_graph(
                graphs.wrapper(model, name),
                graphs.example_inputs(model, name),
                sigs[name],
                path,
                opset,
            )
        onnx.checker.check_model(str(path), full_check=True)
        entries[name] = {
            "file": file,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            **sigs[name].to_json(),
        }
    return entries


def executor_embedding(model: TRex) -> dict:
    """The executor's token embedding (V, E), the one executor weight no program carries.

    It is written here, and not only inside the executor graphs, so that a client given a
    program (the service's Inspect) can replay the executor without reading ONNX; the
    float32 values go through JSON as Python floats, which round-trip to the same float32.
    """
    weight = model.executor.embed.weight.detach().float().cpu()
    return {"shape": list(weight.shape), "values": weight.tolist()}


def build_manifest(
    model: TRex | Baseline, state: dict, ckpt_path: Path, ckpt_sha: str, entries: dict, opset: int
) -> dict:
    kind = kind_of(model)
    if kind == "baseline":
        # the cache's sizes and the digit order in place of T-REX's program layout
        model_part = {
            "answer_order": "least_significant_first",
            "cache": baseline_graphs.cache_shape(model),
        }
    else:
        layout = model.executor.layout
        model_part = {
            "answer_order": "most_significant_first",
            "program": {
                "size": layout.size,
                "layout": layout.to_list(),
                "step_parts": graphs.step_parts(model),
            },
            "executor_embedding": executor_embedding(model),
        }
    return {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "model_version": model_version(state, ckpt_sha, kind),
        "checkpoint": {
            "file": ckpt_path.name,
            "sha256": ckpt_sha,
            "step": state.get("step"),
            "training_held_out_accuracy": state.get("held_out_accuracy"),
        },
        "config": model.cfg.to_dict(),
        "vocab": list(state["vocab"]),
        **model_part,
        "opset": opset,
        "exporter": {
            "method": "torch.onnx.export (TorchScript-based, dynamo=False)",
            "torch": torch.__version__,
            "onnx": onnx.__version__,
        },
        "graphs": entries,
        "accuracy": None,
    }


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = out_dir / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def export(
    ckpt_path: str | Path,
    out_dir: str | Path,
    eval_report: str | Path | None = None,
    verify_problems: int = 0,
    opset: int = OPSET,
) -> dict:
    """Checkpoint -> graphs + manifest in ``out_dir``; returns the manifest.

    The graphs are made and checked in a scratch folder next to ``out_dir`` and moved in
    only then, the manifest last, so a runtime loading ``out_dir`` meanwhile sees either
    the old export or files whose checksums fail, never a half-written graph it accepts.
    """
    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    model, state = load_checkpoint(ckpt_path)
    ckpt_sha = sha256_file(ckpt_path)
    accuracy = None
    if eval_report is not None:
        accuracy = accuracy_from_report(Path(eval_report), ckpt_path, ckpt_sha)

    # these import service.runtime, which needs no torch
    from export import verify, verify_baseline

    checks = verify_baseline if isinstance(model, Baseline) else verify

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        stage = Path(tmp)
        entries = export_graphs(model, stage, opset)
        manifest = build_manifest(model, state, ckpt_path, ckpt_sha, entries, opset)
        write_manifest(stage, manifest)
        diff = checks.quick_check(model, stage)
        if diff > QUICK_CHECK_TOL:
            raise RuntimeError(
                f"exported graphs differ from torch by {diff:.2e} > {QUICK_CHECK_TOL}"
            )
        log.info("graphs agree with torch on the quick check (max difference %.2e)", diff)
        for entry in entries.values():
            os.replace(stage / entry["file"], out_dir / entry["file"])
        write_manifest(out_dir, manifest)

    if verify_problems:
        result = checks.verify(model, out_dir, verify_problems)
        manifest["verification"] = result["parity"]
        if accuracy is None:
            accuracy = {"source": "onnxruntime (trex-export --verify)", **result["accuracy"]}
    if accuracy is None:
        log.warning("no held-out accuracy in the manifest: pass --eval-report or --verify N")
    manifest["accuracy"] = accuracy
    write_manifest(out_dir, manifest)
    return manifest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", default="models/trex.pt")
    ap.add_argument("--out", default="models/onnx", help="output folder")
    ap.add_argument("--eval-report", help="trex-eval JSON report of this checkpoint")
    ap.add_argument(
        "--verify",
        type=int,
        default=2000,
        metavar="N",
        help="held-out problems to compare in ONNX Runtime and torch (0: none)",
    )
    ap.add_argument("--opset", type=int, default=OPSET)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    try:
        manifest = export(args.checkpoint, args.out, args.eval_report, args.verify, args.opset)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    acc = manifest["accuracy"]
    print(f"exported {manifest['model_version']} to {args.out}")
    for entry in manifest["graphs"].values():
        print(
            f"  {entry['file']:<20} {entry['bytes']:>10,} bytes  sha256 {entry['sha256'][:16]}..."
        )
    if "verification" in manifest and manifest["kind"] == "baseline":
        v = manifest["verification"]
        print(
            f"verified on {v['problems']} held-out problems: max |logit diff| "
            f"{v['max_logit_diff']:.2e}, keys/values {v['max_kv_diff']:.2e} (same inputs); "
            f"served path with its own caches {v['drift_logit_diff']:.2e}; "
            f"answers differing {v['answer_mismatches']}"
        )
    elif "verification" in manifest:
        v = manifest["verification"]
        print(
            f"verified on {v['problems']} held-out problems: max |logit diff| "
            f"{v['max_logit_diff']:.2e} (same inputs), drift of a whole run "
            f"{v['drift_logit_diff']:.2e} (torch float32's own: {v['float32_drift']:.2e}), "
            f"answers differing {v['answer_mismatches']}"
        )
    if acc:
        print(
            f"held-out accuracy {100 * acc['accuracy']:.3f}% on {acc['problems']} ({acc['source']})"
        )


if __name__ == "__main__":
    main()

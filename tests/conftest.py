"""Fixtures shared by several test folders.

Exported ONNX models (tests/export, tests/service/test_runtime.py): a checkpoint, exported
once per session into a temporary folder. The checkpoint is $TREX_TEST_CHECKPOINT if set,
else models/trex.pt when it exists, else a small randomly initialised model: parity with
torch holds for any weights.
The baseline (tests/export/test_baseline_parity.py, the baseline service tests) likewise:
$TREX_TEST_BASELINE_CHECKPOINT, else models/baseline.pt, else a small random baseline.
torch is imported inside the fixtures only, so test modules that need no model never load it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CHECKPOINT = REPO / "models" / "trex.pt"


# ---- exported ONNX models ------------------------------------------------------------------


@pytest.fixture(scope="session")
def trex_checkpoint(tmp_path_factory) -> Path:
    """$TREX_TEST_CHECKPOINT, models/trex.pt, or a small random model saved with
    training.checkpoint.save."""
    if os.environ.get("TREX_TEST_CHECKPOINT"):
        return Path(os.environ["TREX_TEST_CHECKPOINT"])
    if SHIPPED_CHECKPOINT.is_file():
        return SHIPPED_CHECKPOINT
    import torch

    from training import checkpoint
    from training.model import ModelConfig, TRex

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, hidden=24, embed=8)
    path = tmp_path_factory.mktemp("checkpoint") / "random.pt"
    checkpoint.save(path, TRex(cfg).eval(), step=0)
    return path


@pytest.fixture(scope="session")
def trex_model(trex_checkpoint):
    """The torch model of ``trex_checkpoint``, in eval mode."""
    from training import checkpoint

    model, _ = checkpoint.load(trex_checkpoint)
    return model


@pytest.fixture(scope="session")
def onnx_model_dir(trex_checkpoint, tmp_path_factory) -> Path:
    """``trex_checkpoint`` exported by export.onnx_export (graphs + manifest.json).
    Read-only for tests: copy it before changing anything."""
    from export import onnx_export

    out = tmp_path_factory.mktemp("onnx") / "model"
    onnx_export.export(trex_checkpoint, out)
    return out


# ---- the token-by-token baseline, exported ---------------------------------------------------

SHIPPED_BASELINE_CHECKPOINT = REPO / "models" / "baseline.pt"


def trained_baseline_checkpoint() -> Path | None:
    """$TREX_TEST_BASELINE_CHECKPOINT, else models/baseline.pt when it exists; None when only
    the random stand-in below is available."""
    if os.environ.get("TREX_TEST_BASELINE_CHECKPOINT"):
        return Path(os.environ["TREX_TEST_BASELINE_CHECKPOINT"])
    return SHIPPED_BASELINE_CHECKPOINT if SHIPPED_BASELINE_CHECKPOINT.is_file() else None


@pytest.fixture(scope="session")
def baseline_checkpoint(tmp_path_factory) -> Path:
    """``trained_baseline_checkpoint()``, or a small randomly initialised baseline saved with
    training.checkpoint.save: parity with torch holds for any weights, correct sums do not."""
    trained = trained_baseline_checkpoint()
    if trained is not None:
        return trained
    import torch

    from training import checkpoint
    from training.baseline import Baseline, BaselineConfig

    torch.manual_seed(0)
    cfg = BaselineConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64)
    path = tmp_path_factory.mktemp("baseline-checkpoint") / "random-baseline.pt"
    checkpoint.save(path, Baseline(cfg).eval(), step=0)
    return path


@pytest.fixture(scope="session")
def baseline_model(baseline_checkpoint):
    """The torch baseline of ``baseline_checkpoint``, in eval mode."""
    from training import checkpoint

    model, _ = checkpoint.load(baseline_checkpoint)
    return model


@pytest.fixture(scope="session")
def baseline_onnx_dir(baseline_checkpoint, tmp_path_factory) -> Path:
    """``baseline_checkpoint`` exported by export.onnx_export (prefill, decode, manifest.json).
    Read-only for tests: copy it before changing anything."""
    from export import onnx_export

    out = tmp_path_factory.mktemp("onnx-baseline") / "model"
    onnx_export.export(baseline_checkpoint, out)
    return out

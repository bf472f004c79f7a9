"""Fixtures shared by several test folders.

Exported ONNX models (tests/export, tests/service/test_runtime.py): a checkpoint, exported
once per session into a temporary folder. The checkpoint is $TREX_TEST_CHECKPOINT if set,
else models/trex.pt when it exists, else a small randomly initialised model: parity with
torch holds for any weights.
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

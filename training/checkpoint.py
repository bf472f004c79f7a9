"""Checkpoints hold the weights together with the model's config and the vocabulary,
so that export and analysis rebuild the model without any training flag."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from training import vocab
from training.baseline import Baseline, BaselineConfig
from training.model import ModelConfig, TRex


def build(config: dict):
    """The model a checkpoint's config describes: T-REX, or the baseline."""
    if config.get("kind") == "baseline":
        return Baseline(BaselineConfig(**config))
    return TRex(ModelConfig(**config))


def save(path: str | Path, model: TRex | Baseline, **extra) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "config": model.cfg.to_dict(),
        "vocab": list(vocab.TOKENS),
        "model": model.state_dict(),
        **extra,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a torn checkpoint


def load(path: str | Path, map_location: str = "cpu") -> tuple[TRex | Baseline, dict]:
    """The model, in eval mode, and the whole checkpoint dictionary."""
    state = torch.load(path, map_location=map_location, weights_only=False)
    if state.get("vocab") != list(vocab.TOKENS):
        raise ValueError(f"{path}: vocabulary differs from training.vocab")
    model = build(state["config"])
    model.load_state_dict(state["model"])
    model.eval()
    return model, state

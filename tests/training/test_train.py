import random

import torch

from training import checkpoint, train
from training.model import TRex

SMALL = [
    "--d-model",
    "32",
    "--n-layers",
    "2",
    "--d-ff",
    "64",
    "--hidden",
    "24",
    "--embed",
    "8",
    "--batch-size",
    "64",
    "--eval-problems",
    "50",
    "--threads",
    "1",
    "--warmup",
    "10",
]


def batch_loss(model: TRex, batch) -> float:
    ids, inputs, targets = batch
    with torch.no_grad():
        return train.loss_fn(model(ids, inputs), targets).item()


def test_short_training_run_lowers_the_loss(tmp_path):
    out = tmp_path / "run.pt"
    train.main(["--out", str(out), "--steps", "60", "--eval-every", "30", "--seed", "1", *SMALL])
    trained, state = checkpoint.load(out)
    assert state["step"] == 60

    # same architecture, same seed, no training: the starting point of the run
    torch.manual_seed(1)
    untrained = TRex(trained.cfg).eval()
    batch = train.get_batch(random.Random(123), 256, trained.cfg, "cpu")
    before, after = batch_loss(untrained, batch), batch_loss(trained, batch)
    assert after < before - 0.5, (before, after)


def test_resume_continues_from_the_saved_step(tmp_path):
    out = tmp_path / "run.pt"
    train.main(["--out", str(out), "--steps", "20", "--eval-every", "20", *SMALL])
    first, _ = checkpoint.load(out)
    train.main(["--out", str(out), "--steps", "30", "--eval-every", "10", "--resume", *SMALL])
    resumed, state = checkpoint.load(out)
    assert state["step"] == 30
    assert resumed.cfg == first.cfg
    assert "optimizer" in state and state["rng"]

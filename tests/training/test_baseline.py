import random

import torch

from training import checkpoint, data
from training.baseline import Baseline, BaselineConfig, reversed_answer


def small_baseline() -> Baseline:
    torch.manual_seed(0)
    return Baseline(BaselineConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64)).eval()


def test_cached_decoding_matches_the_full_forward_pass():
    model = small_baseline()
    ids = data.encode_problems(["7669+10132=", "1+2=", "99+1="])
    tokens = model.generate(ids)  # (B, steps), one forward pass each
    assert tokens.shape[0] == 3 and 1 <= tokens.shape[1] <= model.cfg.max_steps
    # the full pass over problem + generated tokens predicts the same tokens
    with torch.no_grad():
        logits = model(ids, tokens[:, :-1])
    assert torch.equal(logits.argmax(-1), tokens)


def test_prefill_and_decode_logits_equal_the_forward_logits():
    model = small_baseline()
    ids = data.encode_problems(["123+45=", "9+9="])
    answer_in = data.encode_problems(["861", "81"])  # reversed digits, padded
    with torch.no_grad():
        full = model(ids, answer_in)
        logits, k, v, places, ok = model.prefill(ids)
        assert torch.allclose(logits, full[:, 0], atol=1e-5)
        steps = torch.ones(2, dtype=torch.long)
        logits, nk, nv = model.decode(answer_in[:, 0], steps, k, v, places, ok)
        assert torch.allclose(logits, full[:, 1], atol=1e-5)
        assert nk.shape == (2, 2, 4, 1, 8)


def test_answers_are_written_least_significant_digit_first():
    assert reversed_answer("17801") == "10871"
    p = data.Problem("7669", "10132")
    assert reversed_answer(reversed_answer(p.answer)) == p.answer


def test_baseline_checkpoint_round_trip(tmp_path):
    model = small_baseline()
    checkpoint.save(tmp_path / "b.pt", model, step=1)
    loaded, state = checkpoint.load(tmp_path / "b.pt")
    assert isinstance(loaded, Baseline) and state["config"]["kind"] == "baseline"
    ids = data.encode_problems([p.text for p in data.training_problems(random.Random(2), 4)])
    assert torch.equal(model.generate(ids), loaded.generate(ids))

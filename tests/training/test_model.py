import random

import torch

from training import checkpoint, data, vocab
from training.model import ModelConfig, ProgramLayout, TRex, place_values


def small_config(**kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, n_slots=12, hidden=24, embed=8)
    base.update(kw)
    return ModelConfig(**base)


def test_generated_program_shapes():
    cfg = small_config()
    model = TRex(cfg)
    ids = data.encode_problems(["7669+10132=", "1+2=", "0000000001+9999999999="])
    programs = model.compiler(ids)
    layout = ProgramLayout(cfg)
    assert programs.shape == (3, layout.size)
    H, E, V = cfg.hidden, cfg.embed, cfg.vocab_size
    parts = layout.split(programs)
    assert parts["w_ih"].shape == (3, 3 * H, E)
    assert parts["w_hh"].shape == (3, 3 * H, H)
    assert parts["b_ih"].shape == parts["b_hh"].shape == (3, 3 * H)
    assert parts["w_out"].shape == (3, V, H)
    assert parts["b_out"].shape == (3, V)
    assert parts["h0"].shape == (3, H)
    # every row gets its own program
    assert not torch.allclose(programs[0], programs[1])


def test_padding_does_not_change_a_program():
    model = TRex(small_config()).eval()
    alone = model.compiler(data.encode_problems(["1+2="]))
    padded = model.compiler(data.encode_problems(["1+2=", "1234567890+1234567890="]))[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_place_values_align_digits_of_equal_weight():
    ids = data.encode_problems(["12+345="])
    places, roles = place_values(ids, 13)
    assert places[0, :2].tolist() == [1, 0]
    assert places[0, 3:6].tolist() == [2, 1, 0]
    assert roles[0].tolist() == [0, 0, 2, 1, 1, 1, 2]


def test_step_matches_teacher_forced_run():
    model = TRex(small_config()).eval()
    ids = data.encode_problems(["123+45=", "9+9="])
    inputs, _ = data.encode_answers(["168", "18"], 12)
    forced = model(ids, inputs)
    programs = model.compiler(ids)
    h = model.executor.initial_state(programs)
    for t in range(4):
        logits, h = model.executor.step(programs, h, inputs[:, t])
        assert torch.allclose(logits, forced[:, t], atol=1e-5)


def test_generate_stops_at_end_or_limit():
    model = TRex(small_config()).eval()
    tokens, logits, states = model.generate(data.encode_problems(["1+1="]), max_steps=5)
    assert tokens.shape[1] <= 5
    assert logits.shape[:2] == tokens.shape and states.shape[:2] == tokens.shape


def test_checkpoint_round_trip(tmp_path):
    cfg = small_config(d_model=16, d_ff=32)
    model = TRex(cfg).eval()
    path = tmp_path / "m.pt"
    checkpoint.save(path, model, step=7)
    loaded, state = checkpoint.load(path)
    assert loaded.cfg == cfg and state["step"] == 7 and state["vocab"] == list(vocab.TOKENS)
    ids = data.encode_problems([p.text for p in data.training_problems(random.Random(1), 8)])
    assert torch.equal(model.compiler(ids), loaded.compiler(ids))

import random

from training import data, vocab


def test_answers_are_exact_sums():
    rng = random.Random(3)
    for p in data.training_problems(rng, 2000):
        assert int(p.answer) == int(p.a) + int(p.b)
        assert p.answer == str(int(p.answer))  # canonical, no leading zeros
        assert 1 <= len(p.a) <= 10 and 1 <= len(p.b) <= 10
        assert p.a.isascii() and p.a.isdigit() and p.b.isascii() and p.b.isdigit()


def test_lengths_cover_short_and_long_operands():
    rng = random.Random(4)
    lengths = [max(p.lengths) for p in data.training_problems(rng, 3000)]
    for n in range(1, 11):
        assert lengths.count(n) > 0
    assert lengths.count(1) > 10 and lengths.count(10) > 300


def test_training_never_yields_held_out_problems():
    held = {p.text for p in data.held_out_set(2000, seed=7)}
    rng = random.Random(5)
    train = {p.text for p in data.training_problems(rng, 20_000)}
    assert not held & train
    assert all(data.is_held_out(t) for t in held)
    assert not any(data.is_held_out(t) for t in train)


def test_held_out_set_is_fixed_unique_and_holds_edge_cases():
    a = data.held_out_set(1500, seed=11)
    b = data.held_out_set(1500, seed=11)
    assert a == b
    texts = [p.text for p in a]
    assert len(texts) == len(set(texts)) == 1500
    for edge in ("0+0=", "9999999999+1=", "0000000009+0000000001="):
        assert edge in texts
    # long carry chains appear beyond the hand-picked ones
    chains = [p for p in a if len(p.answer) > max(len(p.a.lstrip("0")), len(p.b.lstrip("0")))]
    assert len(chains) > 50


def test_encoding_round_trip():
    ids = data.encode_problems(["7669+10132=", "1+2="])
    assert ids.shape == (2, 11)
    assert ids[1, 4:].tolist() == [vocab.PAD_ID] * 7
    inputs, targets = data.encode_answers(["17801", "3"], 12)
    assert inputs[0, 0] == vocab.START_ID
    assert vocab.decode(targets[0].tolist()) == "17801"
    assert targets[0, 5] == vocab.END_ID and targets[1, 1] == vocab.END_ID
    assert inputs[0, 1:6].tolist() == targets[0, :5].tolist()  # shifted by one

"""service.runtime serving the baseline: manifest kinds, the key-value cache pool, and the
same compile / step calls the engine makes for T-REX.

python -m pytest tests/service/test_runtime_baseline.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.runtime import ModelLoadError, Runtime, read_manifest

REPO = Path(__file__).resolve().parents[2]
PROBLEMS = ["7669+10132=", "1+2=", "9999999999+1=", "0000000009+0000000001=", "42+58="]


@pytest.fixture(scope="module")
def rt(baseline_model_dir) -> Runtime:
    return Runtime(baseline_model_dir, provider="cpu", max_rows=16)


@pytest.fixture
def baseline_copy(baseline_model_dir, tmp_path) -> Path:
    """A private copy of the baseline export, free to damage."""
    return Path(shutil.copytree(baseline_model_dir, tmp_path / "model"))


def _edit_manifest(model_dir: Path, edit) -> None:
    path = model_dir / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def emitted(rt: Runtime, problem: str) -> list[int]:
    """The tokens ``problem`` emits alone, up to and including <end>."""
    row = [int(t) for t in rt.generate(rt.encode([problem]))[0]]
    return row[: row.index(rt.end_id) + 1] if rt.end_id in row else row


# ---- loading -------------------------------------------------------------------------------


def test_kind_comes_from_the_manifest(rt, baseline_model_dir):
    assert rt.kind == "baseline" and rt.answer_order == "least_significant_first"
    assert rt.graphs == {"compiler": "prefill.onnx", "executor": "decode.onnx"}
    assert set(rt.providers) == {"compiler", "executor"}
    assert rt.pool_kind == "host"
    assert rt.hidden_size is None and rt.program_size is None
    c = rt.cache
    assert c["max_len"] == c["max_problem_len"] + rt.max_steps - 1
    assert read_manifest(baseline_model_dir)["kind"] == "baseline"


def test_a_manifest_without_kind_is_trex(onnx_model_dir, tmp_path):
    """Exports written before the kind field existed still load, as T-REX."""
    model = Path(shutil.copytree(onnx_model_dir, tmp_path / "trex"))
    _edit_manifest(model, lambda m: m.pop("kind", None))
    trex = Runtime(model, provider="cpu", max_rows=4)
    assert trex.kind == "trex" and trex.answer_order == "most_significant_first"
    assert trex.cache is None and trex.compile(trex.encode(["1+2="]), [0]) is None


def test_asking_for_the_other_kind_is_refused(baseline_model_dir):
    with pytest.raises(ModelLoadError, match="a baseline model, but trex was asked for"):
        Runtime(baseline_model_dir, provider="cpu", kind="trex")
    with pytest.raises(ValueError, match="kind must be one of"):
        Runtime(baseline_model_dir, provider="cpu", kind="gpt")
    with pytest.raises(ValueError, match="only a host pool"):
        Runtime(baseline_model_dir, provider="cpu", pool="device")


def test_unknown_kind_or_missing_cache_entry_is_refused(baseline_copy):
    _edit_manifest(baseline_copy, lambda m: m.__setitem__("kind", "lstm"))
    with pytest.raises(ModelLoadError, match="model kind 'lstm'"):
        read_manifest(baseline_copy)
    _edit_manifest(baseline_copy, lambda m: (m.__setitem__("kind", "baseline"), m.pop("cache")))
    with pytest.raises(ModelLoadError, match="no 'cache' entry"):
        read_manifest(baseline_copy)


def test_cache_too_short_for_max_steps_is_refused(baseline_copy):
    _edit_manifest(baseline_copy, lambda m: m["cache"].__setitem__("max_len", 10))
    with pytest.raises(ModelLoadError, match="max_len too short"):
        Runtime(baseline_copy, provider="cpu")


def test_baseline_graph_missing_or_corrupt_is_refused(baseline_copy):
    path = baseline_copy / "decode.onnx"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match=r"decode\.onnx: SHA-256 .* corrupt"):
        Runtime(baseline_copy, provider="cpu")
    (baseline_copy / "prefill.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"prefill\.onnx: missing"):
        Runtime(baseline_copy, provider="cpu")


# ---- the pool ------------------------------------------------------------------------------


def test_compile_fills_the_cache_and_returns_the_first_tokens(rt):
    ids = rt.encode(PROBLEMS[:2])  # (2, 11): the second row padded
    first = rt.compile(ids, [9, 4])
    assert first.dtype == np.int64 and first.shape == (2,)
    alone = [emitted(rt, p)[0] for p in PROBLEMS[:2]]
    assert first.tolist() == alone
    rt.compile(ids, [9, 4])
    cache = rt.read_cache(4)
    c = rt.cache
    assert cache["k"].shape == (ids.shape[1], c["n_layers"], c["n_heads"], c["head_dim"])
    assert cache["emitted"] == 1
    # "1+2=" then padding: its keys are masked; '+' sits at the far end of the place axis,
    # '=' at the answer's place 0
    assert cache["key_ok"].tolist() == [True] * 4 + [False] * (ids.shape[1] - 4)
    assert cache["places"][:4].tolist() == [0, c["n_places"] - 1, 0, 0]


def test_step_appends_one_position_per_row(rt):
    ids = rt.encode(PROBLEMS[:1])
    first = rt.compile(ids, [2])
    before = rt.read_cache(2)
    rt.step([2], first)
    after = rt.read_cache(2)
    n = ids.shape[1]
    assert len(after["key_ok"]) == n + 1 and after["key_ok"][-1]
    assert after["places"][-1] == 1  # the first answer token, fed back, predicts place 1
    assert after["emitted"] == 2
    np.testing.assert_array_equal(after["k"][:n], before["k"])


def test_rows_joining_between_steps_match_solving_alone(rt):
    """Continuous batching: rows prefilled at different times, stepped together in a
    scattered, changing order, emit exactly what each problem emits alone."""
    alone = {p: emitted(rt, p) for p in PROBLEMS}
    rows = {PROBLEMS[0]: 11, PROBLEMS[1]: 2, PROBLEMS[2]: 7, PROBLEMS[3]: 3, PROBLEMS[4]: 15}
    got = {p: [] for p in PROBLEMS}
    waiting = list(PROBLEMS)
    for step in range(40):
        if waiting and step % 2 == 0:  # one problem joins every other step
            p = waiting.pop(0)
            got[p].append(int(rt.compile(rt.encode([p]), [rows[p]])[0]))
        live = [p for p in PROBLEMS if got[p] and got[p][-1] != rt.end_id]
        if not live and not waiting:
            break
        if not live:
            continue
        live.reverse()  # descending rows: the gathered path, not the in-place one
        tokens = rt.step([rows[p] for p in live], np.array([got[p][-1] for p in live]))
        for p, t in zip(live, tokens):
            got[p].append(int(t))
    assert got == alone
    assert {p: rt.decode(t) for p, t in got.items()} == dict(zip(PROBLEMS, rt.solve(PROBLEMS)))


def test_a_row_reused_for_a_shorter_problem_forgets_the_longer_one(rt):
    """The cache keeps stale keys past a new problem's length; they must stay masked."""
    short = "3+4="
    fresh = emitted(rt, short)
    long_ids = rt.encode(["9999999999+9999999999="])
    tokens = rt.compile(long_ids, [5])
    for _ in range(5):
        tokens = rt.step([5], tokens)
    got = [int(rt.compile(rt.encode([short]), [5])[0])]
    while got[-1] != rt.end_id and len(got) < rt.max_steps:
        got.append(int(rt.step([5], np.array([got[-1]]))[0]))
    assert got == fresh


def test_stepping_leaves_other_rows_alone(rt):
    first = rt.compile(rt.encode(PROBLEMS[:3]), [0, 1, 2])
    before = [rt.read_cache(r) for r in range(3)]
    rt.step([1], first[1:2])
    after = [rt.read_cache(r) for r in range(3)]
    for r in (0, 2):
        assert after[r]["emitted"] == before[r]["emitted"]
        np.testing.assert_array_equal(after[r]["k"], before[r]["k"])
    assert after[1]["emitted"] == before[1]["emitted"] + 1


def test_decode_puts_the_digits_in_written_order(rt):
    ids = [rt.vocab.index(c) for c in "10871"] + [rt.end_id, rt.end_id]
    assert rt.decode(ids) == "17801"
    assert rt.decode([rt.end_id]) == ""


def test_bad_calls_are_refused_and_leave_the_pool_alone(rt):
    first = rt.compile(rt.encode(PROBLEMS[:2]), [0, 1])
    cache = rt.read_cache(0)
    with pytest.raises(ValueError, match="must not repeat"):
        rt.step([0, 0], first)
    with pytest.raises(ValueError, match="int64 of shape"):
        rt.step([0, 1], first[:1])
    with pytest.raises(ValueError, match="at most 22"):
        rt.compile(rt.encode(["1" * 11 + "+" + "1" * 11 + "="]), [3])
    with pytest.raises(ValueError, match="holds no programs"):
        rt.read_program(0)
    with pytest.raises(ValueError, match="holds no hidden states"):
        rt.read_hidden(0)
    after = rt.read_cache(0)
    assert after["emitted"] == cache["emitted"]
    np.testing.assert_array_equal(after["k"], cache["k"])


def test_a_row_cannot_be_stepped_past_max_steps(rt):
    tokens = rt.compile(rt.encode(["1+1="]), [6])
    for _ in range(rt.max_steps - 1):
        tokens = rt.step([6], tokens)
    assert rt.read_cache(6)["emitted"] == rt.max_steps
    with pytest.raises(ValueError, match=r"rows \[6\] have emitted max_steps"):
        rt.step([6], tokens)
    with pytest.raises(ValueError, match="at most max_steps"):
        rt.generate(rt.encode(["1+1="]), rt.max_steps + 1)


def test_generate_pads_finished_rows_and_spans_several_pool_loads(rt):
    tokens = rt.generate(rt.encode(PROBLEMS * 5))  # more problems than pool rows
    assert tokens.shape[0] == len(PROBLEMS) * 5 and tokens.shape[1] <= rt.max_steps
    assert [rt.decode(row) for row in tokens] == rt.solve(PROBLEMS) * 5
    for row in tokens:
        ends = np.flatnonzero(row == rt.end_id)
        if len(ends):
            assert (row[ends[0] :] == rt.end_id).all()


def test_command_line_solves_with_the_baseline(baseline_model_dir, baseline_reference):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.runtime",
            "--model-dir",
            str(baseline_model_dir),
            "--provider",
            "cpu",
            "7669+10132=",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "baseline model" in out
    assert f"7669+10132={baseline_reference.solve(['7669+10132='])[0]}" in out

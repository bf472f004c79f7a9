"""service.runtime: loading checks, providers, and the pool API the engine codes against.

python -m pytest tests/service/test_runtime.py -q
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.runtime import CPU, ModelLoadError, Runtime, read_manifest

REPO = Path(__file__).resolve().parents[2]
PROBLEMS = ["7669+10132=", "1+2=", "9999999999+1=", "0000000009+0000000001=", "42+58="]
# a machine with an NVIDIA driver may really get CUDA; the fallback tests are for one without
HAS_GPU = Path("/dev/nvidiactl").exists()


@pytest.fixture
def model_copy(onnx_model_dir, tmp_path) -> Path:
    """A private copy of the exported model, free to damage."""
    return Path(shutil.copytree(onnx_model_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def runtimes(onnx_model_dir) -> dict[str, Runtime]:
    return {
        kind: Runtime(onnx_model_dir, provider="cpu", max_rows=16, pool=kind)
        for kind in ("host", "device")
    }


def test_importing_the_runtime_does_not_import_torch():
    code = (
        "import service, service.runtime, sys; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert not any(m == 'training' or m.startswith('training.') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU, so auto may really get CUDA")
def test_auto_falls_back_to_the_cpu(onnx_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="service.runtime"):
        rt = Runtime(onnx_model_dir, provider="auto")
    assert rt.providers == {"compiler": CPU, "executor": CPU}
    assert rt.device == "cpu" and rt.pool_kind == "host"
    assert "CPUExecutionProvider" in caplog.text  # says where it runs
    assert rt.solve(PROBLEMS[:2])  # and runs


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_cuda_demanded_without_a_gpu_is_refused(onnx_model_dir):
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider requested"):
        Runtime(onnx_model_dir, provider="cuda")


def test_bad_options_are_refused(onnx_model_dir):
    with pytest.raises(ValueError, match="provider"):
        Runtime(onnx_model_dir, provider="tpu")
    with pytest.raises(ValueError, match="pool"):
        Runtime(onnx_model_dir, pool="disk")
    with pytest.raises(ValueError, match="max_rows"):
        Runtime(onnx_model_dir, max_rows=0)
    with pytest.raises(ValueError, match="thread"):
        Runtime(onnx_model_dir, intra_op_threads=-1)


def test_thread_counts_are_accepted(onnx_model_dir):
    rt = Runtime(onnx_model_dir, provider="cpu", intra_op_threads=1, inter_op_threads=1)
    assert rt.solve(PROBLEMS) == Runtime(onnx_model_dir, provider="cpu").solve(PROBLEMS)


# ---- files that must be refused ------------------------------------------------------------


def test_corrupted_graph_is_refused(model_copy):
    path = model_copy / "executor_split.onnx"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip one byte
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match=r"executor_split\.onnx: SHA-256 .* corrupt"):
        Runtime(model_copy, provider="cpu")


def test_missing_graph_is_refused(model_copy):
    (model_copy / "pool_write.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"pool_write\.onnx: missing"):
        Runtime(model_copy, provider="cpu")


def test_missing_or_broken_manifest_is_refused(model_copy):
    manifest = model_copy / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"manifest\.json: unreadable"):
        Runtime(model_copy, provider="cpu")
    manifest.unlink()
    with pytest.raises(ModelLoadError, match=r"manifest\.json: missing"):
        Runtime(model_copy, provider="cpu")


def _edit_manifest(model_dir: Path, edit) -> None:
    path = model_dir / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def test_checksum_in_the_manifest_that_does_not_match_is_refused(model_copy):
    def edit(m):
        m["graphs"]["compiler"]["sha256"] = "0" * 64

    _edit_manifest(model_copy, edit)
    with pytest.raises(ModelLoadError, match=r"compiler\.onnx: SHA-256 .* does not match"):
        Runtime(model_copy, provider="cpu")


def test_graph_from_another_export_is_refused(model_copy):
    """A file whose checksum the manifest was edited to accept, but whose inputs are not
    the ones the manifest names for it."""
    shutil.copy(model_copy / "executor.onnx", model_copy / "executor_split.onnx")
    sha = __import__("hashlib").sha256((model_copy / "executor.onnx").read_bytes()).hexdigest()

    def edit(m):
        m["graphs"]["executor_split"]["sha256"] = sha

    _edit_manifest(model_copy, edit)
    with pytest.raises(ModelLoadError, match=r"executor_split\.onnx: inputs .* differ"):
        Runtime(model_copy, provider="cpu")


def test_unloadable_graph_is_refused(model_copy):
    path = model_copy / "compiler.onnx"
    path.write_bytes(b"this is not an onnx model")
    sha = __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    _edit_manifest(model_copy, lambda m: m["graphs"]["compiler"].__setitem__("sha256", sha))
    with pytest.raises(ModelLoadError, match=r"compiler\.onnx: onnxruntime cannot load it"):
        Runtime(model_copy, provider="cpu")


def test_manifest_of_another_format_is_refused(model_copy):
    _edit_manifest(model_copy, lambda m: m.__setitem__("format", 99))
    with pytest.raises(ModelLoadError, match="format 99"):
        read_manifest(model_copy)


def test_embedding_that_is_not_a_vocab_by_embed_table_is_refused(model_copy):
    _edit_manifest(model_copy, lambda m: m["executor_embedding"]["values"].pop())
    with pytest.raises(ModelLoadError, match=r"executor_embedding is not a \[vocab, embed\]"):
        read_manifest(model_copy)


def test_export_without_an_embedding_still_serves(model_copy, runtimes):
    """Exports made before the manifest carried the embedding serve as before; the runtime
    says with None that their programs cannot be replayed."""
    _edit_manifest(model_copy, lambda m: m.pop("executor_embedding"))
    rt = Runtime(model_copy, provider="cpu")
    assert rt.executor_embedding is None
    assert rt.solve(PROBLEMS) == runtimes["host"].solve(PROBLEMS)


# ---- the pool API --------------------------------------------------------------------------


def test_encode_pads_and_rejects_unknown_characters(runtimes):
    rt = runtimes["host"]
    ids = rt.encode(["1+2=", "10+20="])
    assert ids.dtype == np.int64 and ids.shape == (2, 6)
    assert ids[0, 4:].tolist() == [rt.pad_id, rt.pad_id]
    assert rt.decode(rt.encode(["12+3="])[0]) == "12+3="
    with pytest.raises(ValueError, match="'x' not in the vocabulary"):
        rt.encode(["1x+2="])


@pytest.mark.parametrize("kind", ["host", "device"])
def test_compile_writes_program_and_initial_state(runtimes, kind):
    rt = runtimes[kind]
    rt.compile(rt.encode(PROBLEMS[:2]), [9, 4])
    program = rt.read_program(4)
    assert program.shape == (rt.program_size,)
    h0 = next(p for p in rt.manifest["program"]["layout"] if p["name"] == "h0")
    np.testing.assert_array_equal(rt.read_hidden(4), program[h0["offset"] :][: h0["size"]])
    # the same problem compiled alone gives the same program
    rt.compile(rt.encode(PROBLEMS[1:2]), [0])
    np.testing.assert_allclose(rt.read_program(0), program, atol=1e-5)


def test_rows_joining_between_steps_match_solving_alone(runtimes):
    """Continuous batching: rows compiled at different times, stepped together, in any row
    order and in both pools, emit exactly what each problem emits alone."""
    alone = {p: runtimes["host"].solve([p])[0] for p in PROBLEMS}
    for kind, rt in runtimes.items():
        rows = {PROBLEMS[0]: 11, PROBLEMS[1]: 2, PROBLEMS[2]: 7, PROBLEMS[3]: 3, PROBLEMS[4]: 15}
        emitted = {p: [] for p in PROBLEMS}
        prev = {}
        waiting = list(PROBLEMS)
        for step in range(40):
            if waiting and step % 2 == 0:  # one problem joins every other step
                p = waiting.pop(0)
                rt.compile(rt.encode([p]), [rows[p]])
                prev[p] = rt.start_id
            live = [p for p in prev if not emitted[p] or emitted[p][-1] != rt.end_id]
            if not live and not waiting:
                break
            if not live:
                continue
            tokens = rt.step([rows[p] for p in live], np.array([prev[p] for p in live]))
            for p, t in zip(live, tokens):
                emitted[p].append(int(t))
                prev[p] = int(t)
        got = {p: rt.decode(emitted[p]) for p in PROBLEMS}
        assert got == alone, kind


def test_host_and_device_pools_agree(runtimes):
    host, device = runtimes["host"], runtimes["device"]
    rows = np.array([5, 1, 12, 3, 8])  # scattered, out of order
    for rt in (host, device):
        rt.compile(rt.encode(PROBLEMS), rows)
    prev = np.full(len(rows), host.start_id, dtype=np.int64)
    for _ in range(4):
        t_h, logits_h = host.step_logits(rows, prev)
        t_d, logits_d = device.step_logits(rows, prev)
        np.testing.assert_array_equal(t_h, t_d)
        np.testing.assert_allclose(logits_h, logits_d, atol=1e-5)
        assert logits_h.shape == (len(rows), len(host.vocab))
        assert np.array_equal(t_h, logits_h.argmax(-1))
        for r in rows:
            np.testing.assert_allclose(host.read_hidden(r), device.read_hidden(r), atol=1e-5)
        prev = t_h
    # contiguous rows take the zero-copy path of the host pool; same answers
    assert host.solve(PROBLEMS) == device.solve(PROBLEMS)


@pytest.mark.parametrize("kind", ["host", "device"])
def test_stepping_leaves_other_rows_alone(runtimes, kind):
    rt = runtimes[kind]
    rt.compile(rt.encode(PROBLEMS[:3]), [0, 1, 2])
    before = [rt.read_hidden(r) for r in range(3)]
    rt.step([1], np.array([rt.start_id]))
    after = [rt.read_hidden(r) for r in range(3)]
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[2], after[2])
    assert not np.array_equal(before[1], after[1])


def test_generate_pads_finished_rows_with_end(runtimes):
    rt = runtimes["host"]
    tokens = rt.generate(rt.encode(PROBLEMS * 5))  # more problems than pool rows
    assert tokens.shape[0] == len(PROBLEMS) * 5 and tokens.shape[1] <= rt.max_steps
    answers = [rt.decode(row) for row in tokens]
    assert answers == rt.solve(PROBLEMS) * 5
    for row in tokens:
        ends = np.flatnonzero(row == rt.end_id)
        if len(ends):
            assert (row[ends[0] :] == rt.end_id).all()


@pytest.mark.parametrize("kind", ["host", "device"])
def test_bad_calls_are_refused_and_leave_the_pool_alone(runtimes, kind):
    rt = runtimes[kind]
    rt.compile(rt.encode(PROBLEMS[:2]), [0, 1])
    hidden = rt.read_hidden(0)
    start = np.array([rt.start_id, rt.start_id])
    with pytest.raises(ValueError, match="must not repeat"):
        rt.step([0, 0], start)
    with pytest.raises(ValueError, match="lie in 0..15"):
        rt.step([0, 16], start)
    with pytest.raises(ValueError, match="int64 of shape"):
        rt.step([0, 1], start.astype(np.int32))
    with pytest.raises(ValueError, match="int64 of shape"):
        rt.step([0, 1], start[:1])
    with pytest.raises(ValueError, match="vocabulary's range"):
        rt.step([0, 1], np.array([0, 99]))
    with pytest.raises(ValueError, match="2 problems but 1 rows"):
        rt.compile(rt.encode(PROBLEMS[:2]), [3])
    with pytest.raises(ValueError, match="int64 array"):
        rt.compile(rt.encode(PROBLEMS[:1]).astype(np.float32), [3])
    with pytest.raises(ValueError, match="rows must be"):
        rt.compile(rt.encode(PROBLEMS[:1]), [[3]])
    with pytest.raises(ValueError, match="row must lie"):
        rt.read_program(99)
    np.testing.assert_array_equal(rt.read_hidden(0), hidden)
    # nothing to do is not an error
    assert rt.step([], np.zeros(0, np.int64)).shape == (0,)


def test_runtime_exposes_what_the_scheduler_needs(runtimes):
    rt = runtimes["host"]
    m = rt.manifest
    assert rt.model_version == m["model_version"]
    assert rt.vocab[rt.start_id] == "<start>" and rt.vocab[rt.end_id] == "<end>"
    assert rt.max_digits == m["config"]["max_digits"]
    assert rt.max_steps == m["config"]["max_steps"]
    assert rt.hidden_size == m["config"]["hidden"]
    assert rt.program_size == m["program"]["size"]
    assert rt.program_layout == m["program"]["layout"]
    emb = m["executor_embedding"]
    assert rt.executor_embedding.dtype == np.float32
    np.testing.assert_array_equal(rt.executor_embedding, np.asarray(emb["values"], np.float32))
    assert rt.graphs == {"compiler": "compiler.onnx", "executor": "executor_split.onnx"}
    assert runtimes["device"].graphs == {
        "compiler": "compiler.onnx",
        "pool_write": "pool_write.onnx",
        "executor": "executor_pool.onnx",
    }


def test_command_line_solves(onnx_model_dir):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.runtime",
            "--model-dir",
            str(onnx_model_dir),
            "--provider",
            "cpu",
            "1+2=",
            "7669+10132=",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "CPUExecutionProvider" in out and "1+2=" in out and "7669+10132=" in out

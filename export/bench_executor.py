"""Executor timings on the CPU: one step per call versus K steps unrolled in one graph, and the
cost of the runtime's pool (contiguous rows, scattered rows, host vs device pool).

    python -m export.bench_executor --checkpoint models/trex.pt
    python -m export.bench_executor --checkpoint runs/try1.pt --batches 1,16,64,256 --threads 1

Exports the checkpoint into a scratch folder (plus an unrolled ``executor_k<K>.onnx`` that is
only measured, never served) and prints tables in microseconds; the figures in
export/DESIGN.md come from this command. Median of ``--repeats`` runs after a warm-up; the
last column of the first table is what the unrolled graph saves per step over the served
one-step graph.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export import graphs, onnx_export
from service.runtime import Runtime
from training import data

log = logging.getLogger(__name__)


def median_us(fns, repeats: int, warmup: int = 3) -> list[float]:
    """Median microseconds per call of each function; the functions take turns, so a change
    of load on a shared machine hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [1e6 * statistics.median(t) for t in times]


def bench_k_steps(model, d: Path, k: int, batches: list[int], threads: int, repeats: int):
    """k greedy steps three ways, each row bringing its own program and hidden state:
    executor.onnx (flat program) called k times, executor_split.onnx (program split once,
    as the runtime's pool keeps it) called k times, and an unrolled k-step graph called once.
    """
    sig = graphs.signatures(model)["executor"]
    k_sig = graphs.Signature(
        inputs=sig.inputs,
        outputs=(
            ("tokens_out", "int64", ("batch", k)),
            ("hidden_out", "float32", ("batch", model.cfg.hidden)),
        ),
    )
    k_path = d / f"executor_k{k}.onnx"
    graphs.export_graph(
        graphs.wrapper(model, "executor_k", k),
        graphs.example_inputs(model, "executor_k"),
        k_sig,
        k_path,
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1

    def session(path):
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    flat, split, many = (
        session(d / "executor.onnx"),
        session(d / "executor_split.onnx"),
        session(k_path),
    )
    layout = model.executor.layout
    step = graphs.step_parts(model)
    rows = []
    for B in batches:
        texts = [f"{7669 + 37 * i}+{10132 * (i + 1)}=" for i in range(B)]
        ids = data.encode_problems(texts)
        with torch.no_grad():
            programs = model.compiler(ids)  # (B, P)
        parts = {n: v.contiguous().numpy() for n, v in layout.split(programs).items()}
        programs = programs.numpy()
        start = np.full(B, 1, np.int64)

        stepwise_flat, stepwise_split, unrolled = _k_step_runs(
            flat, split, many, k, programs, parts, step, start
        )

        # the same tokens every way
        assert np.array_equal(stepwise_flat(), unrolled()[:, -1])
        assert np.array_equal(stepwise_split(), unrolled()[:, -1])
        rows.append((B, *median_us([stepwise_flat, stepwise_split, unrolled], repeats)))
    return rows


def _k_step_runs(flat, split, many, k, programs, parts, step, start):
    """The three ways to run k greedy steps, as functions of no arguments."""
    h0 = parts["h0"]

    def stepwise_flat():
        tok, h = start, h0
        for _ in range(k):
            tok, h, _ = flat.run(None, {"programs": programs, "hidden": h, "tokens": tok})
        return tok

    def stepwise_split():
        tok, h = start, h0
        for _ in range(k):
            feed = {n: parts[n] for n in step} | {"hidden": h, "tokens": tok}
            tok, h, _ = split.run(None, feed)
        return tok

    def unrolled():
        return many.run(None, {"programs": programs, "hidden": h0, "tokens": start})[0]

    return stepwise_flat, stepwise_split, unrolled


def bench_pool(d: Path, batches: list[int], threads: int, repeats: int, max_rows: int):
    """Runtime.step per call: host pool on contiguous rows (zero-copy slices), host pool on
    scattered rows (gathered copies), device pool (Gather/ScatterND in the graph, here on
    the CPU); and Runtime.compile per call for both pools."""
    out = []
    rts = {
        kind: Runtime(
            d,
            provider="cpu",
            intra_op_threads=threads,
            inter_op_threads=1,
            max_rows=max_rows,
            pool=kind,
        )
        for kind in ("host", "device")
    }
    rng = np.random.default_rng(0)
    for B in batches:
        texts = [f"{123 + 7 * i}+{4567 * (i + 1)}=" for i in range(B)]
        contiguous = np.arange(B, dtype=np.int64)
        scattered = np.sort(rng.choice(max_rows, B, replace=False)).astype(np.int64)
        tokens = np.full(B, rts["host"].start_id, np.int64)
        row = {"batch": B}
        for kind, rt in rts.items():
            ids = rt.encode(texts)
            rt.compile(ids, contiguous)
            rt.compile(ids, scattered)
            steps = [partial(rt.step, contiguous, tokens), partial(rt.step, scattered, tokens)]
            row[f"{kind} contiguous"], row[f"{kind} scattered"] = median_us(steps, repeats)
            (row[f"{kind} compile"],) = median_us(
                [partial(rt.compile, ids, scattered)], repeats // 4 + 1
            )
        out.append(row)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", default="models/trex.pt")
    ap.add_argument(
        "--k",
        type=int,
        default=0,
        help="steps per call of the unrolled graph (0: the model's max_steps)",
    )
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--max-rows", type=int, default=512, help="pool size for the pool figures")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    batches = [int(b) for b in args.batches.split(",")]
    if max(batches) > args.max_rows:
        ap.error("--max-rows must be at least the largest batch")

    model, _ = onnx_export.load_checkpoint(args.checkpoint)
    k = args.k or model.cfg.max_steps
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        onnx_export.export(args.checkpoint, d)
        ks = bench_k_steps(model, d, k, batches, args.threads, args.repeats)
        pool = bench_pool(d, batches, args.threads, args.repeats, args.max_rows)

    print(f"CPU, {args.threads} intra-op thread(s), median of {args.repeats}; microseconds")
    print(
        f"\n{k} greedy steps: {k} calls of executor.onnx (flat program), {k} calls of "
        f"executor_split.onnx, 1 call of executor_k{k}.onnx (unrolled)"
    )
    print(
        f"{'batch':>6} {f'{k} x flat':>10} {f'{k} x split':>10} {f'1 x {k} steps':>13} "
        f"{'unrolled vs split':>18} {'per step':>9}"
    )
    for B, t_flat, t_split, t_k in ks:
        print(
            f"{B:>6} {t_flat:>10.0f} {t_split:>10.0f} {t_k:>13.0f} "
            f"{100 * (t_k / t_split - 1):>17.1f}% {(t_split - t_k) / k:>9.1f}"
        )
    cols = [c for c in pool[0] if c != "batch"]
    print("\nRuntime calls: step (one token for every row) and compile (one pass)")
    print(f"{'batch':>6} " + " ".join(f"{c:>18}" for c in cols))
    for row in pool:
        print(f"{row['batch']:>6} " + " ".join(f"{row[c]:>18.0f}" for c in cols))


if __name__ == "__main__":
    main()

"""Timings of the baseline's served calls on the CPU: the prefill (compile phase) and one decode
step (execute phase) through ``service.runtime.Runtime``, and what passing each row's whole
fixed-size cache costs against a cache trimmed to the rows' longest length.

    python -m export.bench_baseline --model-dir models/onnx-baseline
    python -m export.bench_baseline --checkpoint runs/baseline1.pt --batches 1,16,64,256

``--checkpoint`` exports into a scratch folder first. Tables are medians in microseconds of
``--repeats`` calls after a warm-up, the ways of a table taking turns so that a change of load
on a shared machine hits them alike; export/DESIGN.md has figures from this command.

* Runtime.step: one decode pass for ``batch`` rows whose caches hold a prefilled problem and
  a few answer tokens, the rows consecutive (read in place) or scattered over the pool
  (gathered copies); Runtime.compile: one prefill pass of ``batch`` held-out problems.
* decode.onnx directly on consecutive rows: the pool's whole ``max_len`` cache rows, as the
  runtime passes them, against copies trimmed to the longest filled length.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from export.bench_executor import median_us
from service.runtime import Runtime
from training import data

log = logging.getLogger(__name__)

DECODED = 3  # answer tokens fed back before the step that is timed


def bench(model_dir: Path, batches: list[int], threads: int, repeats: int, max_rows: int):
    rt = Runtime(
        model_dir,
        provider="cpu",
        intra_op_threads=threads,
        inter_op_threads=1,
        max_rows=max_rows,
        kind="baseline",
    )
    pool = rt._pool  # NOTE: the decode table reads the host pool's arrays directly
    rng = np.random.default_rng(0)
    problems = [p.text for p in data.held_out_set(max(batches), seed=99)]
    out = []
    for B in batches:
        ids = rt.encode(problems[:B])
        consecutive = np.arange(B, dtype=np.int64)
        scattered = np.sort(rng.choice(max_rows, B, replace=False)).astype(np.int64)
        for rows in (consecutive, scattered):
            tokens = rt.compile(ids, rows)
            for _ in range(DECODED):
                tokens = rt.step(rows, tokens)
        row = {"batch": B}
        step = partial(_step_in_place, rt, pool.length.copy(), pool.emitted.copy(), tokens)
        row["step consecutive"], row["step scattered"] = median_us(
            [partial(step, consecutive), partial(step, scattered)], repeats
        )

        # decode.onnx on the whole cache rows vs rows trimmed to the longest filled length
        K = int(pool.length[:B].max())
        decode = partial(_decode, pool, B, K, tokens)
        row["decode whole cache"], row["decode trimmed"] = median_us(
            [partial(decode, False), partial(decode, True)], repeats
        )
        # last: it resets the rows it prefills
        (row["compile"],) = median_us([partial(rt.compile, ids, scattered)], repeats // 4 + 1)
        row["trimmed length"] = K
        out.append(row)
    return rt, out


def _step_in_place(rt: Runtime, length, emitted, tokens, rows) -> None:
    """One Runtime.step, then the rows' counters rewound, so that every timed step writes
    the same position and no row runs out of steps."""
    rt.step(rows, tokens)
    rt._pool.length[:], rt._pool.emitted[:] = length, emitted


def _decode(pool, B: int, K: int, tokens, trim: bool) -> None:
    """decode.onnx on pool rows 0..B-1: their whole caches, or copies of their first K
    positions (a copy: the length axis is not the outermost one)."""
    cache = {
        "past_k": pool.k[:B],  # (B, max_len, n_layers, h, dh), read in place
        "past_v": pool.v[:B],
        "past_places": pool.places[:B],
        "past_ok": pool.ok[:B],
    }
    if trim:
        cache = {n: np.ascontiguousarray(a[:, :K]) for n, a in cache.items()}
    feed = {"tokens": tokens, "steps": pool.emitted[:B], **cache}
    pool.decoder.run(["next_tokens", "k", "v"], feed)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model-dir", default="models/onnx-baseline", help="a baseline export")
    src.add_argument("--checkpoint", help="a baseline checkpoint, exported to a scratch folder")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--max-rows", type=int, default=512, help="pool size")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    batches = [int(b) for b in args.batches.split(",")]
    if max(batches) > args.max_rows:
        ap.error("--max-rows must be at least the largest batch")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir)
        if args.checkpoint:
            from export import onnx_export  # imports torch; not needed for an export

            model_dir = Path(tmp)
            onnx_export.export(args.checkpoint, model_dir)
        rt, rows = bench(model_dir, batches, args.threads, args.repeats, args.max_rows)

    c = rt.cache
    print(
        f"{rt.model_version}: CPU, {args.threads} intra-op thread(s), pool of {args.max_rows} "
        f"rows x {c['max_len']} positions, median of {args.repeats}; microseconds"
    )
    cols = [c for c in rows[0] if c not in ("batch", "trimmed length")]
    print(f"{'batch':>6} " + " ".join(f"{c:>18}" for c in cols) + f" {'trimmed length':>15}")
    for row in rows:
        print(
            f"{row['batch']:>6} "
            + " ".join(f"{row[c]:>18.0f}" for c in cols)
            + f" {row['trimmed length']:>15}"
        )


if __name__ == "__main__":
    main()

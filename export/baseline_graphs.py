"""The graphs ``trex-export`` writes for a baseline checkpoint (training/baseline.py): a prefill
graph over the whole problem and a one-token decode graph that reads a key-value cache.

    trex-export --checkpoint models/baseline.pt --out models/onnx-baseline

    prefill.onnx  ids (batch, seq) int64
                  -> next_tokens (batch,) int64, logits (batch, V),
                     k, v (batch, seq, n_layers, h, dh), places (batch, seq) int64,
                     key_ok (batch, seq) bool
    decode.onnx   tokens (batch,) int64, steps (batch,) int64, past_k, past_v
                  (batch, cache, n_layers, h, dh), past_places (batch, cache) int64,
                  past_ok (batch, cache) bool
                  -> next_tokens (batch,) int64, logits (batch, V),
                     k, v (batch, n_layers, h, dh): the fed token's key and value

``tokens`` are the answer tokens emitted last and ``steps`` their index + 1 (1 for the token
the prefill emitted), as in ``Baseline.decode``. The argmax is inside both graphs, so only
token ids have to leave them on the serving path.

Cache layout: the graphs take and give keys and values position-major per row,
(batch, position, n_layers, h, dh), not the model's (n_layers, batch, h, position, dh), and
transpose at their edges. The runtime keeps one cache row per pool row in that layout, so
that a run of consecutive pool rows is one contiguous block ONNX Runtime reads in place and a
decode step's new key and value land at ``[row, position]`` with one indexed write; the
transposes inside the graphs touch only the rows of the call. ``cache`` is dynamic: the
runtime passes its whole fixed-size cache with ``past_ok`` false beyond each row's length
(masked keys get -1e9 before the softmax, exactly zero weight in float32).

Both graphs run ``Baseline.prefill`` / ``Baseline.decode`` themselves, traced, so the exported
arithmetic is the model's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
from torch import nn

from export import graphs
from export.graphs import OPSET, Signature
from training import data
from training.baseline import Baseline

log = logging.getLogger(__name__)

GRAPH_NAMES = ("prefill", "decode")


def cache_shape(model: Baseline) -> dict[str, int]:
    """Sizes the runtime needs to lay out its cache pool."""
    cfg = model.cfg
    problem_len = 2 * cfg.max_digits + 2  # a+b= with both operands at max_digits
    return {
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "n_places": cfg.n_places,
        "max_problem_len": problem_len,
        # the last token emitted is never fed back, so max_steps - 1 decode positions
        "max_len": problem_len + cfg.max_steps - 1,
    }


class PrefillGraph(nn.Module):
    def __init__(self, model: Baseline):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor):
        logits, k, v, places, key_ok = self.model.prefill(ids)
        # k, v (n_layers, B, h, T, dh) -> (B, T, n_layers, h, dh)
        k, v = k.permute(1, 3, 0, 2, 4), v.permute(1, 3, 0, 2, 4)
        return logits.argmax(-1), logits, k, v, places, key_ok


class DecodeGraph(nn.Module):
    def __init__(self, model: Baseline):
        super().__init__()
        self.model = model

    def forward(self, tokens, steps, past_k, past_v, past_places, past_ok):
        # past_k, past_v (B, K, n_layers, h, dh) -> (n_layers, B, h, K, dh)
        pk, pv = past_k.permute(2, 0, 3, 1, 4), past_v.permute(2, 0, 3, 1, 4)
        logits, k, v = self.model.decode(tokens, steps, pk, pv, past_places, past_ok)
        # k, v (n_layers, B, h, 1, dh) -> (B, n_layers, h, dh)
        k, v = k[:, :, :, 0].transpose(0, 1), v[:, :, :, 0].transpose(0, 1)
        return logits.argmax(-1), logits, k, v


def signatures(model: Baseline) -> dict[str, Signature]:
    c = cache_shape(model)
    L, h, dh = c["n_layers"], c["n_heads"], c["head_dim"]
    V = model.cfg.vocab_size
    f32, i64, b = "float32", "int64", "bool"
    head = (("next_tokens", i64, ("batch",)), ("logits", f32, ("batch", V)))
    return {
        "prefill": Signature(
            inputs=(("ids", i64, ("batch", "seq")),),
            outputs=head
            + (
                ("k", f32, ("batch", "seq", L, h, dh)),
                ("v", f32, ("batch", "seq", L, h, dh)),
                ("places", i64, ("batch", "seq")),
                ("key_ok", b, ("batch", "seq")),
            ),
        ),
        "decode": Signature(
            inputs=(
                ("tokens", i64, ("batch",)),
                ("steps", i64, ("batch",)),
                ("past_k", f32, ("batch", "cache", L, h, dh)),
                ("past_v", f32, ("batch", "cache", L, h, dh)),
                ("past_places", i64, ("batch", "cache")),
                ("past_ok", b, ("batch", "cache")),
            ),
            outputs=head + (("k", f32, ("batch", L, h, dh)), ("v", f32, ("batch", L, h, dh))),
        ),
    }


def example_inputs(model: Baseline, name: str) -> tuple[torch.Tensor, ...]:
    """Inputs to trace ``name`` with: two rows of different lengths, so padding is traced,
    and for decode a cache longer than the problems with masked positions at its end."""
    ids = data.encode_problems(["7669+10132=", "12+345="])  # (2, 11)
    if name == "prefill":
        return (ids,)
    if name != "decode":
        raise ValueError(f"no baseline graph {name!r}")
    with torch.no_grad():
        logits, k, v, places, ok = model.prefill(ids)
    B, T, extra = ids.shape[0], ids.shape[1], 3
    # (n_layers, B, h, T, dh) -> (B, T + extra, n_layers, h, dh), the extra positions masked
    pad = torch.zeros(B, extra, *k.permute(1, 3, 0, 2, 4).shape[2:])
    past_k = torch.cat([k.permute(1, 3, 0, 2, 4), pad], dim=1)
    past_v = torch.cat([v.permute(1, 3, 0, 2, 4), pad], dim=1)
    past_places = torch.cat([places, torch.zeros(B, extra, dtype=torch.long)], dim=1)
    past_ok = torch.cat([ok, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    tokens = logits.argmax(-1)
    steps = torch.ones(B, dtype=torch.long)
    assert past_k.shape[1] == T + extra
    return (tokens, steps, past_k, past_v, past_places, past_ok)


def wrapper(model: Baseline, name: str) -> nn.Module:
    classes = {"prefill": PrefillGraph, "decode": DecodeGraph}
    if name not in classes:
        raise ValueError(f"no baseline graph {name!r}")
    return classes[name](model).eval()


def export_graph(model: Baseline, name: str, path: Path, opset: int = OPSET) -> None:
    """Trace graph ``name`` into ``path`` with ``export.graphs.export_graph``, then write the
    fixed sizes of its outputs into the file.

    NOTE: the tracer leaves the head axes of k and v symbolic ('Transposek_dim_3'), since the
    model computes them from the input's shape (``C // h``); the runtime checks fixed sizes
    against the manifest, so they are pinned here from the signature. ``onnx.checker`` with
    ``full_check`` then verifies them against the graph's own shape inference.
    """
    sig = signatures(model)[name]
    graphs.export_graph(wrapper(model, name), example_inputs(model, name), sig, path, opset)
    proto = onnx.load(str(path))
    for out, (_, _, shape) in zip(proto.graph.output, sig.outputs):
        dims = out.type.tensor_type.shape.dim
        for dim, want in zip(dims, shape):
            if isinstance(want, int):
                dim.Clear()
                dim.dim_value = want
    onnx.save(proto, str(path))

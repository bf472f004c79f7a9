"""The graphs written by ``trex-export``: torch wrappers around the trained modules, their
ONNX input/output signatures, and one function that exports any of them.

    compiler.onnx        ids (batch, seq) int64 -> programs (batch, P)
    executor.onnx        programs (batch, P), hidden (batch, H), tokens (batch,) int64
                         -> next_tokens (batch,) int64, next_hidden (batch, H), logits (batch, V)
    executor_split.onnx  w_ih (batch, 3H, E), w_hh (batch, 3H, H), b_ih (batch, 3H),
                         b_hh (batch, 3H), w_out (batch, V, H), b_out (batch, V), hidden, tokens
                         -> next_tokens, next_hidden, logits (as executor.onnx)
    pool_write.onnx      pool_<part> (N, *shape) for every part of the program layout (h0
                         included), pool_hidden (N, H), rows (batch,) int64, programs (batch, P)
                         -> pool_<part>_out (N, *shape) ..., pool_hidden_out (N, H)
    executor_pool.onnx   pool_<part> (N, *shape) for the parts a step reads (all but h0),
                         pool_hidden (N, H), rows (batch,) int64, tokens (batch,) int64
                         -> next_tokens (batch,) int64, pool_hidden_out (N, H), logits (batch, V)

N is the dynamic axis ``pool_rows``, the runtime's pool size. ``executor.onnx`` is the
portable one-step graph, one flat program per row. The others serve: a program is split into
its parts once, when it is written into the pool, instead of at every step (the executor's
slicing of a flat program copies it whole each step, which on the CPU doubled a step's time;
export/DESIGN.md has the figures). ``executor_split`` runs on parts the host hands it,
``pool_write`` and ``executor_pool`` keep the pool in device memory and gather or scatter
the rows inside the graph.

Every executor graph runs the trained ``Executor.step`` itself, traced; the split ones give
it the program already split (``_PreSplit``), so the exported arithmetic is the model's.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training import data
from training.model import Executor, TRex

log = logging.getLogger(__name__)

OPSET = 17
GRAPH_NAMES = ("compiler", "executor", "executor_split", "pool_write", "executor_pool")


def step_parts(model: TRex) -> list[str]:
    """The program parts one executor step reads: all of them but the initial state."""
    return [n for n in model.executor.layout.shapes if n != "h0"]


class _PreSplit:
    """Stands in for ``ProgramLayout`` in a copy of the executor whose programs arrive
    already split.

    NOTE: this relies on ``Executor.step`` reading the program only through
    ``self.layout.split(programs)``; were that to change, tracing fails loudly (a dict is
    not a tensor) and the parity checks would catch any quieter difference.
    """

    def split(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return parts


def _presplit(executor: Executor) -> Executor:
    ex = copy.copy(executor)  # shares the embedding and every other parameter
    ex.layout = _PreSplit()
    return ex


class CompilerGraph(nn.Module):
    def __init__(self, model: TRex):
        super().__init__()
        self.compiler = model.compiler

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.compiler(ids)  # (B, T) -> (B, P)


class ExecutorGraph(nn.Module):
    """One greedy step; the argmax is inside the graph so only token ids need leave it."""

    def __init__(self, model: TRex):
        super().__init__()
        self.executor = model.executor

    def forward(self, programs, hidden, tokens):
        logits, h = self.executor.step(programs, hidden, tokens)  # (B, V), (B, H)
        return logits.argmax(-1), h, logits


class ExecutorSplitGraph(nn.Module):
    """``ExecutorGraph`` with the program given as its parts: inputs are the step parts, in
    layout order, then hidden and tokens."""

    def __init__(self, model: TRex):
        super().__init__()
        self.executor = _presplit(model.executor)
        self.parts = step_parts(model)

    def forward(self, *inputs):
        parts = dict(zip(self.parts, inputs))
        hidden, tokens = inputs[len(self.parts) :]
        logits, h = self.executor.step(parts, hidden, tokens)
        return logits.argmax(-1), h, logits


class ExecutorKStepsGraph(nn.Module):
    """``k`` greedy steps unrolled in one graph; used only to measure against one step per
    call (export/bench_executor.py), not served."""

    def __init__(self, model: TRex, k: int):
        super().__init__()
        self.executor = model.executor
        self.k = k

    def forward(self, programs, hidden, tokens):
        out = []
        for _ in range(self.k):
            logits, hidden = self.executor.step(programs, hidden, tokens)
            tokens = logits.argmax(-1)  # (B,)
            out.append(tokens)
        return torch.stack(out, 1), hidden  # (B, k), (B, H)


class PoolWriteGraph(nn.Module):
    """New programs, split into parts, and their initial hidden states into the pool at
    ``rows``. Inputs: one pool per layout part, pool_hidden, rows, programs."""

    def __init__(self, model: TRex):
        super().__init__()
        layout = model.executor.layout
        self.parts = [(layout.offsets[n], layout.shapes[n]) for n in layout.shapes]
        self.h0 = layout.offsets["h0"]

    def forward(self, *inputs):
        n = len(self.parts)
        pools, pool_hidden, rows, programs = inputs[:n], inputs[n], inputs[n + 1], inputs[n + 2]
        B = programs.shape[0]
        out = []
        for pool, ((a, b), shape) in zip(pools, self.parts):
            part = programs[:, a:b].reshape(B, *shape)  # (B, P) -> (B, *shape)
            out.append(pool.index_put((rows,), part))  # ScatterND: (N, *shape) at rows
        a, b = self.h0
        return (*out, pool_hidden.index_put((rows,), programs[:, a:b]))  # (N, H) at rows


class ExecutorPoolGraph(nn.Module):
    """One greedy step of the pool rows ``rows``; the whole hidden pool comes back updated.
    Inputs: one pool per step part, pool_hidden, rows, tokens."""

    def __init__(self, model: TRex):
        super().__init__()
        self.executor = _presplit(model.executor)
        self.parts = step_parts(model)

    def forward(self, *inputs):
        n = len(self.parts)
        pools, pool_hidden, rows, tokens = inputs[:n], inputs[n], inputs[n + 1], inputs[n + 2]
        parts = {name: pool.index_select(0, rows) for name, pool in zip(self.parts, pools)}
        hidden = pool_hidden.index_select(0, rows)  # (N, H) -> (B, H)
        logits, h = self.executor.step(parts, hidden, tokens)
        return logits.argmax(-1), pool_hidden.index_put((rows,), h), logits


@dataclass(frozen=True)
class Signature:
    """Names, element types and symbolic shapes of a graph's inputs and outputs."""

    inputs: tuple[tuple[str, str, tuple], ...]
    outputs: tuple[tuple[str, str, tuple], ...]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            name: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
            for name, _, shape in self.inputs + self.outputs
        }

    def to_json(self) -> dict:
        def describe(items):
            return [{"name": n, "dtype": t, "shape": list(s)} for n, t, s in items]

        return {"inputs": describe(self.inputs), "outputs": describe(self.outputs)}


def signatures(model: TRex) -> dict[str, Signature]:
    cfg = model.cfg
    shapes = model.executor.layout.shapes
    P, H, V = model.executor.layout.size, cfg.hidden, cfg.vocab_size
    f32, i64 = "float32", "int64"
    step = step_parts(model)
    outputs = (
        ("next_tokens", i64, ("batch",)),
        ("next_hidden", f32, ("batch", H)),
        ("logits", f32, ("batch", V)),
    )
    state = (("hidden", f32, ("batch", H)), ("tokens", i64, ("batch",)))
    return {
        "compiler": Signature(
            inputs=(("ids", i64, ("batch", "seq")),),
            outputs=(("programs", f32, ("batch", P)),),
        ),
        "executor": Signature(inputs=(("programs", f32, ("batch", P)),) + state, outputs=outputs),
        "executor_split": Signature(
            inputs=tuple((n, f32, ("batch", *shapes[n])) for n in step) + state, outputs=outputs
        ),
        "pool_write": Signature(
            inputs=tuple((f"pool_{n}", f32, ("pool_rows", *s)) for n, s in shapes.items())
            + (
                ("pool_hidden", f32, ("pool_rows", H)),
                ("rows", i64, ("batch",)),
                ("programs", f32, ("batch", P)),
            ),
            outputs=tuple((f"pool_{n}_out", f32, ("pool_rows", *s)) for n, s in shapes.items())
            + (("pool_hidden_out", f32, ("pool_rows", H)),),
        ),
        "executor_pool": Signature(
            inputs=tuple((f"pool_{n}", f32, ("pool_rows", *shapes[n])) for n in step)
            + (
                ("pool_hidden", f32, ("pool_rows", H)),
                ("rows", i64, ("batch",)),
                ("tokens", i64, ("batch",)),
            ),
            outputs=(
                ("next_tokens", i64, ("batch",)),
                ("pool_hidden_out", f32, ("pool_rows", H)),
                ("logits", f32, ("batch", V)),
            ),
        ),
    }


def example_inputs(model: TRex, name: str) -> tuple[torch.Tensor, ...]:
    """Inputs to trace ``name`` with: two rows of different lengths, so padding is traced,
    and a pool larger than the batch, so no size is taken for another."""
    layout = model.executor.layout
    ids = data.encode_problems(["7669+10132=", "12+345="])  # (2, 11)
    with torch.no_grad():
        programs = model.compiler(ids)  # (2, P)
    parts = {n: p.contiguous() for n, p in layout.split(programs).items()}
    hidden = parts["h0"]  # (2, H)
    tokens = torch.tensor([1, 5], dtype=torch.long)
    rows = torch.tensor([3, 1], dtype=torch.long)
    pools = {n: torch.zeros(5, *s).index_put((rows,), parts[n]) for n, s in layout.shapes.items()}
    pool_hidden = torch.zeros(5, model.cfg.hidden)
    step = step_parts(model)
    if name == "compiler":
        return (ids,)
    if name in ("executor", "executor_k"):
        return (programs, hidden, tokens)
    if name == "executor_split":
        return (*(parts[n] for n in step), hidden, tokens)
    if name == "pool_write":
        return (*pools.values(), pool_hidden, rows, programs)
    if name == "executor_pool":
        return (*(pools[n] for n in step), pool_hidden.index_put((rows,), hidden), rows, tokens)
    raise ValueError(f"no graph {name!r}")


def wrapper(model: TRex, name: str, k: int | None = None) -> nn.Module:
    classes = {
        "compiler": CompilerGraph,
        "executor": ExecutorGraph,
        "executor_split": ExecutorSplitGraph,
        "pool_write": PoolWriteGraph,
        "executor_pool": ExecutorPoolGraph,
    }
    m = ExecutorKStepsGraph(model, k) if name == "executor_k" else classes[name](model)
    return m.eval()


def export_graph(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    sig: Signature,
    path: Path,
    opset: int = OPSET,
) -> None:
    """Trace ``module`` and write it to ``path`` with the axes of ``sig`` dynamic.

    NOTE: the TorchScript-based exporter (``dynamo=False``) is used on purpose. The
    torch.export one also gives a correct compiler graph (max program difference 4e-7
    measured) but took ~15x longer per graph, which the parity tests pay on every run;
    the project pins torch, and every export is checked against the torch model
    (``export.verify``), so a trace that did not generalise would not go unnoticed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # the deprecation notice of this exporter, and tracer notes about Python numbers
        # taken from fixed sizes (d_model / n_heads), which are constants of the model
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            inputs,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[n for n, _, _ in sig.inputs],
            output_names=[n for n, _, _ in sig.outputs],
            dynamic_axes=sig.dynamic_axes(),
            do_constant_folding=True,
        )
    log.info("wrote %s (%d bytes)", path, path.stat().st_size)

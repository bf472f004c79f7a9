"""The Inspect response: what the executor pool held for one served problem, as
trex.v1.InspectResponse.

The engine records (service/engine.py, ``Trace``); this module only lays the record out for
the wire: the program in full or as per-tensor statistics, the layout that names its parts,
the executor's shared token embedding and every step's hidden state, so that a client can
replay the executor with a plain GRU step (the recipe is in protos/trex/v1/trex.proto).
"""

from __future__ import annotations

import numpy as np

from protos.trex.v1 import trex_pb2
from service.engine import Trace
from service.errors import InvalidArgument
from service.runtime import Runtime
from service.scheduler import Request

DETAILS = (
    trex_pb2.PROGRAM_DETAIL_UNSPECIFIED,
    trex_pb2.PROGRAM_DETAIL_FULL,
    trex_pb2.PROGRAM_DETAIL_SUMMARY,
)


def program_detail(request: trex_pb2.InspectRequest) -> int:
    """The request's ProgramDetail, UNSPECIFIED read as FULL; raises InvalidArgument for a
    value this server does not know (proto3 lets a newer client send one)."""
    detail = request.program_detail
    if detail not in DETAILS:
        raise InvalidArgument(
            f"program_detail {detail} is not one of "
            f"{', '.join(trex_pb2.ProgramDetail.Name(d) for d in DETAILS)}"
        )
    return trex_pb2.PROGRAM_DETAIL_FULL if detail == DETAILS[0] else detail


def summarise(program: np.ndarray, layout: list[dict]) -> list[trex_pb2.TensorSummary]:
    """Per named tensor of ``program`` (P,): shape, mean, population std, min, max and L2
    norm, in float64 so that the figures do not depend on float32 summation order."""
    out = []
    for part in layout:
        values = program[part["offset"] : part["offset"] + part["size"]].astype(np.float64)
        out.append(
            trex_pb2.TensorSummary(
                name=part["name"],
                shape=part["shape"],
                mean=float(values.mean()),
                std=float(values.std()),
                min=float(values.min()),
                max=float(values.max()),
                l2_norm=float(np.sqrt(np.square(values).sum())),
            )
        )
    return out


def response(
    runtime: Runtime, request: Request, trace: Trace, *, detail: int, stop_reason: int, order: int
) -> trex_pb2.InspectResponse:
    """The InspectResponse of an answered, recorded request. ``detail``: a ProgramDetail
    (FULL or SUMMARY); ``stop_reason`` and ``order``: the request's StopReason and the model's
    DigitOrder, as the server writes them into a SolveResponse."""
    if trace.program is None or len(trace.hidden) != len(request.tokens):
        # one hidden state per executor step is the engine's promise; a reply without it
        # would mislead whoever replays it
        raise RuntimeError(
            f"request {request.id}: recorded {len(trace.hidden)} hidden states for "
            f"{len(request.tokens)} tokens"
            + ("" if trace.program is not None else ", and no program")
        )
    vocab = runtime.vocab
    tokens = [
        trex_pb2.Token(text=vocab[t], id=t, step=i, digit_order=order)
        for i, t in enumerate(request.tokens, start=1)
    ]
    layout = runtime.program_layout
    program = trex_pb2.Program(
        size=runtime.program_size,
        layout=[
            trex_pb2.TensorLayout(
                name=p["name"], shape=p["shape"], offset=p["offset"], size=p["size"]
            )
            for p in layout
        ],
    )
    if detail == trex_pb2.PROGRAM_DETAIL_SUMMARY:
        program.summary.extend(summarise(trace.program, layout))
    else:
        program.values.extend(trace.program.tolist())
    embedding = runtime.executor_embedding
    return trex_pb2.InspectResponse(
        problem=request.problem,
        answer=runtime.decode(request.tokens),
        tokens=tokens,
        stop_reason=stop_reason,
        program=program,
        embedding=trex_pb2.Embedding(shape=embedding.shape, values=embedding.ravel().tolist()),
        initial_hidden=trace.initial_hidden.tolist(),
        steps=[
            trex_pb2.ExecutorStep(token=token, hidden=hidden.tolist())
            for token, hidden in zip(tokens, trace.hidden)
        ],
        vocab=vocab,
        start_token_id=runtime.start_id,
        model_version=runtime.model_version,
    )

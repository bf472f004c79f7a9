"""Figures of one load point: throughput, latency, work per token, CPU, accuracy.

Forward passes: what the comparison is about is *transformer* forward passes per output
token. A T-REX answer costs one compiler pass (a transformer) and then one executor step
(a small GRU, not a transformer) per token; a baseline answer costs one transformer pass per
token, the prefill over the problem writing the first one. The service reports exactly that
as ``SolveResponse.compiler_passes`` (per answer) and ``trex_compiler_forward_passes_total``
(per server), for either kind of model, so the figures here need not know the kind.

Tokens are counted as the service counts them: every emitted token, ``<end>`` included.
Passes per token is taken from the responses, and again from the server's counters over the
window, as a check that the two agree.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from bench.load import Outcome, PointResult, Reply
from bench.problems import ALL, GROUPS, BenchProblem

log = logging.getLogger(__name__)


def transformer_passes(reply: Reply) -> int:
    """Transformer forward passes one answered request cost."""
    return reply.compiler_passes


def _delta(point: PointResult, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return point.after.samples.get(key, 0.0) - point.before.samples.get(key, 0.0)


def metrics_passes_per_token(point: PointResult) -> float | None:
    """Transformer passes per output token from the server's counters over the window."""
    tokens = _delta(point, "trex_output_tokens_total")
    if tokens <= 0:
        return None
    return _delta(point, "trex_compiler_forward_passes_total") / tokens


def _ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1e3) if values else None


def _correct(o: Outcome, problems: list[BenchProblem]) -> bool:
    return o.reply.answer == problems[o.index].answer


def summarize(point: PointResult, problems: list[BenchProblem]) -> dict:
    """One row of the results table, as a flat dict of plain numbers."""
    window = point.window_s
    finished = [o for o in point.finished_in_window() if o.ok]
    timed = point.timed()
    timed_ok = [o for o in timed if o.ok]
    latencies = [o.latency_s for o in timed_ok]
    answered = len(finished)
    tokens = sum(o.reply.tokens for o in finished)
    passes = sum(transformer_passes(o.reply) for o in timed_ok)
    timed_tokens = sum(o.reply.tokens for o in timed_ok)
    errors = Counter(o.reply.code for o in timed if not o.ok)
    if point.cancelled:
        errors["CANCELLED_AT_DRAIN"] += point.cancelled
    server_cpu = point.after.server_cpu_s - point.before.server_cpu_s
    client_cpu = point.after.client_cpu_s - point.before.client_cpu_s
    compile_batches = _delta(point, "trex_batch_size_count", phase="compile")
    execute_batches = _delta(point, "trex_batch_size_count", phase="execute")
    return {
        "loop": point.loop,
        "level": point.level,
        "window_s": window,
        "sent": point.sent,
        "answered": answered,
        "answers_per_s": answered / window if window > 0 else 0.0,
        "tokens_per_s": tokens / window if window > 0 else 0.0,
        "p50_ms": _ms(latencies, 50),
        "p95_ms": _ms(latencies, 95),
        "p99_ms": _ms(latencies, 99),
        "passes_per_token": passes / timed_tokens if timed_tokens else None,
        "metrics_passes_per_token": metrics_passes_per_token(point),
        "server_cpu_s": server_cpu,
        "server_cpu_s_per_answer": server_cpu / answered if answered else None,
        "server_cores": server_cpu / window if window > 0 else 0.0,
        "client_cpu_s_per_answer": client_cpu / answered if answered else None,
        "accuracy": sum(_correct(o, problems) for o in timed_ok) / len(timed_ok)
        if timed_ok
        else None,
        "errors": dict(errors),
        # one message per failing status, to say why without reading the server's log
        "error_messages": {o.reply.code: o.reply.message for o in timed if not o.ok},
        "error_count": sum(errors.values()),
        "mean_compile_batch": _delta(point, "trex_batch_size_sum", phase="compile")
        / compile_batches
        if compile_batches
        else None,
        "mean_execute_batch": _delta(point, "trex_batch_size_sum", phase="execute")
        / execute_batches
        if execute_batches
        else None,
    }


def by_group(point: PointResult, problems: list[BenchProblem]) -> list[dict]:
    """Per operand-length group (and all together): accuracy, tokens, passes, latency."""
    timed_ok = [o for o in point.timed() if o.ok]
    groups = {label: [] for label, _, _ in GROUPS}
    for o in timed_ok:
        groups.setdefault(problems[o.index].group, []).append(o)
    groups[ALL] = timed_ok
    rows = []
    for label, outcomes in groups.items():
        tokens = sum(o.reply.tokens for o in outcomes)
        latencies = [o.latency_s for o in outcomes]
        rows.append(
            {
                "group": label,
                "answered": len(outcomes),
                "accuracy": sum(_correct(o, problems) for o in outcomes) / len(outcomes)
                if outcomes
                else None,
                "tokens_per_answer": tokens / len(outcomes) if outcomes else None,
                "passes_per_token": sum(transformer_passes(o.reply) for o in outcomes) / tokens
                if tokens
                else None,
                "p50_ms": _ms(latencies, 50),
                "p99_ms": _ms(latencies, 99),
            }
        )
    return rows

"""Prometheus metrics of the solve service, served over HTTP on their own port.

Every metric is registered in the CollectorRegistry given to ``Metrics``, never in
the process-wide default one, so a test can run several servers in one process.

Work counters (model efficiency):
    trex_compiler_forward_passes_total  transformer forward passes. T-REX: compiler passes, one
                                        per problem compiled (a batch of n rows counts n). The
                                        baseline: one per prefill row and one per decode row-step
    trex_compile_batches_total          compiler (baseline: prefill) calls
    trex_executor_steps_total           execute row-steps: one per active row per step (the
                                        baseline: decode passes)
    trex_execute_batches_total          executor (baseline: decode) calls
    trex_output_tokens_total            tokens emitted, <end> included. T-REX: by the executor,
                                        one per row-step, so it equals
                                        trex_executor_steps_total. The baseline: the prefill's
                                        first token and one per decode row-step
    Forward passes per token = trex_compiler_forward_passes_total / trex_output_tokens_total:
    compiler passes are the expensive part, and for T-REX one pass serves the whole answer
    (1/12 .. 1); the baseline spends one pass per token, so it reads 1 by construction (a row
    cancelled while its pass runs spends the pass but gets no token, the only way above 1).

Per answered problem (histograms):
    trex_forward_passes_per_token       its forward passes / its output tokens (T-REX 1/12 .. 1,
                                        the baseline 1)
    trex_request_duration_seconds       arrival at the engine -> last token
    trex_queue_duration_seconds         arrival -> its compile batch starts
    trex_compile_duration_seconds       its compile batch's duration
    trex_execute_duration_seconds       end of compile -> last token (steps shared with
                                        other rows, and compile passes between them)

Scheduler:
    trex_batch_size{phase="compile"|"execute"}  rows per compiler / executor call
    trex_queue_length                   problems waiting to be compiled
    trex_active_rows                    executor pool rows in use

Calls and model:
    trex_requests_total{method, code}   finished RPCs by method and gRPC status name
    trex_model_info{model_version, kind, provider, executor_provider}  always 1; kind is
                                        "trex" or "baseline"
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

from service.scheduler import Request

log = logging.getLogger(__name__)

# 50 us .. 10 s, finer than a millisecond at the low end where single steps land
DURATION_BUCKETS_S = (
    50e-6, 100e-6, 200e-6, 350e-6, 500e-6, 750e-6,
    1e-3, 2e-3, 3.5e-3, 5e-3, 7.5e-3, 10e-3, 20e-3, 35e-3, 50e-3, 75e-3,
    0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 3.5, 5.0, 7.5, 10.0,
)  # fmt: skip
# one bucket per answer length: a passes/token value is exactly 1/n for n tokens
PASSES_PER_TOKEN_BUCKETS = tuple(1 / n for n in range(16, 0, -1))
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        r = registry

        # work counters
        self.compiler_forward_passes = Counter(
            "trex_compiler_forward_passes_total",
            "Transformer forward passes: T-REX compiler passes, one per problem compiled (a "
            "batch of n rows counts n); for the baseline also one per decode row-step",
            registry=r,
        )
        self.compile_batches = Counter(
            "trex_compile_batches_total", "Compiler calls (batches)", registry=r
        )
        self.executor_steps = Counter(
            "trex_executor_steps_total",
            "Executor row-steps: each active row in an executor call counts one",
            registry=r,
        )
        self.execute_batches = Counter(
            "trex_execute_batches_total", "Executor calls (batches)", registry=r
        )
        self.output_tokens = Counter(
            "trex_output_tokens_total",
            "Tokens emitted, <end> included (the baseline's prefill emits the first). "
            "Forward passes per token = "
            "trex_compiler_forward_passes_total / trex_output_tokens_total",
            registry=r,
        )

        # per answered problem
        self.forward_passes_per_token = Histogram(
            "trex_forward_passes_per_token",
            "Per answered problem: transformer forward passes / output tokens (<end> included)",
            buckets=PASSES_PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "trex_request_duration_seconds",
            "Per answered problem: arrival at the engine to last token",
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.queue_duration = Histogram(
            "trex_queue_duration_seconds",
            "Per answered problem: arrival to the start of its compile batch",
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.compile_duration = Histogram(
            "trex_compile_duration_seconds",
            "Per answered problem: duration of its compile batch",
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.execute_duration = Histogram(
            "trex_execute_duration_seconds",
            "Per answered problem: end of its compile to its last token",
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )

        # scheduler
        self.batch_size = Histogram(
            "trex_batch_size",
            "Rows per compiler or executor call",
            ["phase"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_length = Gauge(
            "trex_queue_length", "Problems waiting to be compiled", registry=r
        )
        self.active_rows = Gauge(
            "trex_active_rows", "Executor pool rows in use (compiling or executing)", registry=r
        )

        # calls and model
        self.requests = Counter(
            "trex_requests_total",
            "Finished RPCs by method and gRPC status code name",
            ["method", "code"],
            registry=r,
        )
        self.model = Info("trex_model", "The model being served", registry=r)

    def set_model(self, model_version: str, providers: dict[str, str], kind: str = "trex") -> None:
        self.model.info(
            {
                "model_version": model_version,
                "kind": kind,
                "provider": providers.get("compiler", ""),
                "executor_provider": providers.get("executor", ""),
            }
        )

    def observe_compile(self, batch_size: int, tokens_emitted: int = 0) -> None:
        """A compile call of ``batch_size`` rows, one forward pass each; the baseline's
        prefill also emits a token per row."""
        self.compile_batches.inc()
        self.compiler_forward_passes.inc(batch_size)
        self.output_tokens.inc(tokens_emitted)
        self.batch_size.labels(phase="compile").observe(batch_size)

    def observe_execute(
        self, batch_size: int, tokens_emitted: int, forward_passes: int = 0
    ) -> None:
        """An execute call of ``batch_size`` rows; ``forward_passes``: the transformer passes
        it ran (the baseline's decode passes, one per row; 0 for T-REX's executor)."""
        self.execute_batches.inc()
        self.executor_steps.inc(batch_size)
        self.output_tokens.inc(tokens_emitted)
        self.compiler_forward_passes.inc(forward_passes)
        self.batch_size.labels(phase="execute").observe(batch_size)

    def observe_answered(self, request: Request) -> None:
        """Per-problem histograms of a problem that got its answer."""
        ns = 1e-9
        self.forward_passes_per_token.observe(request.compiler_passes / len(request.tokens))
        self.request_duration.observe((request.finish_ns - request.arrival_ns) * ns)
        self.queue_duration.observe((request.compile_start_ns - request.arrival_ns) * ns)
        self.compile_duration.observe((request.compile_end_ns - request.compile_start_ns) * ns)
        self.execute_duration.observe((request.finish_ns - request.compile_end_ns) * ns)

    def set_load(self, queue_length: int, active_rows: int) -> None:
        self.queue_length.set(queue_length)
        self.active_rows.set(active_rows)

    def serve_http(self, host: str, port: int):
        """Start the /metrics endpoint in a daemon thread; -> the HTTP server (shutdown())."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, server.server_port)
        return server

"""gRPC server of T-REX: the trex.v1.Solver service, standard health checking, server
reflection, and Prometheus metrics on their own HTTP port.

    trex-serve --model-dir models/onnx --port 50051 --metrics-port 8000
    trex-serve --model-dir models/onnx-baseline --model-kind baseline   # the baseline instead
    python -m service.server --help     # every flag; each also reads TREX_<FLAG> from the env

Start-up: the gRPC port opens at once with health NOT_SERVING (calls answer UNAVAILABLE)
while the models load and a warm-up batch runs; then health turns SERVING.
The model is T-REX or the token-by-token baseline, as the export's manifest says
(--model-kind refuses an export of the other kind); the same scheduler and metrics serve
both (service/engine.py says how the baseline's passes are counted).
The handlers run on uvloop where it is installed (--event-loop), and the model on the
engine's own thread (service/engine.py).
SIGTERM or SIGINT: health turns NOT_SERVING, new calls are refused, calls already held get
up to --grace-period-s to finish, then the process exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
from dataclasses import dataclass, fields

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, disable_created_metrics

from protos.trex.v1 import trex_pb2, trex_pb2_grpc
from service import inspection
from service.engine import Engine, Ticket
from service.errors import (
    Cancelled,
    DeadlineExceeded,
    ExecutionFailed,
    InvalidArgument,
    InvalidProblem,
    NotReady,
    QueueFull,
    ServiceError,
    ShuttingDown,
    Unsupported,
)
from service.metrics import Metrics
from service.runtime import KINDS, LEAST_SIGNIFICANT_FIRST, PROVIDERS, Runtime
from service.scheduler import Request, SchedulerConfig, StopReason

log = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
SERVICE_NAME = trex_pb2.DESCRIPTOR.services_by_name["Solver"].full_name  # "trex.v1.Solver"

# The one table from errors to gRPC status codes; anything else is INTERNAL.
STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidProblem: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    ExecutionFailed: grpc.StatusCode.INTERNAL,
    Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
}

STOP_REASONS = {
    StopReason.END: trex_pb2.STOP_REASON_END,
    StopReason.STEP_LIMIT: trex_pb2.STOP_REASON_STEP_LIMIT,
}


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a request that raised ``exc`` ends with."""
    for cls, code in STATUS_CODES.items():
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 8000  # 0: no metrics endpoint
    model_dir: str = "models/onnx"
    model_kind: str = "any"  # "trex" or "baseline": refuse an export of the other kind
    provider: str = "auto"
    intra_op_threads: int = 0  # 0: onnxruntime's default
    inter_op_threads: int = 0
    max_rows: int = 256
    max_compile_batch: int = 64
    max_execute_batch: int = 256
    max_queue_delay_ms: float = 2.0
    max_queue: int = 1024
    step_limit: int = 0  # 0: the model's own max_steps
    grace_period_s: float = 10.0
    # how often a thread that holds the GIL is made to hand it over (sys.setswitchinterval);
    # Python's 5 ms left the engine thread waiting for the event loop (bench/results)
    switch_interval_ms: float = 0.5
    event_loop: str = "auto"  # "uvloop", "asyncio", or "auto": uvloop where installed
    log_level: str = "INFO"


# --- RPC handlers ---


def _cancel_code(context) -> grpc.StatusCode:
    remaining_s = context.time_remaining()
    if remaining_s is not None and remaining_s <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _log_failure(method: str, code: grpc.StatusCode, message: str, exc: Exception) -> None:
    if not isinstance(exc, ServiceError):  # a bug: the traceback is the useful part
        log.error("%s failed: %s", method, message, exc_info=exc)
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        log.warning("%s refused: %s", method, message)
    else:  # the client's doing, or already logged by the engine (ExecutionFailed)
        log.debug("%s: %s %s", method, code.name, message)


def _unary(method):
    """Turn errors into status codes (via status_of) and count the call in trex_requests_total."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: SolverServicer, request, context):
        code = grpc.StatusCode.OK
        self.calls.enter()
        try:
            return await method(self, request, context)
        except asyncio.CancelledError:  # the client cancelled or the deadline passed
            code = _cancel_code(context)
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status for the client
            code, message = status_of(exc)
            _log_failure(name, code, message, exc)
            await context.abort(code, message)
        finally:
            self.calls.leave()
            self.metrics.requests.labels(method=name, code=code.name).inc()

    return handler


def _streaming(method):
    """``_unary`` for a server-streaming handler."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: SolverServicer, request, context):
        code = grpc.StatusCode.OK
        self.calls.enter()
        responses = method(self, request, context)
        try:
            async for response in responses:
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            code = _cancel_code(context)
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status for the client
            code, message = status_of(exc)
            _log_failure(name, code, message, exc)
            await context.abort(code, message)
        finally:
            await responses.aclose()  # releases the ticket at once, not at garbage collection
            self.calls.leave()
            self.metrics.requests.labels(method=name, code=code.name).inc()

    return handler


class CallsInFlight:
    """Solver calls being handled, so that shutdown knows when the last one is done."""

    def __init__(self):
        self.count = 0
        self._none = asyncio.Event()
        self._none.set()

    def enter(self) -> None:
        self.count += 1
        self._none.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._none.set()

    async def wait_none(self) -> None:
        await self._none.wait()


class SolverServicer(trex_pb2_grpc.SolverServicer):
    def __init__(self, server: TrexServer):
        self._server = server
        self.metrics = server.metrics
        self.calls = server.calls

    def _engine(self) -> Engine:
        engine = self._server.engine
        if engine is None:
            raise NotReady("the model is still loading")
        return engine

    @_unary
    async def Solve(self, request, context):
        solved = await self._engine().solve(request.problem, context.time_remaining())
        return self._response(solved)

    @_streaming
    async def SolveStream(self, request, context):
        engine = self._engine()
        ticket = engine.submit(request.problem, context.time_remaining())
        vocab = engine.runtime.vocab
        order = digit_order(engine.runtime)
        try:
            step = 0
            async for token in ticket.tokens():
                step += 1
                token_msg = trex_pb2.Token(
                    text=vocab[token], id=token, step=step, digit_order=order
                )
                yield trex_pb2.SolveStreamResponse(token=token_msg)
            yield trex_pb2.SolveStreamResponse(result=self._response(ticket.request))
        finally:
            engine.release(ticket)

    @_unary
    async def SolveBatch(self, request, context):
        engine = self._engine()
        timeout_s = context.time_remaining()

        # queue every problem; one refused problem does not stop the others
        outcomes: list[Ticket | ServiceError] = []
        for problem in request.problems:
            try:
                outcomes.append(engine.submit(problem, timeout_s))
            except ServiceError as exc:
                outcomes.append(exc)

        # wait for each, in request order
        try:
            results = []
            for outcome in outcomes:
                if isinstance(outcome, Ticket):
                    try:
                        outcome = await outcome.result()
                    except ServiceError as exc:
                        outcome = exc
                results.append(self._batch_result(outcome))
            return trex_pb2.SolveBatchResponse(results=results)
        finally:
            for outcome in outcomes:
                if isinstance(outcome, Ticket):
                    engine.release(outcome)

    @_unary
    async def Inspect(self, request, context):
        detail = inspection.program_detail(request)
        engine = self._engine()
        solved, trace = await engine.inspect(request.problem, context.time_remaining())
        return inspection.response(
            engine.runtime,
            solved,
            trace,
            detail=detail,
            stop_reason=STOP_REASONS[solved.stop_reason],
            order=digit_order(engine.runtime),
        )

    def _batch_result(self, outcome: Request | ServiceError) -> trex_pb2.SolveBatchResult:
        if isinstance(outcome, Request):
            return trex_pb2.SolveBatchResult(
                status=trex_pb2.Status(code=grpc.StatusCode.OK.value[0]),
                result=self._response(outcome),
            )
        code, message = status_of(outcome)
        return trex_pb2.SolveBatchResult(
            status=trex_pb2.Status(code=code.value[0], message=message)
        )

    def _response(self, request: Request) -> trex_pb2.SolveResponse:
        runtime = self._server.engine.runtime
        response = trex_pb2.SolveResponse(
            problem=request.problem,
            answer=runtime.decode(request.tokens),
            tokens=[runtime.vocab[t] for t in request.tokens],
            stop_reason=STOP_REASONS[request.stop_reason],
            compiler_passes=request.compiler_passes,
            executor_steps=request.executor_steps,
            model_version=runtime.model_version,
            digit_order=digit_order(runtime),
        )
        response.queue_time.FromNanoseconds(request.compile_start_ns - request.arrival_ns)
        response.compile_time.FromNanoseconds(request.compile_end_ns - request.compile_start_ns)
        response.execute_time.FromNanoseconds(request.finish_ns - request.compile_end_ns)
        return response


def digit_order(runtime: Runtime) -> int:
    """The DigitOrder of the served model's tokens."""
    if runtime.answer_order == LEAST_SIGNIFICANT_FIRST:
        return trex_pb2.DIGIT_ORDER_LEAST_SIGNIFICANT_FIRST
    return trex_pb2.DIGIT_ORDER_MOST_SIGNIFICANT_FIRST


# --- the server ---


class TrexServer:
    """The gRPC server, its engine and its metrics endpoint, from start to stop."""

    def __init__(self, config: ServerConfig, registry: CollectorRegistry | None = None):
        self.config = config
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.health = health.aio.HealthServicer()
        self.engine: Engine | None = None
        self.calls = CallsInFlight()
        self.port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http = None

    async def start(self) -> int:
        """Open the gRPC port (health NOT_SERVING) and the metrics port; -> the gRPC port."""
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        # NOTE: without SO_REUSEPORT a second server on a taken port fails instead of
        # silently sharing it
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        trex_pb2_grpc.add_SolverServicer_to_server(SolverServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await server.start()
        self._grpc = server
        if self.config.metrics_port:
            self._metrics_http = self.metrics.serve_http(self.config.host, self.config.metrics_port)
        log.info("gRPC listening on %s:%d; loading the model", self.config.host, self.port)
        return self.port

    async def load(self) -> None:
        """Load the model, run a warm-up batch, start the engine; health turns SERVING."""
        cfg = self.config
        runtime = await asyncio.to_thread(
            Runtime,
            cfg.model_dir,
            provider=cfg.provider,
            intra_op_threads=cfg.intra_op_threads,
            inter_op_threads=cfg.inter_op_threads,
            max_rows=cfg.max_rows,
            kind=None if cfg.model_kind == "any" else cfg.model_kind,
        )
        step_limit = cfg.step_limit or runtime.max_steps
        if runtime.kind == "baseline" and step_limit > runtime.max_steps:
            # its place embeddings and key-value cache end at max_steps tokens
            log.warning(
                "--step-limit %d is beyond the baseline's max_steps; using %d",
                step_limit,
                runtime.max_steps,
            )
            step_limit = runtime.max_steps
        scheduler_config = SchedulerConfig(
            max_rows=cfg.max_rows,
            max_compile_batch=cfg.max_compile_batch,
            max_execute_batch=cfg.max_execute_batch,
            max_queue_delay_ns=int(cfg.max_queue_delay_ms * 1e6),
            max_queue=cfg.max_queue,
            step_limit=step_limit,
            start_id=runtime.start_id,
            end_id=runtime.end_id,
            step_is_forward_pass=runtime.kind == "baseline",
        )
        # NOTE: process-wide; the engine thread waits up to this long for the GIL after each
        # runtime call while the event loop thread runs Python
        sys.setswitchinterval(cfg.switch_interval_ms / 1000)
        engine = Engine(runtime, scheduler_config, self.metrics)
        await engine.warm_up()
        engine.start()
        self.engine = engine
        self.metrics.set_model(runtime.model_version, runtime.providers, runtime.kind)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "ready: %s model %s on %s, gRPC port %d",
            runtime.kind,
            runtime.model_version,
            runtime.providers,
            self.port,
        )

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, give held ones ``grace_s`` to finish, then close everything."""
        await self.health.enter_graceful_shutdown()  # NOT_SERVING for every service
        if self.engine is not None:
            self.engine.drain()
        if self._grpc is not None:
            # stop(grace) refuses new calls at once and cancels those still running after
            # grace_s; it also waits for health Watch streams, which never end on their own,
            # so once the last Solver call is done a second stop(0) cuts those off.
            stopping = asyncio.create_task(self._grpc.stop(grace_s))
            try:
                await asyncio.wait_for(self.calls.wait_none(), grace_s)
            except asyncio.TimeoutError:
                if self.calls.count:
                    log.warning("grace period over: cancelling %d calls", self.calls.count)
            await self._grpc.stop(0)
            await stopping
        if self.engine is not None:
            await self.engine.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        log.info("stopped")


async def serve(config: ServerConfig, registry: CollectorRegistry | None = None) -> int:
    """Run until SIGTERM or SIGINT; -> the process exit status."""
    server = TrexServer(config, registry)
    try:
        await server.start()
    except RuntimeError as exc:  # grpc raises RuntimeError when the port cannot be bound
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # load the model, unless a signal comes first
    loading = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        log.error("cannot serve the model in %s: %s", config.model_dir, loading.exception())
        stopping.cancel()
        await server.stop(0)
        return 1
    if not loading.done():
        loading.cancel()

    await stopping
    log.info("signal received: stopping, up to %.1f s for calls in flight", config.grace_period_s)
    await server.stop(config.grace_period_s)
    return 0


# --- command line ---


def parse_args(argv=None) -> ServerConfig:
    defaults = ServerConfig()
    helps = {
        "host": "address to listen on, for gRPC and metrics",
        "port": "gRPC port",
        "metrics_port": "Prometheus /metrics HTTP port; 0 turns it off",
        "model_dir": "export folder with manifest.json and the ONNX graphs (T-REX or baseline)",
        "model_kind": "refuse an export of another kind than this; any: serve either",
        "provider": "auto: CUDA when available, else CPU",
        "intra_op_threads": "onnxruntime threads within an operator; 0: its default",
        "inter_op_threads": "onnxruntime threads across operators; 0: its default",
        "max_rows": "executor pool rows: problems compiled or executing at once",
        "max_compile_batch": "problems per compiler call",
        "max_execute_batch": "rows per executor call",
        "max_queue_delay_ms": "how long a problem waits for batch-mates while nothing runs",
        "max_queue": "problems waiting to be compiled; beyond it calls get RESOURCE_EXHAUSTED",
        "step_limit": "tokens per problem; 0: the model's max_steps (the baseline's most)",
        "grace_period_s": "on SIGTERM, time given to calls in flight",
        "switch_interval_ms": "the GIL switch interval, process-wide: how long the engine "
        "thread can wait for the event loop to hand the GIL over",
        "event_loop": "the gRPC handlers' event loop; auto: uvloop where installed",
        "log_level": "DEBUG logs every request",
    }
    ap = argparse.ArgumentParser(
        prog="trex-serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in fields(ServerConfig):
        default = getattr(defaults, f.name)
        kind = type(default)
        env_name = f"TREX_{f.name.upper()}"
        choices = {
            "provider": PROVIDERS,
            "log_level": LOG_LEVELS,
            "model_kind": ("any", *KINDS),
            "event_loop": EVENT_LOOPS,
        }.get(f.name)
        ap.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            # a string default goes through ``type`` too, so a bad env value is a usage error
            default=os.environ.get(env_name, default),
            choices=choices,
            help=f"{helps[f.name]} (env {env_name}; default %(default)s)",
        )
    config = ServerConfig(**vars(ap.parse_args(argv)))
    # knobs checked here, so that a bad one is a usage error and not a failure after loading
    for name in ("max_rows", "max_compile_batch", "max_execute_batch", "max_queue"):
        if getattr(config, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    never_negative = ("port", "metrics_port", "intra_op_threads", "inter_op_threads")
    never_negative += ("step_limit", "max_queue_delay_ms", "grace_period_s")
    for name in never_negative:
        if getattr(config, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must not be negative")
    if config.switch_interval_ms <= 0:
        ap.error("--switch-interval-ms must be positive")
    if config.event_loop == "uvloop" and event_loop_runner("uvloop") is None:
        ap.error("--event-loop uvloop: uvloop is not installed")
    return config


def event_loop_runner(choice: str):
    """-> the ``run(coroutine)`` of the chosen event loop, or None for asyncio's own.

    uvloop where chosen or, with "auto", where installed: it runs the gRPC handlers' loop
    with less of the GIL per call than asyncio's, which leaves more of it to the engine
    thread (bench/results/PROFILE.md). None also where "uvloop" is chosen but not there.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.run


def main(argv=None) -> int:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # DEBUG is for this service's requests, not for every poll of grpc's and asyncio's loops
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    # NOTE: process-wide; the *_created series double the exposition and no dashboard reads them
    disable_created_metrics()
    run = event_loop_runner(config.event_loop) or asyncio.run
    log.info("event loop: %s", run.__module__)
    return run(serve(config))


if __name__ == "__main__":
    sys.exit(main())

"""What the load is sent to: a ``trex-serve`` subprocess on a free loopback port, or the
same engine in this process without gRPC; and the counters read before and after a window.

Both are configured from one list of ``trex-serve`` flags, parsed by the server's own
``parse_args``, so the in-process engine runs with exactly the batching knobs, threads and
provider of the server it is compared with. The in-process engine is built by the server's
own ``TrexServer.load`` (model, warm-up, engine) without opening a port.

CPU time: psutil when it is installed, else /proc/<pid>/stat (Linux), else, for this process
only, resource.getrusage.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.load import Snapshot, clock

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180.0  # model load and warm-up on a busy 2-core machine
STOP_TIMEOUT_S = 30.0

Samples = dict[tuple[str, tuple], float]  # (sample name, sorted labels) -> value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (None: this process), all threads."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    stat = Path(f"/proc/{pid or os.getpid()}/stat")
    if stat.exists():
        # fields after the parenthesised command name; utime and stime are fields 14 and 15
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if pid is None:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    raise RuntimeError(f"cannot read the CPU time of process {pid}: no psutil and no /proc")


def parse_samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def registry_samples(registry) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


async def snapshot(target) -> Snapshot:
    """CPU times and metrics of ``target`` (a ServerProcess or InProcessEngine), now."""
    at = clock()
    server_cpu = target.cpu_s()
    client_cpu = process_cpu_s(None)
    # the HTTP scrape blocks: in a thread, so that requests in flight keep being served
    samples = await asyncio.to_thread(target.samples)
    return Snapshot(at, server_cpu, client_cpu, samples)


class ServerProcess:
    """``python -m service.server`` on 127.0.0.1 with free gRPC and metrics ports."""

    mode = "grpc"

    def __init__(self, model_dir: Path, server_args: list[str], log_path: Path):
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "service.server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        cmd += ["--model-dir", str(model_dir), *server_args]
        self.cmd = cmd
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        log.info("starting %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def wait_serving(self, timeout_s: float = STARTUP_TIMEOUT_S) -> float:
        """Block until health says SERVING; -> seconds it took."""
        started = time.monotonic()
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() - started < timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.proc.returncode}; log {self.log_path}:\n"
                        + self.log_tail()
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not SERVING after {timeout_s:.0f} s:\n{self.log_tail()}")

    def samples(self) -> Samples:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return parse_samples(reply.read().decode())

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("server %d ignored SIGTERM for %.0f s; killing it", self.pid, 30)
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class InProcessEngine:
    """The server's engine and runtime in this process and event loop, without gRPC.

    Built by ``TrexServer.load`` from the same flags as the server subprocess; the gRPC port
    is never opened. Its CPU time is this whole process's, load generator included.
    """

    mode = "engine"

    def __init__(self, model_dir: Path, server_args: list[str]):
        from service.server import parse_args

        flags = ["--model-dir", str(model_dir), "--metrics-port", "0", *server_args]
        self.config = parse_args(flags)
        self._server = None
        self.engine = None
        self.pid = os.getpid()

    async def start(self) -> float:
        from service.server import TrexServer

        started = time.monotonic()
        self._server = TrexServer(self.config)
        self._server.port = 0  # NOTE: load() logs the gRPC port; there is none in-process
        await self._server.load()
        self.engine = self._server.engine
        return time.monotonic() - started

    def samples(self) -> Samples:
        return registry_samples(self._server.metrics.registry)

    def cpu_s(self) -> float:
        return process_cpu_s(None)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

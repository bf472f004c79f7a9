"""Shared fixtures of the service tests: the exported model and running servers.

The model is $TREX_TEST_MODEL_DIR, else the shipped models/onnx, else an export made for
the session; the baseline's is $TREX_TEST_BASELINE_MODEL_DIR, else models/onnx-baseline, else
a session export (``baseline_onnx_dir`` in tests/conftest.py). Servers run as subprocesses
on 127.0.0.1 with free ports, exactly as ``trex-serve`` runs them, on the CPU provider.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODEL_DIR = REPO / "models" / "onnx"
SHIPPED_BASELINE_DIR = REPO / "models" / "onnx-baseline"
STARTUP_TIMEOUT_S = 90.0


def chosen_model_dir() -> Path | None:
    """$TREX_TEST_MODEL_DIR, else the shipped export if it is there; None otherwise."""
    if os.environ.get("TREX_TEST_MODEL_DIR"):
        return Path(os.environ["TREX_TEST_MODEL_DIR"])
    return SHIPPED_MODEL_DIR if (SHIPPED_MODEL_DIR / "manifest.json").is_file() else None


@pytest.fixture(scope="session")
def model_dir(request) -> Path:
    """The export the service tests serve: chosen_model_dir(), or else this session's own
    export of a checkpoint (``onnx_model_dir`` in tests/conftest.py), so that a checkout
    without models still tests the whole service."""
    path = chosen_model_dir()
    if path is None:
        return request.getfixturevalue("onnx_model_dir")
    if not (path / "manifest.json").is_file():
        pytest.fail(f"no exported model in {path} (TREX_TEST_MODEL_DIR)")
    return path


def chosen_baseline_dir() -> Path | None:
    """$TREX_TEST_BASELINE_MODEL_DIR, else the shipped baseline export if it is there."""
    if os.environ.get("TREX_TEST_BASELINE_MODEL_DIR"):
        return Path(os.environ["TREX_TEST_BASELINE_MODEL_DIR"])
    return SHIPPED_BASELINE_DIR if (SHIPPED_BASELINE_DIR / "manifest.json").is_file() else None


@pytest.fixture(scope="session")
def baseline_model_dir(request) -> Path:
    """The baseline export the service tests serve: chosen_baseline_dir(), or else this
    session's export of a baseline checkpoint (``baseline_onnx_dir``)."""
    path = chosen_baseline_dir()
    if path is None:
        return request.getfixturevalue("baseline_onnx_dir")
    if not (path / "manifest.json").is_file():
        pytest.fail(f"no exported model in {path} (TREX_TEST_BASELINE_MODEL_DIR)")
    return path


@pytest.fixture(scope="session")
def baseline_reference(baseline_model_dir) -> Runtime:
    """The baseline export run directly, without a server."""
    return Runtime(baseline_model_dir, provider="cpu", kind="baseline")


@pytest.fixture(scope="session")
def reference(model_dir) -> Runtime:
    """The same model run directly, without a server: what each served answer must be."""
    return Runtime(model_dir, provider="cpu")


def expected_tokens(reference: Runtime, problem: str) -> list[str]:
    """The tokens the model emits for ``problem`` when run directly: up to and including
    <end>, or all ``max_steps`` of them if it never emits <end>."""
    ids = [int(t) for t in reference.generate(reference.encode([problem]))[0]]
    if reference.end_id in ids:
        ids = ids[: ids.index(reference.end_id) + 1]
    return [reference.vocab[i] for i in ids]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m service.server`` in a subprocess, with its log in a file."""

    def __init__(self, model_dir: Path, log_path: Path, **flags):
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        args = {
            "host": "127.0.0.1",
            "port": self.port,
            "metrics_port": self.metrics_port,
            "model_dir": model_dir,
            "provider": "cpu",
            "intra_op_threads": 1,  # NOTE: two shared cores; keep test servers from fighting
            "log_level": "DEBUG",
            **flags,
        }
        cmd = [sys.executable, "-m", "service.server"]
        for name, value in args.items():
            cmd += ["--" + name.replace("_", "-"), str(value)]
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_serving(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"server not SERVING after {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics: {(name, sorted labels): value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def metric(samples: dict, name: str, **labels) -> float:
    """One sample's value; 0 for a labelled series not yet created."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition"):
    """Poll ``condition()`` until it returns a true value; -> that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="session")
def start_server(model_dir, tmp_path_factory):
    """Factory: a SERVING server subprocess with the given flags, stopped at session end."""
    servers = []

    def start(**flags) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess(model_dir, log_path, **flags)
        servers.append(server)
        server.wait_serving()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The server most tests share, with the default batching knobs."""
    return start_server()

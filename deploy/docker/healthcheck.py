"""Container health check: ask the server's standard gRPC health service whether it is SERVING.

    python /app/healthcheck.py                 # 127.0.0.1:$TREX_PORT (default 50051)
    python /app/healthcheck.py 127.0.0.1:50051

Exit status 0 when the overall health ("" service) is SERVING; 1 when it is anything else
(NOT_SERVING while the model loads or the server drains), when nothing answers, or when the
answer takes longer than --timeout-s. Docker's HEALTHCHECK runs this; Kubernetes uses its
native gRPC probes against the same service instead.

It needs only grpcio and grpcio-health-checking, which the image has anyway, so the image
carries no separately downloaded probe binary.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, timeout_s: float) -> tuple[bool, str]:
    """(serving, what was seen)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "target",
        nargs="?",
        # the server reads TREX_PORT too, so the probe follows a port changed by env
        default=f"127.0.0.1:{os.environ.get('TREX_PORT', '50051')}",
        help="HOST:PORT of the gRPC server (default %(default)s)",
    )
    ap.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the check")
    args = ap.parse_args(argv)
    serving, seen = check(args.target, args.timeout_s)
    print(f"{args.target}: {seen}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())

"""Container health check: exits 0 when the container's ditserve service answers SERVING on grpc.health.v1.

The gRPC port comes from the service's own command line, read from /proc/PID/cmdline (PID 1, the
container's `ditserve serve ROLE ...`, unless given) and parsed by ditserve's own parser, so one check
fits every role and every --port. A draining service answers NOT_SERVING and fails the check.

    python3 healthcheck.py [PID]
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ditserve.client.cli import build_parser


def grpc_port(cmdline: list[str]) -> int:
    """The --port of a `... serve ROLE ...` command line (the role's default when absent)."""
    argv = cmdline[cmdline.index("serve") :]
    return build_parser(argv).parse_args(argv).port


def main(argv: list[str]) -> int:
    pid = argv[1] if len(argv) > 1 else "1"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    port = grpc_port(cmdline)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4)
        except grpc.RpcError as error:
            print(f"127.0.0.1:{port}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"127.0.0.1:{port}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Container health check: exits 0 when the container's ditserve service answers SERVING on grpc.health.v1.

The port comes from the service's own command line, read from /proc/PID/cmdline (PID 1, the
container's `ditserve serve ROLE ...`, unless given) and parsed by ditserve's own parser, so one check
fits every role and every port: --health-port when set (plaintext health only, so the check works
with --tls-cert on), else --port. A draining service answers NOT_SERVING and fails the check.

Docker marks a failing container unhealthy but never restarts it (only Swarm does). With
--restart-after N, once the service has answered SERVING at least once, N failed checks in a row
send it SIGTERM: it drains and exits, and the restart policy starts it again. A gateway is left
running when it answers NOT_SERVING (its stages are missing: restarting it would not bring them
back), and restarted only when it stops answering at all.

    python3 healthcheck.py [--restart-after N] [PID]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ditserve.client.cli import build_parser

STATE = Path(os.environ.get("DITSERVE_HEALTH_STATE", "/tmp/ditserve-health"))


def service_args(cmdline: list[str]) -> argparse.Namespace:
    """The parsed `serve ROLE ...` part of a command line."""
    argv = cmdline[cmdline.index("serve") :]
    return build_parser(argv).parse_args(argv)


def grpc_port(cmdline: list[str]) -> int:
    """The port health is answered on in plaintext: --health-port, else --port (the role's default when absent)."""
    args = service_args(cmdline)
    return args.health_port if args.health_port is not None else args.port


def check(cmdline: list[str]) -> tuple[bool, bool, str]:
    """(serving, answered, what to print)."""
    args = service_args(cmdline)
    if args.health_port is None and args.tls_cert:
        return False, True, "--tls-cert is set: give the service --health-port for a plaintext health check"
    port = grpc_port(cmdline)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4)
        except grpc.RpcError as error:
            return False, False, f"127.0.0.1:{port}: {error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, True, f"127.0.0.1:{port}: {status}"


def count_failure(pid: int, serving: bool, counts: bool, restart_after: int) -> int:
    """Consecutive failures since the service last answered SERVING; SIGTERMs it at `restart_after`."""
    STATE.mkdir(parents=True, exist_ok=True)
    seen, failures = STATE / f"{pid}.seen", STATE / f"{pid}.failures"
    if serving:
        seen.touch()
        failures.unlink(missing_ok=True)
        return 0
    if not seen.exists() or not counts:  # still loading its model, or a gateway waiting for stages
        return 0
    count = int(failures.read_text() or 0) + 1 if failures.exists() else 1
    failures.write_text(str(count))
    if count >= restart_after:
        print(f"{count} failed checks in a row: SIGTERM to {pid} (the restart policy starts it again)")
        os.kill(pid, signal.SIGTERM)
    return count


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restart-after", type=int, default=0, help="SIGTERM after N failures in a row (0: never)")
    parser.add_argument("pid", nargs="?", type=int, default=1)
    options = parser.parse_args(argv[1:])
    cmdline = Path(f"/proc/{options.pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    serving, answered, message = check(cmdline)
    print(message, file=sys.stdout if serving else sys.stderr)
    if options.restart_after > 0:
        counts = not answered or service_args(cmdline).role != "gateway"
        count_failure(options.pid, serving, counts, options.restart_after)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

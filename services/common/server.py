"""Server bootstrap shared by the four roles: create, serve, drain on SIGTERM.

`start_server` binds (port 0 picks a free port, for tests), registers health,
reflection and Admin next to the role's servicers, and returns a handle;
`serve_forever` adds signal handling for the `ditserve serve` processes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ditserve.services.common.metrics import ServiceMetrics
from ditserve.services.common.rpc import Drain, ObservabilityInterceptor
from ditserve.services.common.security import ServerSecurity
from ditserve.v1 import common_pb2, common_pb2_grpc

if TYPE_CHECKING:
    from ditserve.services.common.profiling import Profiler  # imports torch; the CLI parser must not

log = logging.getLogger(__name__)

PLAINTEXT = ServerSecurity()

MiB = 1024 * 1024


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    """Raised limits on both sides: a FLUX T5 embedding alone is gRPC's 4 MiB default."""
    size = max_message_mb * MiB
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]


# gRPC sets SO_REUSEPORT by default: a second server on a taken port binds silently and takes half the
# connections (a client then sees UNIMPLEMENTED from the wrong service). A clash must fail at start.
EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]


def connection_age(seconds: float) -> list[tuple[str, int]]:
    """gRPC's DNS resolver only re-resolves when a connection drops; a GOAWAY at this age makes it."""
    return [("grpc.max_connection_age_ms", int(seconds * 1000))] if seconds > 0 else []


def health_service() -> health.HealthServicer:
    """grpc.health.v1 in its blocking mode: each Watch stream holds a worker thread while open.

    The default non-blocking Watch sends its first status while holding the servicer's lock and waits for
    the server's event thread to finish the send; that thread, closing an old Watch (a client moving to a
    new connection at --max-connection-age), waits for the same lock. Both wait for ever: the server
    answers nothing more and its process cannot exit (seen under CPU load in
    test_stage_channels.py, py-spy showing the two threads). Blocking Watches only queue responses under
    the lock.
    """
    return health.HealthServicer(experimental_non_blocking=False)


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = 0
    max_workers: int = 32
    max_message_mb: int = 256
    grace_seconds: float = 30.0
    health_port: int | None = None
    max_connection_age_s: float = 60.0

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
        group = parser.add_argument_group("server")
        group.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
        group.add_argument("--port", type=int, default=port, help=f"gRPC port (default: {port}; 0 = any free)")
        group.add_argument(
            "--metrics-port",
            type=int,
            default=metrics_port,
            help=f"Prometheus /metrics port (default: {metrics_port})",
        )
        group.add_argument("--max-workers", type=int, default=32, help="gRPC handler threads (default: 32)")
        group.add_argument("--max-message-mb", type=int, default=256, help="gRPC message size limit (default: 256)")
        group.add_argument(
            "--grace-seconds", type=float, default=30.0, help="SIGTERM drain time for in-flight requests"
        )
        group.add_argument(
            "--health-port",
            type=int,
            default=None,
            help="also answer grpc.health.v1 (only) in plaintext on this port, for probes that cannot speak"
            " TLS (Kubernetes' gRPC probes, container healthchecks) when --tls-cert is set",
        )
        group.add_argument(
            "--max-connection-age",
            dest="max_connection_age_s",
            type=float,
            default=60.0,
            help="close each client connection after this many seconds (calls in flight finish first), so"
            " callers balancing over a DNS name re-resolve it and find replicas added since (default: 60; 0: never)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerOptions:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


class Service(Protocol):
    """What a role plugs into the bootstrap."""

    role: str
    metrics: ServiceMetrics
    profiler: Profiler

    def grpc_service_names(self) -> list[str]: ...

    def register(self, server: grpc.Server) -> None: ...

    def info(self) -> common_pb2.InfoResponse: ...

    def close(self) -> None: ...


HealthReport = Callable[[bool, str], None]
"""`report(serving, why)`: a service that knows when it cannot serve (the gateway without a stage)
sets its own health through this; `start_server` hands it over if the service has `watch_health`."""


class AdminServicer(common_pb2_grpc.AdminServicer):
    def __init__(self, service: Service) -> None:
        self.service = service

    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext) -> common_pb2.InfoResponse:
        return self.service.info()

    def StartProfile(
        self, request: common_pb2.StartProfileRequest, context: grpc.ServicerContext
    ) -> common_pb2.ProfileStatus:
        path = self.service.profiler.start(request.name, request.record_shapes, request.with_stack)
        return common_pb2.ProfileStatus(running=True, trace_path=str(path))

    def StopProfile(
        self, request: common_pb2.StopProfileRequest, context: grpc.ServicerContext
    ) -> common_pb2.ProfileStatus:
        return common_pb2.ProfileStatus(running=False, trace_path=str(self.service.profiler.stop()))


@dataclass
class RunningServer:
    service: Service
    server: grpc.Server
    health: health.HealthServicer
    drain: Drain
    port: int
    metrics_port: int | None
    health_server: grpc.Server | None = None

    def stop(self, grace: float) -> None:
        """Drains: health answers NOT_SERVING and new work UNAVAILABLE while in-flight work
        gets up to `grace` seconds to finish; then the server stops."""
        self.health.enter_graceful_shutdown()
        self.drain.begin()
        if not self.drain.wait_idle(grace):
            log.warning("%s: grace period over; cancelling what is still running", self.service.role)
        self.server.stop(grace=1).wait()
        if self.health_server is not None:
            self.health_server.stop(grace=0).wait()
        self.service.close()


def start_server(service: Service, options: ServerOptions, security: ServerSecurity = PLAINTEXT) -> RunningServer:
    interceptor = ObservabilityInterceptor(service.metrics, security.authenticator())
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix=f"{service.role}-rpc"),
        interceptors=[interceptor],
        options=[
            *channel_options(options.max_message_mb),
            *connection_age(options.max_connection_age_s),
            *EXCLUSIVE_PORT,
        ],
    )
    service.register(server)
    common_pb2_grpc.add_AdminServicer_to_server(AdminServicer(service), server)
    health_servicer = health_service()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service.grpc_service_names(), "ditserve.v1.Admin"]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{options.host}:{options.port}"
    credentials = security.credentials()
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def report(ok: bool, why: str = "") -> None:
        for name in ["", *names]:
            health_servicer.set(name, serving if ok else not_serving)
        log.log(
            logging.INFO if ok else logging.WARNING,
            "%s health: %s%s",
            service.role,
            "SERVING" if ok else "NOT_SERVING",
            f" ({why})" if why else "",
        )

    watch_health = getattr(service, "watch_health", None)
    if watch_health is None:
        report(True)
    else:
        watch_health(report)
    health_server = None
    if options.health_port is not None:
        health_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="health"), options=EXCLUSIVE_PORT
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_server.add_insecure_port(f"{options.host}:{options.health_port}")
        health_server.start()
    metrics_port = None
    if options.metrics_port is not None:
        metrics_port = service.metrics.serve_http(options.host, options.metrics_port)
    log.info("%s serving gRPC on %s:%d, metrics on %s", service.role, options.host, port, metrics_port)
    return RunningServer(service, server, health_servicer, interceptor.drain, port, metrics_port, health_server)


def serve_forever(service: Service, options: ServerOptions, security: ServerSecurity = PLAINTEXT) -> None:
    """Runs until SIGTERM or SIGINT, then drains within the grace period."""
    running = start_server(service, options, security)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # Wake up now and then: a signal delivered to another thread runs its Python handler only once
    # the main thread runs bytecode, and a bare wait() may never return to let it.
    while not stop.wait(timeout=0.25):
        pass
    log.info("%s draining (grace %.0fs)", service.role, options.grace_seconds)
    running.stop(options.grace_seconds)
    log.info("%s stopped", service.role)

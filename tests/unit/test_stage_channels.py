"""The gateway's stage channels: the gRPC target and service config each `--stage` value becomes, and
that a real channel built from them balances, skips NOT_SERVING replicas and retries UNAVAILABLE.
The replicas are small real gRPC servers (Admin + health) on loopback, no model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ditserve.services.common.server import connection_age, health_service
from ditserve.services.gateway.pool import (
    DOWN_AFTER_S,
    MAX_ATTEMPTS,
    STAGE_SERVICES,
    StageChannel,
    service_config,
    stage_target,
)
from ditserve.v1 import common_pb2, common_pb2_grpc

SERVICE = STAGE_SERVICES["denoiser"]


@pytest.mark.parametrize(
    ("value", "target"),
    [
        ("denoiser:50052", "dns:///denoiser:50052"),
        ("dns:///ditserve-denoiser.ns.svc.cluster.local:50052", "dns:///ditserve-denoiser.ns.svc.cluster.local:50052"),
        ("127.0.0.1:1,127.0.0.2:2", "ipv4:127.0.0.1:1,127.0.0.2:2"),
        (" 10.0.0.1:50052 , 10.0.0.2:50052 ", "ipv4:10.0.0.1:50052,10.0.0.2:50052"),
        ("[::1]:1,[fd00::2]:2", "ipv6:[::1]:1,[fd00::2]:2"),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
        ("unix:/run/denoiser.sock", "unix:/run/denoiser.sock"),
    ],
)
def test_stage_values_become_grpc_targets(value: str, target: str) -> None:
    assert stage_target(value) == target


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("h2:50052,h3:50052", "give one DNS name that resolves to every replica"),
        ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
        (" , ", "no address"),
    ],
)
def test_what_one_channel_cannot_balance_is_refused_with_the_way_out(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stage_target(value)


def test_service_config_balances_health_checks_and_retries_unavailable_only() -> None:
    config = service_config("denoiser")
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "ditserve.v1.Denoiser"}
    (method,) = config["methodConfig"]
    assert {"service": "ditserve.v1.Denoiser"} in method["name"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= method["retryPolicy"]["maxAttempts"] == MAX_ATTEMPTS <= 5  # gRPC caps attempts at 5


def test_the_channel_gets_the_dns_target_and_the_service_config() -> None:
    channel = StageChannel("denoiser", "localhost:1", common_pb2_grpc.AdminStub, max_message_mb=8)
    try:
        options = dict(channel.options)
        assert channel.target == "dns:///localhost:1"
        assert json.loads(options["grpc.service_config"]) == service_config("denoiser")
        assert options["grpc.enable_retries"] == 1 and options["grpc.service_config_disable_resolution"] == 1
        # a retried call replays its request: the whole of the largest one must stay buffered
        assert options["grpc.per_rpc_retry_buffer_size"] == options["grpc.max_send_message_length"] == 8 << 20
    finally:
        channel.close()


class Replica(common_pb2_grpc.AdminServicer):
    """Answers Admin.Info with its name, or UNAVAILABLE when told to (a replica refusing work)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.refuse = False
        self.calls = 0
        self.peers: set[str] = set()  # the caller's address: a new source port per connection

    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext) -> common_pb2.InfoResponse:
        self.calls += 1
        self.peers.add(context.peer())
        if self.refuse:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} refuses")
        return common_pb2.InfoResponse(service=self.name)


@dataclass
class Running:
    replica: Replica
    health: health.HealthServicer
    server: grpc.Server
    port: int

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(SERVICE, status)


def start_replicas(count: int, max_connection_age_s: float = 0) -> list[Running]:
    running = []
    for index in range(count):
        server = grpc.server(futures.ThreadPoolExecutor(4), options=connection_age(max_connection_age_s))
        replica, checks = Replica(f"r{index}"), health_service()  # as the stages serve it
        common_pb2_grpc.add_AdminServicer_to_server(replica, server)
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        running.append(Running(replica, checks, server, port))
        running[-1].set_serving(True)
    return running


@pytest.fixture
def replicas() -> Iterator[list[Running]]:
    running = start_replicas(3)
    yield running
    for each in running:
        each.server.stop(0)


def _channel(replicas: list[Running]) -> StageChannel:
    return StageChannel("denoiser", ",".join(f"127.0.0.1:{r.port}" for r in replicas), common_pb2_grpc.AdminStub)


def _wait(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _names(channel: StageChannel, count: int) -> list[str]:
    return [channel.stub.Info(common_pb2.InfoRequest(), timeout=5).service for _ in range(count)]


def test_round_robin_skips_not_serving_replicas_and_retries_unavailable(replicas: list[Running]) -> None:
    channel = _channel(replicas)
    try:
        _wait(channel.serving)
        _wait(lambda: len(set(_names(channel, 3))) == 3)  # each subchannel READY once its health says so
        assert sorted(_names(channel, 6)) == ["r0", "r0", "r1", "r1", "r2", "r2"]

        replicas[1].set_serving(False)  # e.g. draining: no new calls
        _wait(lambda: "r1" not in _names(channel, 3))
        assert set(_names(channel, 6)) == {"r0", "r2"}

        replicas[0].replica.refuse = True  # answers UNAVAILABLE: the caller never sees it
        refused_before = replicas[0].replica.calls
        assert set(_names(channel, 6)) == {"r2"}
        assert replicas[0].replica.calls > refused_before, "r0 was never tried, so nothing was retried"
    finally:
        channel.close()


def test_serving_follows_the_replicas_with_a_short_grace(replicas: list[Running]) -> None:
    channel = _channel(replicas[:1])
    try:
        _wait(channel.serving)
        replicas[0].set_serving(False)
        started = time.monotonic()
        _wait(lambda: not channel.serving())
        assert DOWN_AFTER_S <= time.monotonic() - started < DOWN_AFTER_S + 2
        with pytest.raises(grpc.RpcError) as refused:
            _names(channel, 1)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        replicas[0].set_serving(True)
        _wait(channel.serving, timeout=3)
        assert _names(channel, 1) == ["r0"]
    finally:
        channel.close()


def test_a_replica_closing_old_connections_neither_fails_calls_nor_flaps_health() -> None:
    """Stages send GOAWAY at --max-connection-age so a DNS target gets re-resolved; the reconnect
    must cost no call and must not read as "no serving replica"."""
    (replica,) = start_replicas(1, max_connection_age_s=0.3)
    channel = _channel([replica])
    try:
        _wait(channel.serving)
        deadline = time.monotonic() + 2.5  # several connection ages
        while time.monotonic() < deadline:
            assert _names(channel, 1) == ["r0"]
            assert channel.serving()
            time.sleep(0.02)
        assert len(replica.replica.peers) >= 3, "the connection was never replaced"
    finally:
        channel.close()
        replica.server.stop(0)

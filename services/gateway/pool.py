"""A stage's replicas behind one gRPC channel, balanced by gRPC itself.

The channel's service config asks for `round_robin` over every address its target resolves to
(`dns:///denoiser:50052` re-resolves, so a scaled compose service or a Kubernetes headless Service
adds and drops replicas), client-side health checking (a replica answering NOT_SERVING, e.g.
draining, gets no new calls) and transparent retries of UNAVAILABLE before the first response
(a replica that died or refused before answering costs the caller nothing). Every other status is the
stage's answer and goes back to the caller unchanged, as does UNAVAILABLE after a stream started.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from ditserve.client.security import NO_SECURITY, ClientSecurity
from ditserve.services.common.errors import ServiceError
from ditserve.v1 import common_pb2, common_pb2_grpc

# The gRPC service each stage's health is checked under (the server sets it with "" and Admin).
STAGE_SERVICES = {
    "encoder": "ditserve.v1.TextEncoder",
    "denoiser": "ditserve.v1.Denoiser",
    "vae": "ditserve.v1.VaeDecoder",
}
# gRPC caps maxAttempts at 5; four tries a dying stage of three replicas with room to spare.
MAX_ATTEMPTS = 4
# Short reconnect backoff: a restarted replica is used again within a second or two, not minutes.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# A stage counts as down once no replica has been READY for this long: a replica that sends GOAWAY
# at its --max-connection-age reconnects within milliseconds and must not flap the gateway's health.
DOWN_AFTER_S = 1.0
POLL_SETTLE_S = 0.3
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")
MiB = 1024 * 1024


class StageError(ServiceError):
    """A stage's own status, passed through with the stage named."""

    def __init__(self, stage: str, error: grpc.RpcError) -> None:
        super().__init__(f"{stage}: {error.details()}")
        self.code = error.code()


def _ip_address(part: str) -> tuple[int, str] | None:
    """(4 or 6, 'addr:port') for an IP literal with a port, else None."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([0-9.]+):(\d+)", part)
    if not match:
        return None
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None
    return version, f"[{host}]:{port}" if version == 6 else f"{host}:{port}"


def stage_target(value: str) -> str:
    """The gRPC target for a `--encoder/--denoiser/--vae` value.

    A target with a scheme (`dns:///name:port`, `ipv4:a:p,b:p`) is used as given; one `host:port` becomes
    `dns:///host:port`; a comma-separated list of IP `addr:port`s becomes an `ipv4:`/`ipv6:` list.
    Several host names cannot share one channel (gRPC resolves one name per channel): give one DNS
    name that resolves to every replica instead.
    """
    value = value.strip()
    if value.startswith(_SCHEMES):
        return value
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not parts:
        raise ValueError("no address given")
    if len(parts) == 1:
        return f"dns:///{parts[0]}"
    addresses = [_ip_address(part) for part in parts]
    names = [part for part, address in zip(parts, addresses, strict=True) if address is None]
    if names:
        raise ValueError(
            f"{value}: several addresses with host names ({', '.join(names)}); gRPC resolves one name per"
            " channel: give one DNS name that resolves to every replica (dns:///NAME:PORT: a compose service"
            " scaled with --scale, a Kubernetes headless Service) or IP addresses"
        )
    versions = {version for version, _ in addresses}  # type: ignore[misc]
    if len(versions) > 1:
        raise ValueError(f"{value}: mixes IPv4 and IPv6 addresses; use a DNS name that resolves to both")
    return f"ipv{versions.pop()}:{','.join(address for _, address in addresses)}"  # type: ignore[misc]


def service_config(stage: str) -> dict[str, Any]:
    """round_robin over healthy replicas; UNAVAILABLE retried (gRPC only retries before a response)."""
    service = STAGE_SERVICES[stage]
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": service},
        "methodConfig": [
            {
                "name": [{"service": service}, {"service": "ditserve.v1.Admin"}],
                "retryPolicy": {
                    "maxAttempts": MAX_ATTEMPTS,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }


def stage_channel_options(stage: str, max_message_mb: int) -> list[tuple[str, int | str]]:
    size = max_message_mb * MiB
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        *RECONNECT_OPTIONS,
        ("grpc.service_config", json.dumps(service_config(stage))),
        # ours, not one a DNS TXT record could swap in
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        # a retry replays the request, so it must stay buffered: a FLUX T5 embedding alone is 4 MiB
        ("grpc.per_rpc_retry_buffer_size", size),
        # stay connected (and health-checked) while no request comes: health must be known, not guessed
        ("grpc.client_idle_timeout_ms", 2**31 - 1),
    ]


class StageChannel:
    """One stage: a balanced channel, its stubs, and whether any replica serves."""

    def __init__(
        self,
        stage: str,
        address: str,
        stub_class: Callable[[grpc.Channel], Any],
        max_message_mb: int = 256,
        security: ClientSecurity = NO_SECURITY,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.stage = stage
        self.address = address
        self.target = stage_target(address)
        self.options = stage_channel_options(stage, max_message_mb)
        self.channel = security.channel(self.target, self.options)  # type: ignore[arg-type]
        self.stub = stub_class(self.channel)
        self.admin = common_pb2_grpc.AdminStub(self.channel)
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = grpc.ChannelConnectivity.IDLE
        self._down_since: float | None = time.monotonic()
        self._was_ready = False
        self._closing = False
        self.channel.subscribe(self._changed, try_to_connect=True)

    def _changed(self, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            self._state = state
            if state is grpc.ChannelConnectivity.READY:
                self._down_since = None
                self._was_ready = True
            elif self._down_since is None:
                self._down_since = time.monotonic()
        if state is grpc.ChannelConnectivity.IDLE and not self._closing:
            self.channel.unsubscribe(self._changed)  # leave idle: reconnect, and keep health known
            self.channel.subscribe(self._changed, try_to_connect=True)
        if self._on_change is not None:
            self._on_change()

    @property
    def state(self) -> grpc.ChannelConnectivity:
        """READY when at least one replica is connected and answers SERVING (round_robin's sum)."""
        with self._lock:
            return self._state

    def serving(self) -> bool:
        """A replica serves, or did until less than DOWN_AFTER_S ago (never before the first one did)."""
        with self._lock:
            if self._down_since is None:
                return True
            return self._was_ready and time.monotonic() - self._down_since < DOWN_AFTER_S

    def info(self, timeout: float) -> common_pb2.InfoResponse:
        """Admin.Info of one replica (every stage serves Admin on the same port)."""
        try:
            return self.admin.Info(common_pb2.InfoRequest(), timeout=timeout)
        except grpc.RpcError as error:
            raise StageError(self.stage, error) from None

    def stop_watching(self) -> None:
        self._closing = True
        self.channel.unsubscribe(self._changed)

    def close(self) -> None:
        """Closes once grpc's connectivity poller noticed nobody watches: it polls every 0.2 s and
        raises "Channel closed!" in its thread when the channel closes under it."""
        if not self._closing:
            self.stop_watching()
            time.sleep(POLL_SETTLE_S)
        self.channel.close()

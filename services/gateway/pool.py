"""A stage's replicas: round-robin over addresses, the next one on UNAVAILABLE.

Only UNAVAILABLE is retried (the replica is down or draining, so the request
never started there); every other status is the stage's answer and goes back
to the caller unchanged.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from ditserve.client.security import NO_SECURITY, ClientSecurity
from ditserve.services.common.errors import ServiceError
from ditserve.v1 import common_pb2, common_pb2_grpc

T = TypeVar("T")


class StageError(ServiceError):
    """A stage's own status, passed through with the stage named."""

    def __init__(self, stage: str, error: grpc.RpcError) -> None:
        super().__init__(f"{stage}: {error.details()}")
        self.code = error.code()


class StagePool:
    def __init__(
        self,
        stage: str,
        addresses: list[str],
        stub_class: Callable[[grpc.Channel], Any],
        options: list,
        security: ClientSecurity = NO_SECURITY,
    ) -> None:
        if not addresses:
            raise ValueError(f"no addresses for the {stage} stage")
        self.stage = stage
        self.addresses = addresses
        self._channels = [security.channel(address, options) for address in addresses]
        self._stubs = [stub_class(channel) for channel in self._channels]
        self._admin_stubs = [common_pb2_grpc.AdminStub(channel) for channel in self._channels]
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def _rotation(self, stubs: list[Any] | None = None) -> list[Any]:
        stubs = self._stubs if stubs is None else stubs
        with self._lock:
            start = next(self._counter) % len(stubs)
        return stubs[start:] + stubs[:start]

    def call(self, attempt: Callable[[Any], T]) -> T:
        """Runs `attempt(stub)` on replicas in turn until one does not answer UNAVAILABLE."""
        return self._call(attempt, self._rotation())

    def info(self, timeout: float) -> common_pb2.InfoResponse:
        """Admin.Info of one replica (every stage serves Admin on the same port)."""
        return self._call(
            lambda stub: stub.Info(common_pb2.InfoRequest(), timeout=timeout), self._rotation(self._admin_stubs)
        )

    def _call(self, attempt: Callable[[Any], T], stubs: list[Any]) -> T:
        for index, stub in enumerate(stubs):
            try:
                return attempt(stub)
            except grpc.RpcError as error:
                if error.code() is grpc.StatusCode.UNAVAILABLE and index + 1 < len(stubs):
                    continue
                raise StageError(self.stage, error) from None
        raise AssertionError("unreachable: the loop returns or raises")

    def stream(self, open_stream: Callable[[Any], Iterator[T]]) -> Iterator[T]:
        """Like call() for server streams: retried only while no message has arrived yet."""
        stubs = self._rotation()
        for index, stub in enumerate(stubs):
            received = False
            try:
                for message in open_stream(stub):
                    received = True
                    yield message
                return
            except grpc.RpcError as error:
                retry = error.code() is grpc.StatusCode.UNAVAILABLE and not received and index + 1 < len(stubs)
                if not retry:
                    raise StageError(self.stage, error) from None

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

"""The one server interceptor: maps our errors to statuses and records RPC metrics.

Every handler of every service passes through here, so status codes, request
counters, durations and in-flight gauges are uniform and no handler aborts by hand.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ditserve.client.tensors import TensorError
from ditserve.services.common.errors import ServiceError, Unavailable
from ditserve.services.common.metrics import ServiceMetrics
from ditserve.services.common.security import BearerAuth

log = logging.getLogger(__name__)


def _status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ServiceError):
        return error.code, str(error)
    if isinstance(error, TensorError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def _ended_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """Why a stream stopped early: the caller's deadline or its cancellation."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


# Control-plane RPCs keep answering while a replica drains, so probes see NOT_SERVING.
CONTROL_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.", "/ditserve.v1.Admin/")


class Drain:
    """Counts work RPCs in flight; once draining, refuses new ones with UNAVAILABLE."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._active = 0
        self._draining = False

    def enter(self) -> None:
        with self._condition:
            if self._draining:
                raise Unavailable("draining: this replica is shutting down; retry another")
            self._active += 1

    def leave(self) -> None:
        with self._condition:
            self._active -= 1
            self._condition.notify_all()

    def begin(self) -> None:
        with self._condition:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """True when every admitted RPC finished within `timeout` seconds."""
        with self._condition:
            return self._condition.wait_for(lambda: self._active == 0, timeout)


class ObservabilityInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: ServiceMetrics, auth: BearerAuth | None = None) -> None:
        self.metrics = metrics
        self.auth = auth
        self.drain = Drain()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method  # /package.Service/Method
        work = not method.startswith(CONTROL_PREFIXES)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary, work),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream, work),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # streaming-request RPCs (reflection) pass through untouched

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        service = self.metrics.service
        self.metrics.requests.labels(service, method, code.name).inc()
        self.metrics.duration.labels(service, method).observe(time.perf_counter() - started)
        self.metrics.in_flight.dec()

    @staticmethod
    def _status(context: grpc.ServicerContext, error: Exception) -> tuple[grpc.StatusCode, str]:
        """The status to end with: one the handler already set wins, else the mapped one."""
        if context.code() not in (None, grpc.StatusCode.OK):
            return context.code(), context.details() or ""
        code, message = _status_of(error)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("unhandled error in %s", type(error).__name__)
        return code, message

    @contextlib.contextmanager
    def _observed(self, method: str, context: grpc.ServicerContext, work: bool) -> Iterator[None]:
        """Around every handler: authentication, drain accounting, error -> status mapping, RPC metrics."""
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        code = grpc.StatusCode.OK
        entered = False
        try:
            if self.auth is not None:
                self.auth.check(method, context)
            if work:
                self.drain.enter()
                entered = True
                if any(key == "grpc-previous-rpc-attempts" for key, _ in context.invocation_metadata() or ()):
                    self.metrics.retried.labels(self.metrics.service, method.rsplit("/", 1)[-1]).inc()
            yield
        except GeneratorExit:  # grpc closes a stream when its caller goes away
            code = _ended_code(context)
            raise
        except Exception as error:
            code, message = self._status(context, error)
            context.abort(code, message)  # raises: grpc sends the status
        finally:
            if entered:
                self.drain.leave()
            self._record(method.rsplit("/", 1)[-1], code, started)

    def _unary(self, method: str, behavior: Callable, work: bool) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            with self._observed(method, context, work):
                return behavior(request, context)

        return wrapped

    def _stream(self, method: str, behavior: Callable, work: bool) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with self._observed(method, context, work):
                yield from behavior(request, context)

        return wrapped

"""Our exception classes and the gRPC status each one maps to.

Handlers raise these; the one interceptor in rpc.py turns them into statuses,
so no handler calls context.abort itself.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error that ends one request, never the process."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """The request can never work; `field` names the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ResourceExhausted(ServiceError):
    """Full queue or over a limit: the caller may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """The stage is down, draining or not loaded yet."""

    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ServiceError):
    """The request is valid but the service is not in a state to run it (e.g. no profile running)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Cancelled(ServiceError):
    """The caller went away or its deadline passed while we worked."""

    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StartupError(RuntimeError):
    """A configuration that cannot be served: raised before binding, with what to change."""


class ModelLoadError(StartupError):
    """A model folder that cannot be served: names the path and what is wrong."""

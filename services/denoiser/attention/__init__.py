"""Attention backends for the denoiser: registry, `auto` rules and the one dispatch point.

The denoiser calls resolve_backend(default_backend_name() or --attention-backend, ...), logs the reason,
then the model family routes its attention layers through `attention(q, k, v, backend)` (e.g.
families/flux/attention.py). See registry.py for the rules, benchmark.py and choice.py for `auto` by
measurement (on CUDA, cached per GPU, torch version, backend set and shape).
"""

from ditserve.services.denoiser.attention.registry import (
    ENV_VAR,
    AttentionBackendUnavailable,
    BackendName,
    attention,
    available_backends,
    default_backend_name,
    format_availability,
    resolve_backend,
)

__all__ = [
    "ENV_VAR",
    "AttentionBackendUnavailable",
    "BackendName",
    "attention",
    "available_backends",
    "default_backend_name",
    "format_availability",
    "resolve_backend",
]

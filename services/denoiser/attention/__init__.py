"""Attention backends for the denoiser: registry, `auto` rules, dispatch, and the FLUX processor.

The denoiser calls resolve_backend(default_backend_name() or --attention-backend, ...), logs the reason,
then apply_attention_backend(transformer, backend). See registry.py for the rules, flux.py for the wiring.
"""

from ditserve.services.denoiser.attention.flux import DitserveFluxAttnProcessor, apply_attention_backend
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
    "DitserveFluxAttnProcessor",
    "apply_attention_backend",
    "attention",
    "available_backends",
    "default_backend_name",
    "format_availability",
    "resolve_backend",
]

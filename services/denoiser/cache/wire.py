"""CachePolicy messages (and the --cache-policy flag's JSON form) -> validated CacheConfig."""

from __future__ import annotations

from ditserve.services.common.errors import InvalidArgument
from ditserve.services.denoiser.cache.policy import (
    CacheConfig,
    DBCacheConfig,
    SCMConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from ditserve.v1 import cache_pb2

TEACACHE_FIELDS = ("threshold", "forced_first_steps", "forced_last_steps")
DBCACHE_FIELDS = (
    "fn",
    "bn",
    "residual_diff_threshold",
    "max_warmup_steps",
    "warmup_interval",
    "max_cached_steps",
    "max_continuous_cached_steps",
)


def _given(message: object, names: tuple[str, ...]) -> dict[str, object]:
    """Only the fields the caller set: unset ones keep the config's defaults."""
    return {name: getattr(message, name) for name in names if message.HasField(name)}


def cache_config(policy: cache_pb2.CachePolicy, field: str = "cache") -> CacheConfig:
    """Validates a request's policy; errors name the field as sent (`cache.dbcache.fn`)."""
    kind = policy.WhichOneof("policy")
    try:
        if kind == "teacache":
            message = policy.teacache
            options = _given(message, TEACACHE_FIELDS)
            if message.coefficients:
                options["coefficients"] = tuple(message.coefficients)
            if message.HasField("taylorseer"):
                options["taylorseer"] = TaylorSeerConfig(order=message.taylorseer.order, parent="teacache")
            return CacheConfig(teacache=TeaCacheConfig(**options))
        if kind == "dbcache":
            message = policy.dbcache
            options = _given(message, DBCACHE_FIELDS)
            if message.HasField("taylorseer"):
                options["taylorseer"] = TaylorSeerConfig(order=message.taylorseer.order)
            if message.HasField("scm"):
                scm = message.scm
                options["scm"] = SCMConfig(
                    preset=scm.preset or None,
                    compute_bins=tuple(scm.compute_bins) or None,
                    cache_bins=tuple(scm.cache_bins) or None,
                    policy=scm.policy or "dynamic",
                    computed_steps=scm.computed_steps if scm.HasField("computed_steps") else None,
                )
            return CacheConfig(dbcache=DBCacheConfig(**options))
    except InvalidArgument as error:
        raise InvalidArgument(f"{field}.{error.field.removeprefix('cache.')}", error.reason) from None
    return CacheConfig()


def parse_flag(text: str) -> CacheConfig:
    """--cache-policy: 'none', 'teacache', 'dbcache' (their defaults) or a CachePolicy in JSON."""
    from ditserve.client.cache_policy import parse_cache_policy

    try:
        message = parse_cache_policy(text)
    except ValueError as error:
        raise InvalidArgument("--cache-policy", str(error)) from None
    return cache_config(message, "--cache-policy")

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CachePolicy(_message.Message):
    __slots__ = ("none", "teacache", "dbcache")
    NONE_FIELD_NUMBER: _ClassVar[int]
    TEACACHE_FIELD_NUMBER: _ClassVar[int]
    DBCACHE_FIELD_NUMBER: _ClassVar[int]
    none: NoCache
    teacache: TeaCachePolicy
    dbcache: DbCachePolicy
    def __init__(self, none: _Optional[_Union[NoCache, _Mapping]] = ..., teacache: _Optional[_Union[TeaCachePolicy, _Mapping]] = ..., dbcache: _Optional[_Union[DbCachePolicy, _Mapping]] = ...) -> None: ...

class NoCache(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TeaCachePolicy(_message.Message):
    __slots__ = ("threshold", "coefficients", "forced_first_steps", "forced_last_steps", "taylorseer")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIRST_STEPS_FIELD_NUMBER: _ClassVar[int]
    FORCED_LAST_STEPS_FIELD_NUMBER: _ClassVar[int]
    TAYLORSEER_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    coefficients: _containers.RepeatedScalarFieldContainer[float]
    forced_first_steps: int
    forced_last_steps: int
    taylorseer: TaylorSeerPolicy
    def __init__(self, threshold: _Optional[float] = ..., coefficients: _Optional[_Iterable[float]] = ..., forced_first_steps: _Optional[int] = ..., forced_last_steps: _Optional[int] = ..., taylorseer: _Optional[_Union[TaylorSeerPolicy, _Mapping]] = ...) -> None: ...

class TaylorSeerPolicy(_message.Message):
    __slots__ = ("order",)
    ORDER_FIELD_NUMBER: _ClassVar[int]
    order: int
    def __init__(self, order: _Optional[int] = ...) -> None: ...

class ScmPolicy(_message.Message):
    __slots__ = ("preset", "compute_bins", "cache_bins", "policy", "computed_steps")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_BINS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BINS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    preset: str
    compute_bins: _containers.RepeatedScalarFieldContainer[int]
    cache_bins: _containers.RepeatedScalarFieldContainer[int]
    policy: str
    computed_steps: int
    def __init__(self, preset: _Optional[str] = ..., compute_bins: _Optional[_Iterable[int]] = ..., cache_bins: _Optional[_Iterable[int]] = ..., policy: _Optional[str] = ..., computed_steps: _Optional[int] = ...) -> None: ...

class DbCachePolicy(_message.Message):
    __slots__ = ("fn", "bn", "residual_diff_threshold", "max_warmup_steps", "warmup_interval", "max_cached_steps", "max_continuous_cached_steps", "taylorseer", "scm")
    FN_FIELD_NUMBER: _ClassVar[int]
    BN_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_DIFF_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTINUOUS_CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    TAYLORSEER_FIELD_NUMBER: _ClassVar[int]
    SCM_FIELD_NUMBER: _ClassVar[int]
    fn: int
    bn: int
    residual_diff_threshold: float
    max_warmup_steps: int
    warmup_interval: int
    max_cached_steps: int
    max_continuous_cached_steps: int
    taylorseer: TaylorSeerPolicy
    scm: ScmPolicy
    def __init__(self, fn: _Optional[int] = ..., bn: _Optional[int] = ..., residual_diff_threshold: _Optional[float] = ..., max_warmup_steps: _Optional[int] = ..., warmup_interval: _Optional[int] = ..., max_cached_steps: _Optional[int] = ..., max_continuous_cached_steps: _Optional[int] = ..., taylorseer: _Optional[_Union[TaylorSeerPolicy, _Mapping]] = ..., scm: _Optional[_Union[ScmPolicy, _Mapping]] = ...) -> None: ...

from ditserve.v1 import cache_pb2 as _cache_pb2
from ditserve.v1 import common_pb2 as _common_pb2
from ditserve.v1 import encoder_pb2 as _encoder_pb2
from ditserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "true_cfg_scale", "seed", "num_images", "profile_steps", "cache", "num_frames")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    TRUE_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_STEPS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: _encoder_pb2.PromptEmbedding
    negative_prompt: _encoder_pb2.PromptEmbedding
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    seed: int
    num_images: int
    profile_steps: int
    cache: _cache_pb2.CachePolicy
    num_frames: int
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[_Union[_encoder_pb2.PromptEmbedding, _Mapping]] = ..., negative_prompt: _Optional[_Union[_encoder_pb2.PromptEmbedding, _Mapping]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., true_cfg_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., profile_steps: _Optional[int] = ..., cache: _Optional[_Union[_cache_pb2.CachePolicy, _Mapping]] = ..., num_frames: _Optional[int] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("step", "total_steps", "step_ms")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    step_ms: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., step_ms: _Optional[float] = ...) -> None: ...

class DenoiseResult(_message.Message):
    __slots__ = ("latents", "height", "width", "timing", "profile_trace", "num_frames", "batched")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    PROFILE_TRACE_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_FIELD_NUMBER: _ClassVar[int]
    latents: _tensor_pb2.Tensor
    height: int
    width: int
    timing: _common_pb2.Timing
    profile_trace: str
    num_frames: int
    batched: bool
    def __init__(self, latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ..., profile_trace: _Optional[str] = ..., num_frames: _Optional[int] = ..., batched: _Optional[bool] = ...) -> None: ...

class DenoiseEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: StepProgress
    result: DenoiseResult
    def __init__(self, progress: _Optional[_Union[StepProgress, _Mapping]] = ..., result: _Optional[_Union[DenoiseResult, _Mapping]] = ...) -> None: ...

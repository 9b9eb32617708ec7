from ditserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PNG: _ClassVar[ImageFormat]
    JPEG: _ClassVar[ImageFormat]
    WEBP: _ClassVar[ImageFormat]
    RAW: _ClassVar[ImageFormat]

class VideoFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MP4: _ClassVar[VideoFormat]
    ANIMATED_WEBP: _ClassVar[VideoFormat]
    RAW_FRAMES: _ClassVar[VideoFormat]
PNG: ImageFormat
JPEG: ImageFormat
WEBP: ImageFormat
RAW: ImageFormat
MP4: VideoFormat
ANIMATED_WEBP: VideoFormat
RAW_FRAMES: VideoFormat

class Timing(_message.Message):
    __slots__ = ("queue_ms", "stage_ms", "step_ms", "total_ms", "computed_steps")
    class StageMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ComputedStepsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    stage_ms: _containers.ScalarMap[str, float]
    step_ms: _containers.RepeatedScalarFieldContainer[float]
    total_ms: float
    computed_steps: _containers.ScalarMap[str, str]
    def __init__(self, queue_ms: _Optional[float] = ..., stage_ms: _Optional[_Mapping[str, float]] = ..., step_ms: _Optional[_Iterable[float]] = ..., total_ms: _Optional[float] = ..., computed_steps: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("format", "data", "pixels", "width", "height")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    format: ImageFormat
    data: bytes
    pixels: _tensor_pb2.Tensor
    width: int
    height: int
    def __init__(self, format: _Optional[_Union[ImageFormat, str]] = ..., data: _Optional[bytes] = ..., pixels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Video(_message.Message):
    __slots__ = ("format", "data", "frames", "width", "height", "num_frames", "fps")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    format: VideoFormat
    data: bytes
    frames: _tensor_pb2.Tensor
    width: int
    height: int
    num_frames: int
    fps: float
    def __init__(self, format: _Optional[_Union[VideoFormat, str]] = ..., data: _Optional[bytes] = ..., frames: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ..., fps: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("service", "model", "dtype", "device", "version", "attention_backend", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    service: str
    model: str
    dtype: str
    device: str
    version: str
    attention_backend: str
    details: _containers.ScalarMap[str, str]
    def __init__(self, service: _Optional[str] = ..., model: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., version: _Optional[str] = ..., attention_backend: _Optional[str] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartProfileRequest(_message.Message):
    __slots__ = ("name", "record_shapes", "with_stack")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RECORD_SHAPES_FIELD_NUMBER: _ClassVar[int]
    WITH_STACK_FIELD_NUMBER: _ClassVar[int]
    name: str
    record_shapes: bool
    with_stack: bool
    def __init__(self, name: _Optional[str] = ..., record_shapes: _Optional[bool] = ..., with_stack: _Optional[bool] = ...) -> None: ...

class StopProfileRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProfileStatus(_message.Message):
    __slots__ = ("running", "trace_path")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    TRACE_PATH_FIELD_NUMBER: _ClassVar[int]
    running: bool
    trace_path: str
    def __init__(self, running: _Optional[bool] = ..., trace_path: _Optional[str] = ...) -> None: ...

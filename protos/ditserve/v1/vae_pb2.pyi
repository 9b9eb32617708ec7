from ditserve.v1 import common_pb2 as _common_pb2
from ditserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("latents", "height", "width", "format", "quality", "num_frames", "fps", "video_format", "batched")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FORMAT_FIELD_NUMBER: _ClassVar[int]
    BATCHED_FIELD_NUMBER: _ClassVar[int]
    latents: _tensor_pb2.Tensor
    height: int
    width: int
    format: _common_pb2.ImageFormat
    quality: int
    num_frames: int
    fps: float
    video_format: _common_pb2.VideoFormat
    batched: bool
    def __init__(self, latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ..., num_frames: _Optional[int] = ..., fps: _Optional[float] = ..., video_format: _Optional[_Union[_common_pb2.VideoFormat, str]] = ..., batched: _Optional[bool] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("images", "timing", "videos")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    timing: _common_pb2.Timing
    videos: _containers.RepeatedCompositeFieldContainer[_common_pb2.Video]
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ..., videos: _Optional[_Iterable[_Union[_common_pb2.Video, _Mapping]]] = ...) -> None: ...

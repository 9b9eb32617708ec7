from ditserve.v1 import common_pb2 as _common_pb2
from ditserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("prompts", "max_sequence_length", "allow_empty")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ALLOW_EMPTY_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    max_sequence_length: int
    allow_empty: bool
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., max_sequence_length: _Optional[int] = ..., allow_empty: _Optional[bool] = ...) -> None: ...

class PromptEmbedding(_message.Message):
    __slots__ = ("prompt_embeds", "pooled_prompt_embeds")
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    prompt_embeds: _tensor_pb2.Tensor
    pooled_prompt_embeds: _tensor_pb2.Tensor
    def __init__(self, prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., pooled_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("embeddings", "timing")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[PromptEmbedding]
    timing: _common_pb2.Timing
    def __init__(self, embeddings: _Optional[_Iterable[_Union[PromptEmbedding, _Mapping]]] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

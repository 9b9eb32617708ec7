"""TextEncoder.Encode: one embedding per prompt, each encoded alone.

Prompts are encoded one at a time so a prompt's embedding never depends on
what else is in the request (padding and batch-size-dependent kernels).
"""

from __future__ import annotations

import threading
import time

import grpc

from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.limits import check_prompt, check_range
from ditserve.services.common.profiling import trace_range
from ditserve.services.common.stage import StageContext
from ditserve.services.common.timing import elapsed_ms
from ditserve.services.families import load_family
from ditserve.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

MAX_PROMPTS = 64


class EncoderService(encoder_pb2_grpc.TextEncoderServicer):
    role = "encoder"

    def __init__(self, stage: StageContext) -> None:
        self.stage = stage
        self.metrics = stage.metrics
        self.profiler = stage.profiler
        self.model = load_family(stage.folder).text_encoder(stage.folder, stage.device, stage.dtype)
        self.max_sequence_length = min(stage.limits.max_sequence_length, self.model.max_sequence_length)
        self._lock = threading.Lock()  # one encode at a time bounds activation memory
        stage.publish_model_info()

    def grpc_service_names(self) -> list[str]:
        return ["ditserve.v1.TextEncoder"]

    def register(self, server: grpc.Server) -> None:
        encoder_pb2_grpc.add_TextEncoderServicer_to_server(self, server)

    def info(self) -> common_pb2.InfoResponse:
        return self.stage.info(max_sequence_length=self.max_sequence_length)

    def close(self) -> None:
        pass

    def _validate(self, request: encoder_pb2.EncodeRequest) -> int:
        if not request.prompts:
            raise InvalidArgument("prompts", "is empty: give at least one prompt")
        if len(request.prompts) > MAX_PROMPTS:
            raise InvalidArgument("prompts", f"has {len(request.prompts)} prompts, over the limit of {MAX_PROMPTS}")
        for i, prompt in enumerate(request.prompts):
            check_prompt(f"prompts[{i}]", prompt, self.stage.limits, allow_empty=request.allow_empty)
        length = request.max_sequence_length or min(
            self.stage.folder.defaults.max_sequence_length, self.max_sequence_length
        )
        check_range("max_sequence_length", length, 1, self.max_sequence_length)
        return length

    def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.ServicerContext) -> encoder_pb2.EncodeResponse:
        started = time.perf_counter()
        length = self._validate(request)
        response = encoder_pb2.EncodeResponse()
        with self._lock, trace_range("encode"):
            queue_ms = elapsed_ms(started)
            response.embeddings.extend(self.model.encode(prompt, length) for prompt in request.prompts)
        self.metrics.count_bytes("out", response.ByteSize())
        total = elapsed_ms(started)
        response.timing.CopyFrom(
            common_pb2.Timing(queue_ms=queue_ms, stage_ms={"encode": total - queue_ms}, total_ms=total)
        )
        return response

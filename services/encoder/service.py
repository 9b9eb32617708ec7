"""TextEncoder.Encode: one embedding per prompt, each encoded alone.

Prompts are encoded one at a time so a prompt's embedding never depends on
what else is in the request (padding and batch-size-dependent kernels).
"""

from __future__ import annotations

import threading
import time

import grpc
import torch
from diffusers import FluxPipeline

from ditserve.services.common import tensor_codec
from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.limits import check_prompt, check_range
from ditserve.services.common.profiling import trace_range
from ditserve.services.common.stage import StageContext, elapsed_ms
from ditserve.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

MAX_PROMPTS = 64


class EncoderService(encoder_pb2_grpc.TextEncoderServicer):
    role = "encoder"

    def __init__(self, stage: StageContext) -> None:
        self.stage = stage
        self.metrics = stage.metrics
        self.profiler = stage.profiler
        folder = stage.folder
        # A text-only FluxPipeline gives us FluxPipeline's own prompt encoding.
        self.pipe = FluxPipeline(
            scheduler=None,
            vae=None,
            transformer=None,
            tokenizer=folder.load("tokenizer"),
            tokenizer_2=folder.load("tokenizer_2"),
            text_encoder=folder.load("text_encoder", stage.device, stage.dtype),
            text_encoder_2=folder.load("text_encoder_2", stage.device, stage.dtype),
        )
        self.max_sequence_length = min(stage.limits.max_sequence_length, self.pipe.tokenizer_2.model_max_length)
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
        with self._lock, torch.inference_mode(), trace_range("encode"):
            queue_ms = elapsed_ms(started)
            for prompt in request.prompts:
                embeds, pooled, _ = self.pipe.encode_prompt(
                    prompt=prompt, prompt_2=None, device=self.stage.device, max_sequence_length=length
                )
                response.embeddings.add(
                    prompt_embeds=tensor_codec.encode(embeds),
                    pooled_prompt_embeds=tensor_codec.encode(pooled),
                )
        self.metrics.count_bytes("out", response.ByteSize())
        total = elapsed_ms(started)
        response.timing.CopyFrom(
            common_pb2.Timing(queue_ms=queue_ms, stage_ms={"encode": total - queue_ms}, total_ms=total)
        )
        return response

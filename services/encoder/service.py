"""TextEncoder.Encode: one embedding per prompt, each encoded alone.

Prompts are encoded one at a time so a prompt's embedding never depends on
what else is in the request (padding and batch-size-dependent kernels). That
makes an embedding a function of (encoder, prompt, sequence length), so a
byte-bounded cache (embedding_cache.py) answers repeated prompts, the empty
negative prompt of every CFG request included, without the model.
"""

from __future__ import annotations

import time

import grpc
from prometheus_client import Counter, Gauge

from ditserve.services.common.errors import InvalidArgument
from ditserve.services.common.limits import check_prompt, check_range
from ditserve.services.common.profiling import trace_range
from ditserve.services.common.stage import StageContext
from ditserve.services.common.timing import elapsed_ms
from ditserve.services.encoder.embedding_cache import ByteLRU
from ditserve.services.families import load_family
from ditserve.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

MAX_PROMPTS = 64


class EncoderService(encoder_pb2_grpc.TextEncoderServicer):
    role = "encoder"

    def __init__(self, stage: StageContext, embedding_cache_mb: float = 0.0) -> None:
        self.stage = stage
        self.metrics = stage.metrics
        self.profiler = stage.profiler
        self.model = load_family(stage.folder).text_encoder(stage.folder, stage.device, stage.dtype)
        self.max_sequence_length = min(stage.limits.max_sequence_length, self.model.max_sequence_length)
        # Keys carry the encoder's identity, so a cache never answers for another model, dtype or device.
        self.identity = (str(stage.folder.path), str(stage.dtype), str(stage.device))
        self.cache: ByteLRU[encoder_pb2.PromptEmbedding] | None = (
            ByteLRU(int(embedding_cache_mb * 2**20)) if embedding_cache_mb > 0 else None
        )
        registry = self.metrics.registry
        self.cache_lookups = Counter(
            "ditserve_embedding_cache_lookups",
            "Prompts looked up in the encoder's embedding cache, by result (hit or miss)",
            ["result"],
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "ditserve_embedding_cache_bytes", "Bytes of embeddings the encoder's cache holds", registry=registry
        )
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

    def _cached(self, prompt: str, length: int) -> encoder_pb2.PromptEmbedding | None:
        if self.cache is None:
            return None
        embedding = self.cache.get((self.identity, prompt, length))
        self.cache_lookups.labels("miss" if embedding is None else "hit").inc()
        return embedding

    def _encode(self, prompt: str, length: int) -> encoder_pb2.PromptEmbedding:
        """The model's embedding, kept in the cache (the empty prompt pinned: every CFG request sends it)."""
        embedding = self.model.encode(prompt, length)
        if self.cache is not None:
            self.cache.put((self.identity, prompt, length), embedding, embedding.ByteSize(), pinned=not prompt)
            self.cache_bytes.set(self.cache.stats.bytes)
        return embedding

    def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.ServicerContext) -> encoder_pb2.EncodeResponse:
        started = time.perf_counter()
        length = self._validate(request)
        response = encoder_pb2.EncodeResponse()
        queue_ms = 0.0
        with trace_range("encode"):  # the stage's work in a profile, from the cache or the model
            embeddings = [self._cached(prompt, length) for prompt in request.prompts]
            if any(embedding is None for embedding in embeddings):

                def encode_missing() -> float:
                    waited_ms = elapsed_ms(started)
                    for index, prompt in enumerate(request.prompts):
                        if embeddings[index] is None:
                            embeddings[index] = self._encode(prompt, length)
                    return waited_ms

                # one encode at a time (it bounds activation memory), on the stage's compute thread
                queue_ms = self.stage.compute.run(encode_missing)
        response.embeddings.extend(embeddings)
        self.metrics.count_bytes("out", response.ByteSize())
        total = elapsed_ms(started)
        response.timing.CopyFrom(
            common_pb2.Timing(queue_ms=queue_ms, stage_ms={"encode": total - queue_ms}, total_ms=total)
        )
        return response

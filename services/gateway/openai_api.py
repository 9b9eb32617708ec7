"""OpenAI's API schema on our wire: request bodies to GenerateRequest, gRPC statuses to HTTP errors.

Pure mapping (no server, no event loop), so it is unit-tested alone (tests/unit/test_http_mapping.py);
http.py serves it.
"""

import base64
import json
import re
import time
from typing import Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ditserve.client.cache_policy import parse_cache_policy
from ditserve.client.stub import generate_request
from ditserve.v1 import pipeline_pb2

# gRPC status -> (HTTP status, OpenAI error type). Anything unlisted is a 500.
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}

# GenerateRequest field (as the gateway's INVALID_ARGUMENT names it) -> the HTTP body's field.
GRPC_TO_HTTP_FIELD = {
    "num_images": "n",
    "width": "size",
    "height": "size",
    "quality": "output_compression",
    "output_format": "output_format",
    "cache": "cache_policy",
}
STAGE_NAMES = ("encoder", "denoiser", "vae")
_FIELD_MESSAGE = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.*)$", re.DOTALL)


def http_param(grpc_field: str) -> str:
    """The request-body field a gRPC field path stands for (`cache.dbcache.fn` -> `cache_policy.dbcache.fn`)."""
    head, dot, rest = grpc_field.partition(".")
    mapped = GRPC_TO_HTTP_FIELD.get(head, head)
    return f"{mapped}{dot}{rest}"


def openai_error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """The body OpenAI's API answers with on an error (what the `openai` SDK parses)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code or str(status)}}


def error_from_rpc(code: grpc.StatusCode, details: str) -> tuple[int, dict]:
    """HTTP status and OpenAI error body for a gRPC status; INVALID_ARGUMENT's field becomes `param`."""
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    param = None
    message = details or code.name
    # A stage's own complaint reaches us as "denoiser: cache.dbcache.fn: ..." through the gateway.
    stage, sep, rest = (details or "").partition(": ")
    match = _FIELD_MESSAGE.match(rest if sep and stage in STAGE_NAMES else details or "")
    if match and status == 400:
        grpc_field, reason = match.groups()
        param = http_param(grpc_field)
        message = f"{param}: {reason}" if param == grpc_field else f"{param} ({grpc_field}): {reason}"
    return status, openai_error(status, message, kind, param, code.name.lower())


class HttpError(Exception):
    """An error this layer answers itself (schema, size, body) before any gRPC call."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = openai_error(status, message, kind, param, code)


class ImageGenerationRequest(BaseModel):
    """OpenAI's Images API body, plus the extras SGLang's users send and our cache_policy."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = Field(None, description="accepted and ignored: a gateway serves one model")
    n: int = Field(1, ge=1, description="images for this prompt")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' in pixels, multiples of 16; 'auto' = the model's")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="only b64_json (no storage)")
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG/WebP quality; 0 = 90")
    stream: bool = Field(False, description="server-sent progress events, then the images")
    quality: str | None = Field(None, description="OpenAI's; accepted and ignored")
    style: str | None = Field(None, description="OpenAI's; accepted and ignored")
    background: str | None = Field(None, description="OpenAI's; accepted and ignored")
    moderation: str | None = Field(None, description="OpenAI's; accepted and ignored")
    partial_images: int | None = Field(None, description="OpenAI's; accepted and ignored")
    user: str | None = Field(None, description="OpenAI's; accepted and ignored")
    seed: int | None = Field(None, ge=0, lt=2**64, description="unset = random, reported back as `seed`")
    num_inference_steps: int | None = Field(None, ge=1, description="unset = the model's")
    guidance_scale: float | None = Field(None, description="distilled guidance (FLUX.1-dev)")
    true_cfg_scale: float | None = Field(None, description="true CFG; > 1 also runs negative_prompt")
    negative_prompt: str | None = None
    max_sequence_length: int | None = Field(None, ge=1)
    cache_policy: str | dict[str, Any] | None = Field(
        None, description="none, teacache, dbcache, or a CachePolicy as JSON (the same as --cache-policy)"
    )


def parse_size(size: str | None) -> tuple[int, int]:
    """'WxH' -> (width, height); None or 'auto' -> (0, 0), the model's default."""
    if size is None or size == "auto":
        return 0, 0
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if not match:
        raise HttpError(400, f"size: {size!r} is not WIDTHxHEIGHT (e.g. 1024x1024) or auto", param="size")
    return int(match.group(1)), int(match.group(2))


def to_generate_request(body: ImageGenerationRequest, request_id: str = "") -> pipeline_pb2.GenerateRequest:
    """The OpenAI body as the gateway's GenerateRequest; the gateway validates values and limits."""
    if body.response_format == "url":
        raise HttpError(
            400,
            "response_format: 'url' needs image storage, which this server does not keep; use b64_json",
            param="response_format",
        )
    return generate_request(
        body.prompt,
        true_cfg_scale=body.true_cfg_scale,
        num_images=body.n,
        output_format=body.output_format or "png",
        request_id=request_id,
        **_shared_settings(body),
    )


def _shared_settings(body: "ImageGenerationRequest | VideoGenerationRequest") -> dict[str, Any]:
    """What the image and video bodies name alike, as generate_request's keywords (0 = the model's)."""
    width, height = parse_size(body.size)
    try:
        cache = None if body.cache_policy is None else parse_cache_policy(body.cache_policy)
    except ValueError as error:
        raise HttpError(400, f"cache_policy: {error}", param="cache_policy") from None
    return {
        "negative_prompt": body.negative_prompt or "",
        "width": width,
        "height": height,
        "steps": body.num_inference_steps or 0,
        "guidance_scale": body.guidance_scale,
        "seed": body.seed,
        "quality": body.output_compression or 0,
        "max_sequence_length": body.max_sequence_length or 0,
        "cache": cache,
    }


def validation_error(error: ValidationError) -> HttpError:
    """pydantic's first complaint as a 400 naming the field (`param`)."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"] if first["type"] != "extra_forbidden" else "unknown field"
    return HttpError(400, f"{param}: {message}" if param else message, param=param, code=first["type"])


def images_body(result: pipeline_pb2.GenerateResult, output_format: str) -> dict:
    """OpenAI's ImagesResponse, plus the seed and request id actually used."""
    first = result.images[0] if result.images else None
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(image.data).decode("ascii")} for image in result.images],
        "output_format": output_format,
        "size": f"{first.width}x{first.height}" if first else None,
        "seed": result.seed,
        "request_id": result.request_id,
        "timing": {"total_ms": result.timing.total_ms, "stage_ms": dict(result.timing.stage_ms)},
    }


def sse(event: str, data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"event: {event}\ndata: {payload}\n\n".encode()


class VideoGenerationRequest(BaseModel):
    """OpenAI's video API create body (POST /v1/videos), plus the settings users of Wan send."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = Field(None, description="accepted and ignored: a gateway serves one model")
    seconds: float | str | None = Field(
        None, description="clip length; frames = seconds x fps, rounded to tk+1 (t: the VAE's temporal compression)"
    )
    size: str | None = Field(None, description="'WIDTHxHEIGHT' in pixels, multiples of 16; unset = the model's")
    num_frames: int | None = Field(None, ge=1, description="frames (tk+1; Wan2.1: 4k+1); wins over seconds")
    fps: float | None = Field(None, gt=0, le=240, description="unset = the model's")
    output_format: Literal["mp4", "webp"] = "mp4"
    output_compression: int | None = Field(None, ge=0, le=100, description="quality 1-100; 0 = 90")
    seed: int | None = Field(None, ge=0, lt=2**64, description="unset = random, reported back as `seed`")
    num_inference_steps: int | None = Field(None, ge=1, description="unset = the model's")
    guidance_scale: float | None = Field(None, description="classic CFG (Wan); > 1 also runs negative_prompt")
    negative_prompt: str | None = None
    max_sequence_length: int | None = Field(None, ge=1)
    cache_policy: str | dict[str, Any] | None = None


def frames_for(seconds: float | str, fps: float, temporal_factor: int) -> int:
    """The tk+1 frame count nearest to `seconds` of video at `fps`, t the VAE's temporal compression (the
    only counts it accepts: Wan2.1's VAE compresses time 4x, the shipped video model's 2x)."""
    try:
        value = float(seconds)
    except ValueError:
        raise HttpError(400, f"seconds: {seconds!r} is not a number", param="seconds") from None
    if not value > 0:
        raise HttpError(400, f"seconds: {seconds!r} must be above 0", param="seconds")
    return temporal_factor * max(0, round(value * fps / temporal_factor)) + 1


def to_video_request(
    body: VideoGenerationRequest, default_fps: float, temporal_factor: int, request_id: str = ""
) -> pipeline_pb2.GenerateRequest:
    """The video body as the gateway's GenerateRequest; the gateway and the stages validate the values."""
    fps = body.fps or default_fps
    seconds = body.seconds
    num_frames = body.num_frames or (frames_for(seconds, fps, temporal_factor) if seconds is not None else 0)
    return generate_request(
        body.prompt,
        request_id=request_id,
        **_shared_settings(body),
        num_frames=num_frames,
        fps=body.fps or 0.0,
        video_format=body.output_format,
    )

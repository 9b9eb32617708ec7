"""The HTTP layer's pure logic: gRPC status -> HTTP status and OpenAI error, and the Images schema mapping."""

from __future__ import annotations

import grpc
import pytest
from pydantic import ValidationError

from ditserve.client.cache_policy import parse_cache_policy
from ditserve.services.gateway.openai_api import (
    HttpError,
    ImageGenerationRequest,
    error_from_rpc,
    parse_size,
    to_generate_request,
    validation_error,
)
from ditserve.v1 import common_pb2


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
        (grpc.StatusCode.DATA_LOSS, 500, "server_error"),
    ],
)
def test_status_codes_map_to_http_and_openai_types(code: grpc.StatusCode, status: int, kind: str) -> None:
    got_status, body = error_from_rpc(code, "something happened")
    assert got_status == status
    assert body["error"]["type"] == kind
    assert body["error"]["message"] == "something happened"
    assert body["error"]["code"] == code.name.lower()


@pytest.mark.parametrize(
    ("details", "param", "message"),
    [
        ("prompt: is empty", "prompt", "prompt: is empty"),
        ("num_images: 9 is outside [1, 8]", "n", "n (num_images): 9 is outside [1, 8]"),
        ("width: 100 is not a multiple of 16", "size", "size (width): 100 is not a multiple of 16"),
        ("num_inference_steps: 500 is outside [1, 200]", "num_inference_steps", None),
        (
            "denoiser: cache.dbcache.fn: must be at least 0, got -1",
            "cache_policy.dbcache.fn",
            "cache_policy.dbcache.fn (cache.dbcache.fn): must be at least 0, got -1",
        ),
        ("quality: 101 is outside [1, 100]", "output_compression", None),
    ],
)
def test_invalid_argument_names_the_http_field(details: str, param: str, message: str | None) -> None:
    status, body = error_from_rpc(grpc.StatusCode.INVALID_ARGUMENT, details)
    assert status == 400
    assert body["error"]["param"] == param
    if message is not None:
        assert body["error"]["message"] == message


def test_a_message_without_a_field_keeps_param_empty() -> None:
    _, body = error_from_rpc(grpc.StatusCode.INVALID_ARGUMENT, "the request makes no sense")
    assert body["error"]["param"] is None
    _, body = error_from_rpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "denoiser: queue is full (1 waiting)")
    assert body["error"]["param"] is None  # only 400s name a field


def test_size_parses_or_names_the_field() -> None:
    assert parse_size("96x64") == (96, 64)
    assert parse_size(None) == parse_size("auto") == (0, 0)
    for bad in ("64", "64x", "x64", "64*64", "-64x64"):
        with pytest.raises(HttpError) as caught:
            parse_size(bad)
        assert caught.value.status == 400 and caught.value.body["error"]["param"] == "size"


def test_cache_policy_takes_the_cli_forms() -> None:
    assert parse_cache_policy("teacache").HasField("teacache")
    assert parse_cache_policy({"dbcache": {"fn": 1}}).dbcache.fn == 1
    assert parse_cache_policy('{"teacache": {"threshold": 0.2}}').teacache.threshold == pytest.approx(0.2)
    for bad in ("fastest", {"teacache": {"thresh": 1}}):
        with pytest.raises(ValueError):
            parse_cache_policy(bad)


def test_openai_body_becomes_a_generate_request() -> None:
    body = ImageGenerationRequest(
        prompt="a red circle",
        n=2,
        size="96x64",
        seed=7,
        num_inference_steps=4,
        true_cfg_scale=1.0,
        negative_prompt="blue",
        output_format="jpeg",
        output_compression=80,
        cache_policy="dbcache",
        model="dall-e-3",
    )
    message = to_generate_request(body, request_id="r1")
    assert (message.width, message.height, message.num_images, message.seed) == (96, 64, 2, 7)
    assert message.num_inference_steps == 4 and message.true_cfg_scale == 1.0
    assert message.output_format == common_pb2.JPEG and message.quality == 80
    assert message.HasField("cache") and message.request_id == "r1"
    plain = to_generate_request(ImageGenerationRequest(prompt="x"))
    assert not plain.HasField("seed") and not plain.HasField("true_cfg_scale") and plain.width == 0


def test_url_responses_are_refused_naming_the_field() -> None:
    with pytest.raises(HttpError) as caught:
        to_generate_request(ImageGenerationRequest(prompt="x", response_format="url"))
    assert caught.value.status == 400 and caught.value.body["error"]["param"] == "response_format"


@pytest.mark.parametrize(
    ("data", "param"),
    [({"prompt": "x", "n": 0}, "n"), ({"n": 1}, "prompt"), ({"prompt": "x", "colour": "red"}, "colour")],
)
def test_schema_errors_name_the_field(data: dict, param: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ImageGenerationRequest.model_validate(data)
    error = validation_error(caught.value)
    assert error.status == 400 and error.body["error"]["param"] == param
    assert error.body["error"]["message"].startswith(f"{param}: ")

"""The gateway's OpenAI-compatible HTTP API on real processes: the real `openai` SDK, curl-shaped
requests, every error class with its status and an OpenAI error body, overload, SSE and metrics."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from helpers import beside, http_call, sample, wait_for, wait_http
from PIL import Image

from ditserve.client.stub import PipelineClient

PROMPT = "a red circle on a blue background"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base(stack: object) -> str:
    """http://HOST:PORT of the shared stack's gateway (its launcher is `ditserve up`'s)."""
    return stack.http_base.removesuffix("/v1")


@pytest.fixture(scope="module")
def sdk(stack: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.http_base, api_key="unused", max_retries=0, timeout=120)


def test_openai_sdk_generates_the_grpc_paths_png(stack: object, sdk: openai.OpenAI) -> None:
    settings = {"seed": 7, "num_inference_steps": 4}
    response = sdk.images.generate(prompt=PROMPT, size="64x64", n=2, response_format="b64_json", extra_body=settings)
    pngs = [base64.b64decode(image.b64_json) for image in response.data]
    assert len(pngs) == 2
    for png in pngs:
        image = Image.open(io.BytesIO(png))
        assert (image.format, image.size, image.mode) == ("PNG", (64, 64), "RGB")
    assert response.model_extra["seed"] == 7
    with PipelineClient(stack.gateway) as client:
        out = client.generate(PROMPT, seed=7, steps=4, width=64, height=64, num_images=2, timeout=120)
    assert pngs == [image.data for image in out.encoded]  # same seed, same bytes as gRPC


def test_models_and_health(base: str, sdk: openai.OpenAI) -> None:
    assert [model.id for model in sdk.models.list()] == ["shapes-flux"]
    status, body = http_call(f"{base}/health")
    assert status == 200 and body["status"] == "ok"
    assert set(body["checks"]) == {"gateway", "encoder", "denoiser", "vae"}


def test_sdk_raises_typed_errors_naming_the_field(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(prompt=PROMPT, size="100x64")
    assert caught.value.param == "size" and "multiple of 16" in caught.value.message


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": PROMPT, "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": PROMPT, "n": 50}, "n", "outside"),
        ({"prompt": PROMPT, "size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": PROMPT, "size": "4096x64"}, "size", "outside"),
        ({"prompt": PROMPT, "num_inference_steps": 100000}, "num_inference_steps", "outside"),
        ({"prompt": PROMPT, "response_format": "url"}, "response_format", "b64_json"),
        ({"prompt": PROMPT, "cache_policy": "fastest"}, "cache_policy", "teacache"),
        ({"prompt": PROMPT, "cache_policy": {"dbcache": {"fn": -1}}}, "cache_policy.dbcache.fn", "at least 0"),
        ({"prompt": PROMPT, "steps": 4}, "steps", "unknown field"),
        ({"prompt": PROMPT, "seed": -1}, "seed", "greater than or equal to 0"),
    ],
)
def test_invalid_requests_answer_400_naming_the_field(base: str, body: dict, param: str, words: str) -> None:
    status, answer = http_call(f"{base}/v1/images/generations", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"
    assert words in answer["error"]["message"]


def test_malformed_and_oversized_bodies(base: str) -> None:
    status, answer = http_call(f"{base}/v1/images/generations", b"{not json")
    assert status == 400 and "not JSON" in answer["error"]["message"]
    status, answer = http_call(f"{base}/v1/images/generations", {"prompt": "x" * 300_000})
    assert status == 413 and "--http-max-body-kb" in answer["error"]["message"]


def test_a_deadline_answers_504(base: str) -> None:
    body = {"prompt": PROMPT, "num_inference_steps": 200}
    started = time.monotonic()
    status, answer = http_call(f"{base}/v1/images/generations", body, headers={"x-ditserve-timeout": "0.3"})
    assert status == 504, answer
    assert answer["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 5


def test_progress_streams_as_server_sent_events(base: str) -> None:
    body = json.dumps({"prompt": PROMPT, "num_inference_steps": 4, "seed": 3, "stream": True}).encode()
    request = urllib.request.Request(f"{base}/v1/images/generations", body, {"content-type": "application/json"})
    events: list[tuple[str, str]] = []
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, line.removeprefix("data: ")))
                name = ""
    names = [name for name, _ in events]
    assert names[0] == "image_generation.progress" and names[-1] == ""  # data: [DONE]
    steps = [json.loads(data) for name, data in events if name == "image_generation.progress"]
    assert steps[0]["stage"] == "encode" and steps[-1]["stage"] == "decode"
    assert any(p["stage"] == "denoise" and p["step"] == p["total_steps"] == 4 for p in steps)
    (completed,) = [json.loads(data) for name, data in events if name == "image_generation.completed"]
    assert completed["seed"] == 3
    assert Image.open(io.BytesIO(base64.b64decode(completed["b64_json"]))).format == "PNG"


def test_http_requests_are_counted_on_the_gateways_metrics(stack: object, base: str) -> None:
    http_call(f"{base}/v1/images/generations", {"prompt": ""})
    port = stack.ports.metrics["gateway"]
    text = wait_for(port, "ditserve_http_requests_total", 1, route="/v1/images/generations", code="400")
    assert sample(text, "ditserve_http_requests_total", route="/v1/images/generations", code="400") >= 1
    assert sample(text, "ditserve_http_request_duration_seconds_count", route="/v1/images/generations") >= 1
    assert "ditserve_http_requests_in_flight" in text


def test_missing_stage_answers_503_and_health_says_why(stack: object, tmp_path: Path) -> None:
    with beside(stack, ("gateway",), tmp_path, gateway=["--vae", "127.0.0.1:1"]) as side:
        base = side.http_base.removesuffix("/v1")
        assert wait_http(f"{base}/health") == 503
        status, body = http_call(f"{base}/health")
        assert body["checks"]["vae"] == "UNAVAILABLE" and body["checks"]["encoder"] == "SERVING"
        status, answer = http_call(f"{base}/v1/images/generations", {"prompt": PROMPT, "num_inference_steps": 2})
        assert status == 503, answer
        assert answer["error"]["type"] == "service_unavailable_error"


def test_bearer_tokens_are_the_gateways(stack: object, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# accepted\nhttp-s3cret\n")
    with beside(stack, ("gateway",), tmp_path, gateway=["--auth-token-file", str(tokens)]) as side:
        side.wait_ready("gateway", 180)  # SERVING once its first stage probes answer (health needs no token)
        base = side.http_base.removesuffix("/v1")
        assert wait_http(f"{base}/health") == 200  # probes need no token, as in gRPC
        for headers in ({}, {"authorization": "Bearer wrong"}):
            status, answer = http_call(f"{base}/v1/images/generations", {"prompt": PROMPT}, headers)
            assert status == 401 and answer["error"]["type"] == "authentication_error"
            assert http_call(f"{base}/v1/models", headers=headers)[0] == 401
        client = openai.OpenAI(base_url=side.http_base, api_key="http-s3cret", max_retries=0, timeout=120)
        response = client.images.generate(prompt=PROMPT, size="64x64", extra_body={"num_inference_steps": 2})
        assert len(response.data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=side.http_base, api_key="nope", max_retries=0).models.list()


def test_a_full_queue_answers_429_at_once_while_admitted_requests_finish(stack: object, tmp_path: Path) -> None:
    with beside(stack, ("denoiser", "gateway"), tmp_path, denoiser=["--max-queue", "1", "--batching", "off"]) as side:
        side.wait_ready("denoiser", 180)
        side.wait_ready("gateway", 180)  # SERVING once its first stage probes answer
        base = side.http_base.removesuffix("/v1")
        assert wait_http(f"{base}/health", timeout=60) == 200

        def one(index: int) -> tuple[int, float, dict]:
            started = time.monotonic()
            body = {"prompt": PROMPT, "seed": index, "num_inference_steps": 28}
            status, answer = http_call(f"{base}/v1/images/generations", body)
            return status, time.monotonic() - started, answer

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
    statuses = sorted(status for status, _, _ in results)
    rejected = [(elapsed, answer) for status, elapsed, answer in results if status == 429]
    assert set(statuses) == {200, 429}, statuses
    assert all(elapsed < 1.0 for elapsed, _ in rejected), rejected
    assert all(answer["error"]["type"] == "rate_limit_error" for _, answer in rejected)
    assert all(len(answer["data"]) == 1 for status, _, answer in results if status == 200)


def test_a_video_model_is_refused_by_the_images_api(stack: object, tmp_path: Path) -> None:
    from ditserve.services.tools.modelgen.tiny_wan import write_tiny_wan

    wan = write_tiny_wan(tmp_path / "tiny-wan")
    with beside(stack, ("denoiser", "gateway"), tmp_path, denoiser=["--model", str(wan)]) as side:
        side.wait_ready("denoiser", 180)
        base = side.http_base.removesuffix("/v1")
        wait_http(f"{base}/health", timeout=60)
        status, answer = http_call(f"{base}/v1/images/generations", {"prompt": PROMPT})
    assert status == 400, answer
    assert answer["error"]["param"] == "model" and "/v1/videos" in answer["error"]["message"]

"""Profiles on demand from a live service, and per request; traces parse and hold our ranges."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import grpc
import pytest

from ditserve.client.stub import PipelineClient, StageClient
from ditserve.v1 import common_pb2

pytestmark = pytest.mark.integration
PROMPT = "a red circle on a blue background"


def _event_names(path: str) -> list[str]:
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    return [event.get("name", "") for event in trace["traceEvents"]]


def test_start_and_stop_profile_on_a_live_denoiser(stack: object) -> None:
    denoiser = StageClient(stack.ports.address("denoiser"))
    try:
        started = denoiser.admin.StartProfile(common_pb2.StartProfileRequest(name="live-test"), timeout=30)
        assert started.running and started.trace_path.endswith("live-test.trace.json.gz")
        with pytest.raises(grpc.RpcError) as caught:
            denoiser.admin.StartProfile(common_pb2.StartProfileRequest(name="again"), timeout=30)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        with PipelineClient(stack.gateway) as client:
            client.generate(PROMPT, steps=3, seed=1)
        stopped = denoiser.admin.StopProfile(common_pb2.StopProfileRequest(), timeout=60)
    finally:
        denoiser.close()
    assert stopped.trace_path == started.trace_path
    names = _event_names(stopped.trace_path)
    assert names.count("denoise_step") == 3


def test_profile_names_cannot_leave_the_profile_dir(stack: object) -> None:
    vae = StageClient(stack.ports.address("vae"))
    try:
        for name in ("../escape", "a/b", ".hidden", "x" * 65):
            with pytest.raises(grpc.RpcError) as caught:
                vae.admin.StartProfile(common_pb2.StartProfileRequest(name=name), timeout=30)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "name" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            vae.admin.StopProfile(common_pb2.StopProfileRequest(), timeout=30)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    finally:
        vae.close()


def test_per_request_profile_traces_n_steps(stack: object) -> None:
    with PipelineClient(stack.gateway) as client:
        output = client.generate(PROMPT, steps=4, seed=1, profile_steps=2, request_id="profiled-1")
    assert Path(output.profile_trace).name == "request-profiled-1.trace.json.gz"
    assert _event_names(output.profile_trace).count("denoise_step") == 2
    assert len(output.timing.step_ms) == 4


def test_gateway_and_encoder_profile_too(stack: object) -> None:
    for role, marker in (("encoder", "encode"), ("gateway", None)):
        stage = StageClient(stack.ports.address(role))
        try:
            stage.admin.StartProfile(common_pb2.StartProfileRequest(name=f"{role}-test"), timeout=30)
            with PipelineClient(stack.gateway) as client:
                client.generate(PROMPT, steps=1, seed=1)
            path = stage.admin.StopProfile(common_pb2.StopProfileRequest(), timeout=60).trace_path
        finally:
            stage.close()
        names = _event_names(path)
        assert names, f"{role} wrote an empty trace"
        if marker:
            assert marker in names

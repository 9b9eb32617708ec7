"""Stages that are down, replicas that fail over, and a SIGTERM that drains."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from ditserve.client.launcher import free_port
from ditserve.client.stub import PipelineClient, StageClient
from ditserve.services.common.limits import RequestLimits
from ditserve.services.common.profiling import Profiler
from ditserve.services.common.server import ServerOptions, start_server
from ditserve.services.gateway.service import GatewayConfig, GatewayService

pytestmark = pytest.mark.integration
PROMPT = "a red circle on a blue background"


def _gateway(encoders: list[str], denoisers: list[str], vaes: list[str]) -> Iterator[str]:
    config = GatewayConfig(encoders, denoisers, vaes, RequestLimits(), stage_timeout_s=60)
    service = GatewayService(config, Profiler(Path(tempfile.gettempdir())))
    running = start_server(service, ServerOptions(port=0, metrics_port=None))
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        running.stop(grace=1)


@pytest.fixture
def dead() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


@pytest.mark.parametrize("down", ["encoder", "denoiser", "vae"])
def test_a_down_stage_answers_unavailable_quickly(stack: object, dead: str, down: str) -> None:
    addresses = {stage: [stack.ports.address(stage)] for stage in ("encoder", "denoiser", "vae")}
    addresses[down] = [dead]
    for target in _gateway(addresses["encoder"], addresses["denoiser"], addresses["vae"]):
        with PipelineClient(target) as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                client.generate(PROMPT, steps=2, seed=1, timeout=60)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert down in caught.value.details()
            assert time.monotonic() - started < 10


def test_gateway_retries_another_replica(stack: object, dead: str) -> None:
    live = {stage: stack.ports.address(stage) for stage in ("encoder", "denoiser", "vae")}
    for target in _gateway([dead, live["encoder"]], [dead, live["denoiser"]], [dead, live["vae"]]):
        with PipelineClient(target) as client:
            for _ in range(3):  # every rotation start hits the dead replica at least once
                assert client.generate(PROMPT, steps=2, seed=1, timeout=60).images


def test_a_second_server_on_a_taken_port_fails_to_start(stack: object) -> None:
    """gRPC's default SO_REUSEPORT would let it bind and steal half the connections, answering the
    gateway's clients UNIMPLEMENTED; the port stays the first server's."""
    live = {stage: stack.ports.address(stage) for stage in ("encoder", "denoiser", "vae")}
    for target in _gateway([live["encoder"]], [live["denoiser"]], [live["vae"]]):
        port = int(target.rsplit(":", 1)[1])
        service = GatewayService(
            GatewayConfig([live["encoder"]], [live["denoiser"]], [live["vae"]], RequestLimits()),
            Profiler(Path(tempfile.gettempdir())),
        )
        with pytest.raises(RuntimeError, match="bind"):
            start_server(service, ServerOptions(port=port, metrics_port=None))
        with PipelineClient(target) as client:
            for seed in range(4):  # fresh connections each time would land on both servers under reuseport
                assert client.generate(PROMPT, steps=2, seed=seed, timeout=60).images


def test_sigterm_drains_in_flight_work(model_dir: Path, tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    log = open(tmp_path / "denoiser.log", "wb")  # noqa: SIM115
    command = [sys.executable, "-m", "ditserve.client.cli", "serve", "denoiser", "--model", str(model_dir)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--metrics-port", str(metrics)], stdout=log, stderr=subprocess.STDOUT
    )
    stage = StageClient(f"127.0.0.1:{port}")
    try:
        stage.wait_ready(120)
        encoder_output = _embedding()
        from ditserve.v1 import denoiser_pb2

        # Long enough (seconds) that the drain is observed while it still runs.
        request = denoiser_pb2.DenoiseRequest(
            prompt=encoder_output, num_inference_steps=100, height=512, width=512, seed=1, true_cfg_scale=1.0
        )
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stream = stage.denoiser.Denoise(request, timeout=120)
            first = next(stream)  # the request is running
            pending = pool.submit(lambda: list(stream))
            process.send_signal(signal.SIGTERM)
            _wait_for_status(stage, health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(grpc.RpcError) as caught:
                list(stage.denoiser.Denoise(request, timeout=10))
            events = [first, *pending.result(timeout=60)]
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "draining" in caught.value.details()
        assert events[-1].HasField("result"), "the in-flight request did not finish"
        assert process.wait(timeout=60) == 0
    finally:
        stage.close()
        if process.poll() is None:
            process.kill()
        log.close()


def _wait_for_status(stage: StageClient, status: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stage.health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == status:
            return
        time.sleep(0.05)
    raise AssertionError(f"health never reported {status}")


def _embedding() -> object:
    """A well-formed embedding for the shipped model (dims 32), without running the encoder."""
    import torch

    from ditserve.services.common import tensor_codec
    from ditserve.v1 import encoder_pb2

    generator = torch.Generator().manual_seed(0)
    return encoder_pb2.PromptEmbedding(
        prompt_embeds=tensor_codec.encode(torch.randn(1, 64, 32, generator=generator)),
        pooled_prompt_embeds=tensor_codec.encode(torch.randn(1, 32, generator=generator)),
    )

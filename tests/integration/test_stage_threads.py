"""Each stage runs all of its model's forwards on its own compute thread, whichever gRPC thread took the
call (services/common/compute.py says why: one OpenMP team per process keeps its threads spinning)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from factories import cpu_stage

from ditserve.client.stub import PipelineClient
from ditserve.services.common.profiling import Profiler
from ditserve.services.common.server import RunningServer, ServerOptions, start_server
from ditserve.services.denoiser.service import DenoiserService
from ditserve.services.encoder.service import EncoderService
from ditserve.services.gateway.service import GatewayConfig, GatewayService
from ditserve.services.vae.service import VaeService


@pytest.fixture(scope="module")
def stack(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, int]]]:
    """The three stages built as `ditserve serve` builds them (on their compute threads), and a gateway."""
    tmp = tmp_path_factory.mktemp("threads")
    builders = {"encoder": EncoderService, "denoiser": DenoiserService, "vae": VaeService}
    stages = {role: cpu_stage(model_dir, role, tmp) for role in builders}
    services = {role: stages[role].compute.run(builder, stages[role]) for role, builder in builders.items()}
    running: dict[str, RunningServer] = {
        role: start_server(service, ServerOptions(port=0, metrics_port=None)) for role, service in services.items()
    }
    addresses = {role: [f"127.0.0.1:{server.port}"] for role, server in running.items()}
    config = GatewayConfig(
        addresses["encoder"], addresses["denoiser"], addresses["vae"], services["encoder"].stage.limits
    )
    running["gateway"] = start_server(GatewayService(config, Profiler(tmp)), ServerOptions(port=0, metrics_port=None))
    compute_threads = {role: stage.compute.ident for role, stage in stages.items()}
    yield f"127.0.0.1:{running['gateway'].port}", compute_threads
    for server in running.values():
        server.stop(grace=1)


def test_every_forward_of_concurrent_requests_runs_on_its_stages_compute_thread(
    stack: tuple[str, dict[str, int]],
) -> None:
    target, compute_threads = stack
    forwards: list[int] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: forwards.append(threading.get_ident()))
    try:
        with PipelineClient(target) as client, ThreadPoolExecutor(4) as callers:
            prompts = [f"a {color} circle on a white background" for color in ("red", "green", "blue", "purple")]
            outputs = list(callers.map(lambda prompt: client.generate(prompt, steps=2, seed=1), prompts))
    finally:
        hook.remove()
    assert len(outputs) == 4 and all(output.images for output in outputs)
    assert forwards, "no module forward was seen"
    threads = set(forwards)
    assert threads <= set(compute_threads.values()), "a forward ran on a thread other than a stage's compute thread"
    assert threads == set(compute_threads.values()), "each stage's model ran"

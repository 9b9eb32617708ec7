"""In-process denoisers behind real gRPC servers, one per batching mode, shared by the module tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ditserve.client.stub import StageClient
from ditserve.services.common.limits import RequestLimits
from ditserve.services.common.model import ModelFolder
from ditserve.services.common.profiling import Profiler
from ditserve.services.common.server import ServerOptions, start_server
from ditserve.services.common.stage import StageContext
from ditserve.services.denoiser.batching import BatchingConfig
from ditserve.services.denoiser.service import DenoiserService


@pytest.fixture(scope="session")
def denoisers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """mode -> (running server, client): off, dynamic and continuous, each with its own /metrics."""
    running = {}
    for mode in ("off", "dynamic", "continuous"):
        stage = StageContext(
            role="denoiser",
            folder=ModelFolder(model_dir),
            device=torch.device("cpu"),
            dtype=torch.float32,
            profiler=Profiler(tmp_path_factory.mktemp("profiles")),
            # Admits finite but extreme embeddings so a test can make one request overflow inside a batch.
            limits=RequestLimits(max_abs_value=3e38),
        )
        config = BatchingConfig(mode=mode, max_batch_size=4, batch_delay_ms=50.0, max_queue=8)
        server = start_server(DenoiserService(stage, config), ServerOptions(port=0, metrics_port=0))
        running[mode] = (server, StageClient(f"127.0.0.1:{server.port}"))
    yield running
    for server, client in running.values():
        client.close()
        server.stop(grace=1)

"""Shared by the integration modules: in-process denoisers behind real gRPC servers, one per batching mode
(the tiny Wan folder the video tests serve is tests/conftest.py's wan_model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import cpu_stage

from ditserve.client.stub import StageClient
from ditserve.services.common.limits import RequestLimits
from ditserve.services.common.server import ServerOptions, start_server
from ditserve.services.denoiser.batching import BatchingConfig
from ditserve.services.denoiser.runtime import DenoiserOptions
from ditserve.services.denoiser.service import DenoiserService


@pytest.fixture(scope="session")
def denoisers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """mode -> (running server, client): off, dynamic and continuous, each with its own /metrics."""
    running = {}
    for mode in ("off", "dynamic", "continuous"):
        stage = cpu_stage(
            model_dir,
            profiles=tmp_path_factory.mktemp("profiles"),
            # Admits finite but extreme embeddings so a test can make one request overflow inside a batch.
            limits=RequestLimits(max_abs_value=3e38),
        )
        config = BatchingConfig(mode=mode, max_batch_size=4, batch_delay_ms=50.0, max_queue=8)
        service = DenoiserService(stage, DenoiserOptions(batching=config))
        server = start_server(service, ServerOptions(port=0, metrics_port=0))
        running[mode] = (server, StageClient(f"127.0.0.1:{server.port}"))
    yield running
    for server, client in running.values():
        client.close()
        server.stop(grace=1)

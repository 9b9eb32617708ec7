"""A caller's deadline reaches the denoiser's scheduler: the job ends at the next step, its batch slot is
used by the next request, and the denoiser counts it. Real server, real gRPC, the shipped model."""

from __future__ import annotations

import grpc
import pytest
from helpers import latents_of, request, sample, scrape, wait_for

pytestmark = pytest.mark.integration


def test_a_deadline_shorter_than_the_request_ends_it_and_frees_its_slot(denoisers: dict) -> None:
    server, stage = denoisers["continuous"]
    before = sample(scrape(server.metrics_port), "ditserve_deadline_exceeded_total")
    with pytest.raises(grpc.RpcError) as raised:
        list(stage.denoiser.Denoise(request(7, steps=200), timeout=0.3))  # 200 steps take seconds here
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    text = wait_for(server.metrics_port, "ditserve_deadline_exceeded_total", before + 1)
    assert sample(text, "ditserve_deadline_exceeded_total") == before + 1
    # The expired job left the running batch: a request now runs to the end and nothing is left running.
    assert latents_of(stage, request(8, steps=4)).shape[0] == 1
    assert sample(wait_for(server.metrics_port, "ditserve_running_requests", 0), "ditserve_running_requests") == 0

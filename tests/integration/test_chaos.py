"""A stage killed (SIGKILL) and restarted: requests end within a bound with UNAVAILABLE, and service
returns. Replicas killed under load (failover, rejoining) are tests/integration/test_load_balancing.py."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from ditserve.client.launcher import Stack
from ditserve.client.stub import PipelineClient

pytestmark = pytest.mark.integration
PROMPT = "a red circle on a blue background"
BOUND_S = 30.0  # no request may take longer than this, whatever is killed


def _kill(stack: Stack, role: str) -> None:
    stack.processes[role].send_signal(signal.SIGKILL)
    stack.processes[role].wait(timeout=10)


def test_a_killed_single_stage_answers_unavailable_then_recovers(stack: Stack) -> None:
    """The shared stack's vae is killed and restarted; it must come back for the tests after this one."""
    with PipelineClient(stack.gateway) as client:
        assert client.generate(PROMPT, steps=2, seed=1).images
        _kill(stack, "vae")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(PROMPT, steps=2, seed=1, timeout=BOUND_S)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 10
        stack.start_role("vae")
        stack.wait_ready("vae", 120)
        assert _recovers(client, within=5.0)


def _recovers(client: PipelineClient, within: float) -> bool:
    """The gateway reconnects to a restarted stage within its short reconnect backoff."""
    deadline = time.monotonic() + within
    while True:
        try:
            return bool(client.generate(PROMPT, steps=2, seed=1, timeout=BOUND_S).images)
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)

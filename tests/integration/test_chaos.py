"""Stages killed (SIGKILL) and restarted while requests stream: every request ends within a bound,
with an image or UNAVAILABLE; with two denoiser replicas the gateway fails over; service returns."""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ditserve.client.launcher import Ports, Stack
from ditserve.client.stub import PipelineClient

pytestmark = pytest.mark.integration
PROMPT = "a red circle on a blue background"
BOUND_S = 30.0  # no request may take longer than this, whatever is killed


@pytest.fixture
def replicated(model_dir: Path, tmp_path: Path) -> Iterator[tuple[Stack, Stack]]:
    """A stack whose gateway knows two denoisers: the stack's own and a spare's."""
    spare = Stack(model=model_dir, ports=Ports.free(), log_dir=tmp_path / "spare")
    main = Stack(model=model_dir, ports=Ports.free(), log_dir=tmp_path / "main")
    both = f"{main.ports.address('denoiser')},{spare.ports.address('denoiser')}"
    main.extra_args = {"gateway": ["--denoiser", both, "--stage-timeout", str(BOUND_S)]}
    spare.start_role("denoiser")
    try:
        main.start(timeout=180)
        spare.wait_ready("denoiser", 180)
        yield main, spare
    finally:
        main.stop(grace=5)
        spare.stop(grace=5)


def _traffic(gateway: str, stop: threading.Event, outcomes: list[tuple[str, float]]) -> None:
    with PipelineClient(gateway) as client:
        seed = 0
        while not stop.is_set():
            seed += 1
            started = time.monotonic()
            try:
                client.generate(PROMPT, steps=30, seed=seed, timeout=BOUND_S + 10)
                outcomes.append(("OK", time.monotonic() - started))
            except grpc.RpcError as error:
                outcomes.append((error.code().name, time.monotonic() - started))


def _kill(stack: Stack, role: str) -> None:
    stack.processes[role].send_signal(signal.SIGKILL)
    stack.processes[role].wait(timeout=10)


def test_killing_a_denoiser_replica_fails_over_and_it_comes_back(replicated: tuple[Stack, Stack]) -> None:
    main, _ = replicated
    outcomes: list[tuple[str, float]] = []
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(_traffic, main.gateway, stop, outcomes)
        time.sleep(2)
        _kill(main, "denoiser")
        killed_at = len(outcomes)
        time.sleep(4)
        after_kill = outcomes[killed_at:]
        main.start_role("denoiser")  # same port: the gateway's channel reconnects by itself
        main.wait_ready("denoiser", 120)
        time.sleep(3)
        stop.set()
    codes = {code for code, _ in outcomes}
    assert codes <= {"OK", "UNAVAILABLE"}, codes
    assert max(seconds for _, seconds in outcomes) < BOUND_S, "a request hung"
    assert sum(code == "OK" for code, _ in after_kill) >= 3, f"no failover to the spare: {after_kill}"
    assert outcomes[-1][0] == "OK"


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

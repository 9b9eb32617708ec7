"""Three denoiser processes behind one gateway target, balanced by gRPC itself (round_robin, health
checks, retries from the gateway's service config): load spreads over all three, one SIGKILLed under
load loses no request that had not started streaming, a restarted one is used again, and the gateway's
own health says NOT_SERVING while no denoiser serves and SERVING once one does.

The target is a static `ipv4:` list of loopback addresses: what `dns:///denoiser:50052` resolves to
with three replicas, without needing a DNS name in CI (tests/unit/test_stage_channels.py checks that
a name becomes a `dns:///` target under the same service config)."""

from __future__ import annotations

import concurrent.futures
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import sample, scrape

from ditserve.client.launcher import Ports, Stack, free_port
from ditserve.client.stub import PipelineClient

pytestmark = pytest.mark.integration
PROMPT = "a red circle on a blue background"
REPLICAS = ("denoiser-0", "denoiser-1", "denoiser-2")
BOUND_S = 30.0  # no request may take longer than this, whatever is killed


@dataclass
class ReplicatedStack(Stack):
    """encoder, vae, three denoisers (`denoiser-N`) and a gateway whose --denoiser lists all three."""

    def command(self, name: str) -> list[str]:
        role = name.split("-")[0]
        command = [sys.executable, "-m", "ditserve.client.cli", "serve", role, "--host", self.host]
        command += ["--port", str(self.ports.grpc[name]), "--metrics-port", str(self.ports.metrics[name])]
        if role != "gateway":
            return [*command, "--model", str(self.model)]
        denoisers = ",".join(self.ports.address(replica) for replica in REPLICAS)
        stages = ["--encoder", self.ports.address("encoder"), "--vae", self.ports.address("vae")]
        return [*command, *stages, "--denoiser", f"ipv4:{denoisers}", "--stage-timeout", str(BOUND_S)]

    def start(self, timeout: float = 180.0) -> None:
        try:
            for name in self.ports.grpc:
                self.start_role(name)
            for name in self.ports.grpc:
                self.wait_ready(name, timeout)
        except BaseException:
            self.stop()
            raise

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(timeout=10)

    def restart(self, name: str) -> None:
        """Same port: the gateway's channel reconnects to it by itself."""
        self.start_role(name)
        self.wait_ready(name, 120)

    def denoised(self, name: str) -> float:
        """Denoise calls this replica (this process of it) finished OK."""
        return sample(scrape(self.ports.metrics[name]), "ditserve_requests_total", method="Denoise", code="OK")


@pytest.fixture(scope="module")
def replicated(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedStack]:
    names = ("encoder", "vae", *REPLICAS, "gateway")  # the gateway last: it starts once they serve
    ports = Ports({name: free_port() for name in names}, {name: free_port() for name in names})
    stack = ReplicatedStack(model=model_dir, ports=ports, log_dir=tmp_path_factory.mktemp("replicated"))
    stack.start(timeout=300)  # six processes loading torch at once on a small, busy machine
    yield stack
    stack.stop(grace=5)


def gateway_health(stack: ReplicatedStack) -> int:
    with grpc.insecure_channel(stack.gateway) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_until(condition: object, within: float) -> float:
    """Seconds until `condition()` held; fails after `within`."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < within, f"not within {within}s"
        time.sleep(0.1)
    return time.monotonic() - started


def test_load_spreads_over_every_replica(replicated: ReplicatedStack) -> None:
    with PipelineClient(replicated.gateway) as client:
        # round_robin picks among READY subchannels only, and the gateway's channel connects to (and
        # health-checks) the three in parallel as it starts: until each has served once, which ones
        # are picked depends on which got ready first on a busy machine (seen: 5/1/3 in a clean clone)
        warm_up = 0
        while not all(replicated.denoised(name) for name in REPLICAS):
            assert warm_up < 30, "some replica served nothing after 30 requests"
            assert client.generate(PROMPT, steps=1, seed=warm_up).images
            warm_up += 1
        before = {name: replicated.denoised(name) for name in REPLICAS}
        for seed in range(9):
            assert client.generate(PROMPT, steps=2, seed=seed).images
    served = {name: replicated.denoised(name) - before[name] for name in REPLICAS}
    assert sum(served.values()) == 9
    assert all(count >= 2 for count in served.values()), f"round_robin over three replicas: {served}"


@dataclass
class Outcome:
    code: str
    seconds: float
    streaming: bool  # the denoiser had sent a step: the request was on a replica, past retrying


def _one(client: PipelineClient, seed: int) -> Outcome:
    started, stages = time.monotonic(), set()
    try:
        client.generate(PROMPT, steps=30, seed=seed, timeout=BOUND_S + 10, on_progress=lambda p: stages.add(p.stage))
        code = "OK"
    except grpc.RpcError as error:
        code = error.code().name
    return Outcome(code, time.monotonic() - started, "denoise" in stages)


def _traffic(gateway: str, stop: threading.Event, outcomes: list[Outcome]) -> None:
    with PipelineClient(gateway) as client:
        seed = 0
        while not stop.is_set():
            seed += 1
            outcomes.append(_one(client, seed))


def test_a_replica_killed_under_load_loses_only_started_streams_and_rejoins(replicated: ReplicatedStack) -> None:
    outcomes: list[Outcome] = []
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(_traffic, replicated.gateway, stop, outcomes) for _ in range(4)]
        wait_until(lambda: len(outcomes) >= 4, within=60)
        replicated.kill("denoiser-0")
        killed_at = len(outcomes)
        # the live replicas take over: requests keep completing (however slow this machine is)
        wait_until(lambda: sum(outcome.code == "OK" for outcome in outcomes[killed_at:]) >= 3, within=BOUND_S * 2)
        replicated.restart("denoiser-0")
        stop.set()
        for future in running:
            future.result()
    assert {outcome.code for outcome in outcomes} <= {"OK", "UNAVAILABLE"}, outcomes
    assert max(outcome.seconds for outcome in outcomes) < BOUND_S, "a request hung"
    lost = [outcome for outcome in outcomes if outcome.code != "OK"]
    assert all(outcome.streaming for outcome in lost), f"a request that never reached a step was lost: {lost}"
    assert len(lost) <= 4, "more lost than could have been running on the killed replica"

    # The restarted process is used again within seconds (reconnect backoff <= 1 s; the rest is requests).
    with PipelineClient(replicated.gateway) as client:

        def restarted_served() -> bool:
            assert client.generate(PROMPT, steps=2, seed=1, timeout=BOUND_S).images
            return replicated.denoised("denoiser-0") > 0

        wait_until(restarted_served, within=BOUND_S)


def test_gateway_health_follows_its_last_denoiser(replicated: ReplicatedStack) -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert gateway_health(replicated) == serving
    for name in REPLICAS:
        replicated.kill(name)
    assert wait_until(lambda: gateway_health(replicated) == not_serving, within=10) < 10
    with PipelineClient(replicated.gateway) as client:
        assert client.info().details["not_serving"] == "denoiser"
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(PROMPT, steps=2, seed=1, timeout=BOUND_S)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE and "denoiser" in refused.value.details()
        replicated.restart("denoiser-1")
        assert wait_until(lambda: gateway_health(replicated) == serving, within=10) < 10
        assert client.info().details["not_serving"] == ""
        assert client.generate(PROMPT, steps=2, seed=1, timeout=BOUND_S).images

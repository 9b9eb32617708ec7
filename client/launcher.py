"""Starts the four services as local processes: `ditserve up`, `ditserve demo` and the tests.

Stages start first; the gateway starts once every stage reports SERVING, so a
SERVING gateway means the whole stack is ready. Stopping sends SIGTERM (the
services drain) and escalates to SIGKILL after a grace period.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from ditserve.client.config import DEFAULT_HTTP_PORT, DEFAULT_PORTS, STAGES
from ditserve.client.stub import wait_serving

RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process: the kernel may offer a
    just-released port again, and two services given one port is a stack that cannot start."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


@dataclass
class Ports:
    grpc: dict[str, int]
    metrics: dict[str, int]
    http: int | None = None
    """The gateway's OpenAI-compatible HTTP port; None = off."""

    @classmethod
    def defaults(cls) -> Ports:
        grpc_ports = {r: p[0] for r, p in DEFAULT_PORTS.items()}
        return cls(grpc_ports, {r: p[1] for r, p in DEFAULT_PORTS.items()}, DEFAULT_HTTP_PORT)

    @classmethod
    def free(cls) -> Ports:
        grpc_ports = {role: free_port() for role in DEFAULT_PORTS}
        return cls(grpc_ports, {role: free_port() for role in DEFAULT_PORTS}, free_port())

    def address(self, role: str, host: str = "127.0.0.1") -> str:
        return f"{host}:{self.grpc[role]}"


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    """Sends `sig` and gives the process `timeout` seconds to exit, then kills it; its exit code."""
    process.send_signal(sig)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@dataclass
class Stack:
    """Four `ditserve serve` processes on loopback."""

    model: Path | None = None
    ports: Ports = field(default_factory=Ports.defaults)
    host: str = "127.0.0.1"
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    log_dir: Path | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def command(self, role: str) -> list[str]:
        args = [sys.executable, "-m", "ditserve.client.cli", "serve", role, "--host", self.host]
        args += ["--port", str(self.ports.grpc[role]), "--metrics-port", str(self.ports.metrics[role])]
        if role == "gateway":
            for stage in STAGES:
                args += [f"--{stage}", self.ports.address(stage)]
            args += ["--no-http"] if self.ports.http is None else ["--http-port", str(self.ports.http)]
        elif self.model is not None:
            args += ["--model", str(self.model)]
        return args + self.extra_args.get(role, [])

    def start_role(self, role: str) -> subprocess.Popen:
        output: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{role}.log", "ab")  # noqa: SIM115 - closed in stop()
            self._logs.append(output)
        process = subprocess.Popen(self.command(role), stdout=output, stderr=subprocess.STDOUT if output else None)
        self.processes[role] = process
        return process

    def wait_ready(self, role: str, timeout: float) -> None:
        process = self.processes[role]
        # A short reconnect backoff: a stage that takes minutes to load (a cold start, a busy host) must
        # be seen SERVING within a second, not after gRPC's default backoff of up to 120 s.
        with grpc.insecure_channel(self.ports.address(role), options=RECONNECT_OPTIONS) as channel:
            try:
                wait_serving(channel, timeout)
            except TimeoutError:
                state = f"exited with {process.poll()}" if process.poll() is not None else "still starting"
                raise TimeoutError(f"{role} not SERVING after {timeout:.0f}s ({state}); see its log") from None

    def start(self, timeout: float = 180.0) -> None:
        try:
            for stage in STAGES:
                self.start_role(stage)
            for stage in STAGES:
                self.wait_ready(stage, timeout)
            self.start_role("gateway")
            self.wait_ready("gateway", timeout)
        except BaseException:
            self.stop()
            raise

    def restart_role(self, role: str, extra_args: list[str] | None = None, timeout: float = 180.0) -> None:
        """Stops one role and starts it again on the same ports, with `extra_args` in place of its flags when
        given: one stack serves several denoiser configurations (restart the gateway after a stage, so its
        channel does not wait out a reconnect backoff)."""
        stop_process(self.processes.pop(role), signal.SIGTERM, timeout=30)
        if extra_args is not None:
            self.extra_args[role] = extra_args
        self.start_role(role)
        self.wait_ready(role, timeout)

    def stop(self, grace: float = 30.0) -> dict[str, int | None]:
        """SIGTERM everything, wait up to `grace`, then SIGKILL; returns exit codes."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for role, process in self.processes.items():
            try:
                codes[role] = process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[role] = process.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()
        return codes

    @property
    def gateway(self) -> str:
        return self.ports.address("gateway")

    @property
    def http_base(self) -> str | None:
        """The OpenAI-compatible base URL (`.../v1`), None when HTTP is off."""
        return None if self.ports.http is None else f"http://{self.host}:{self.ports.http}/v1"


@contextmanager
def running_stack(**kwargs: object) -> Iterator[Stack]:
    stack = Stack(**kwargs)  # type: ignore[arg-type]
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()

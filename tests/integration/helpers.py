"""Small helpers for tests against live services: metric scrapes and direct stage calls."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ditserve.client.launcher import Ports, Stack, free_port
from ditserve.client.stub import StageClient
from ditserve.services.common import tensor_codec
from ditserve.v1 import denoiser_pb2, encoder_pb2

# Batched CPU matmuls may block differently than batch-of-one ones, and a batch joins both CFG branches
# in one call: the final latents (values up to ~5) of two samples batched and alone differed by at most
# 4.3e-6 on the shipped image model and 1.4e-5 on the video model (fp32, 6 steps) when measured; 5e-5
# leaves room for other BLAS builds while still failing on any real mix-up between samples (~1).
TOLERANCE_BATCHED = 5e-5


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group(3))
    return total


def wait_for(port: int, name: str, at_least: float, timeout: float = 30.0, **labels: str) -> str:
    """Scrapes until `name` reaches `at_least`: a stream's last message can reach the client just
    before the server-side handler records its metrics (over 5 s later on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(port)
        if sample(text, name, **labels) >= at_least or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def embedding(seed: int, scale: float = 1.0) -> encoder_pb2.PromptEmbedding:
    """A well-formed embedding for the shipped model (dims 32), without running the encoder."""
    generator = torch.Generator().manual_seed(seed)
    return encoder_pb2.PromptEmbedding(
        prompt_embeds=tensor_codec.encode(torch.randn(1, 64, 32, generator=generator) * scale),
        pooled_prompt_embeds=tensor_codec.encode(torch.randn(1, 32, generator=generator)),
    )


def request(seed: int, steps: int = 6, **fields: object) -> denoiser_pb2.DenoiseRequest:
    """A direct denoiser request; without CFG unless fields ask for it (the shipped model's default
    true CFG needs a negative embedding, which the gateway would encode)."""
    fields = {"true_cfg_scale": 1.0, **fields}
    return denoiser_pb2.DenoiseRequest(
        request_id=f"r{seed}", prompt=embedding(seed), num_inference_steps=steps, seed=seed, **fields
    )


def latents_of(stage: StageClient, message: denoiser_pb2.DenoiseRequest) -> np.ndarray:
    events = list(stage.denoiser.Denoise(message, timeout=120))
    return tensor_codec.decode(events[-1].result.latents).numpy().copy()


def http_call(
    url: str, body: dict | bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 120.0
) -> tuple[int, dict]:
    """One HTTP request (POST when there is a body); the status and the JSON answer, errors included."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_http(url: str, timeout: float = 120.0) -> int:
    """Polls until `url` answers at all (any status); returns that status."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_call(url, timeout=5)[0]
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def beside(base: Stack, roles: tuple[str, ...], log_dir: Path, **extra_args: list[str]) -> Iterator[Stack]:
    """Starts `roles` on fresh ports next to a running stack, whose other roles they use; stops them after.
    A stage address given in `extra_args` (e.g. gateway=["--vae", "127.0.0.1:1"]) wins."""
    ports = Ports(dict(base.ports.grpc), dict(base.ports.metrics), free_port())
    for role in roles:
        ports.grpc[role], ports.metrics[role] = free_port(), free_port()
    side = Stack(model=base.model, ports=ports, log_dir=log_dir, extra_args=extra_args)
    try:
        for role in roles:
            side.start_role(role)
        yield side
    finally:
        side.stop()


def read_until_ready(process: subprocess.Popen, timeout: float) -> list[str]:
    """`ditserve up`'s output lines up to its "ready:" line (the last one returned when it came)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (line := process.stdout.readline()):
        lines.append(line)
        if line.startswith("ready:"):
            break
    return lines

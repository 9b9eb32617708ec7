"""Small helpers for tests against live services: metric scrapes and direct stage calls."""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import torch

from ditserve.client.stub import StageClient
from ditserve.services.common import tensor_codec
from ditserve.v1 import denoiser_pb2, encoder_pb2

# Batched CPU matmuls may block differently than batch-of-one ones: the final latents of batched
# and solo runs on the shipped model differed by at most 4.8e-7 (fp32) when measured; 1e-5 leaves
# room for other BLAS builds while still failing on any real mix-up between samples (~1).
TOLERANCE_BATCHED = 1e-5


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


def wait_for(port: int, name: str, at_least: float, timeout: float = 5.0, **labels: str) -> str:
    """Scrapes until `name` reaches `at_least`: a stream's last message can reach the client just
    before the server-side handler records its metrics."""
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

"""`auto` by measurement, the torch half: time each exact backend that can run on the model's attention shape.

At start-up, once per (device, torch version, backend set, shape): each candidate runs the model's
self-attention call (choice.AttentionShape: batch 1, the default request's tokens, the model's heads, head
size and dtype) on seeded N(0, 1) inputs, WARMUP calls then the median of ITERATIONS timed calls (the
device synchronised around each), and its output is compared with torch_sdpa's. choice.choose picks the
fastest within tolerance; the decision and every backend's time go into the cache file and the reason.
Left out: `sage_attn` (it quantizes Q/K, so it is never the model's exact attention; ask for it by name)
and `sdpa_math` (the reference kernel, 27-30x slower on H100/H200: timing it only lengthens start-up).
At FLUX.1-dev's 1024x1024 shape (4608 tokens, 24 heads) a call is under a millisecond on a Hopper GPU,
so the whole measurement takes well under a second.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from ditserve.services.denoiser.attention import choice
from ditserve.services.denoiser.attention.registry import BackendName, attention

log = logging.getLogger(__name__)

WARMUP, ITERATIONS = 2, 5
NEVER_TIMED = (BackendName.SAGE_ATTN, BackendName.SDPA_MATH)


def candidates(availability: dict[BackendName, str | None]) -> list[BackendName]:
    """The exact backends that can run here, torch_sdpa (the reference) first."""
    return [name for name, reason in availability.items() if reason is None and name not in NEVER_TIMED]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backends(
    backends: list[BackendName], shape: choice.AttentionShape, device: torch.device, dtype: torch.dtype
) -> list[choice.Trial]:
    """Each backend's median seconds per call and its max difference from torch_sdpa's output."""
    generator = torch.Generator(device).manual_seed(0)
    size = (shape.batch, shape.tokens, shape.heads, shape.head_dim)
    q, k, v = (torch.randn(size, generator=generator, device=device, dtype=dtype) for _ in range(3))
    reference = attention(q, k, v, BackendName.TORCH_SDPA).float()
    trials = []
    for backend in backends:
        try:
            for _ in range(WARMUP):
                out = attention(q, k, v, backend)
            error = (out.float() - reference).abs().max().item()
            times = []
            for _ in range(ITERATIONS):
                _synchronize(device)
                start = time.perf_counter()
                attention(q, k, v, backend)
                _synchronize(device)
                times.append(time.perf_counter() - start)
        except Exception as failure:  # a kernel that fails on this shape is reported, not chosen
            trials.append(choice.Trial(backend.value, failure=f"{type(failure).__name__}: {failure}"))
            continue
        trials.append(choice.Trial(backend.value, statistics.median(times), error))
    return trials


def measured_auto(
    device: torch.device,
    dtype: torch.dtype,
    availability: dict[BackendName, str | None],
    autotune: choice.AutoTune,
) -> tuple[BackendName, str]:
    """The cached decision for this machine and shape, else a fresh measurement (then cached)."""
    backends = candidates(availability)
    path = autotune.cache_file or choice.cache_path()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = choice.cache_key(device_name, torch.__version__, (b.value for b in backends), autotune.shape)
    cached = choice.read_decision(path, key)
    if cached is not None:
        backend, reason = cached
        return BackendName(backend), f"{reason} (measured before, cached in {path})"
    trials = time_backends(backends, autotune.shape, device, dtype)
    backend, reason = choice.choose(trials, choice.TOLERANCE[autotune.shape.dtype])
    reason = f"{reason} on {device_name}, torch {torch.__version__}, {autotune.shape.describe()}"
    try:
        choice.write_decision(path, key, backend, reason)
    except OSError as error:  # a read-only home: the choice stands, the next start measures again
        log.warning("attention: could not cache the decision in %s: %s", path, error)
    return BackendName(backend), reason

"""`--compile`: regional torch.compile of the transformer's repeated blocks, warmed up before SERVING.

Regional: each block module (diffusers' `_repeated_blocks`, e.g. FLUX's double and single blocks, Wan's
blocks) is compiled on its own rather than the whole forward. Blocks of one class share one compiled graph
(torch inlines their parameters as inputs), so FLUX.1's 57 blocks compile two graphs, start-up stays short,
and the denoiser's stages still hold: a step cache that skips blocks skips their compiled code, and one that
runs a prefix and a suffix calls the same compiled blocks the full forward does.

Shapes: torch.compile specialises on the first shape it sees and, on the next different one (another batch
size, another image size), recompiles once with that dimension dynamic. The warm-up runs one step at the
model's default request so the first request pays no compilation, and with batching a second step of two
rows, so the dynamic-batch graph is also built before health says SERVING.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ditserve.services.common.errors import StartupError

if TYPE_CHECKING:
    import torch

    from ditserve.services.common.limits import RequestLimits
    from ditserve.services.denoiser.runner import TransformerRunner
    from ditserve.services.families.family import ModelFamily

log = logging.getLogger(__name__)


def compile_blocks(transformer: torch.nn.Module) -> int:
    """Compiles every repeated block in place (`module.compile()`); returns how many."""
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    if not names:
        raise StartupError(f"--compile: {type(transformer).__name__} names no repeated blocks (_repeated_blocks)")
    blocks = [module for module in transformer.modules() if type(module).__name__ in names]
    for block in blocks:
        block.compile()
    return len(blocks)


def warm_up(
    family: ModelFamily,
    transformer: torch.nn.Module,
    runner: TransformerRunner,
    limits: RequestLimits,
    batch_sizes: tuple[int, ...],
) -> float:
    """One step at the model's default request for each batch size; returns the seconds it took."""
    from ditserve.services.denoiser.cache.policy import CacheConfig
    from ditserve.services.denoiser.job import DenoiseJob
    from ditserve.v1 import denoiser_pb2

    defaults = runner.facts.defaults
    prompt = family.warmup_prompt(transformer, defaults.max_sequence_length)
    # The default CFG (which may need a negative prompt): warm-up calls are shaped like real ones.
    request = denoiser_pb2.DenoiseRequest(
        request_id="warmup", prompt=prompt, negative_prompt=prompt, num_inference_steps=2, seed=0
    )
    inputs: Any = runner.parse(request, CacheConfig(), limits)
    start = time.perf_counter()
    for rows in batch_sizes:
        trajectories = [runner.start(DenoiseJob(f"warmup{i}", inputs, inputs.steps)) for i in range(rows)]
        for error in runner.step(trajectories):
            if error is not None:
                raise StartupError(f"--compile: the warm-up step failed: {error}") from error
    seconds = time.perf_counter() - start
    log.info("compile: warmed up batch sizes %s at the default request in %.1f s", list(batch_sizes), seconds)
    return seconds

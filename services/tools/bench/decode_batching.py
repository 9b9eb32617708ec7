"""What does coalescing concurrent decodes pay and change? The VAE's decoder at batch N against N of one.

The VAE joins equal-shape decodes of batched denoises by default, any under `--max-decode-batch`. A joined
decode saves what a batched decode saves per output, but its outputs are not quite the ones the request
would get alone; this measures both on the model, in this process:
the same N latents (each a request's, after its prompt's first denoising step) decoded one at a time and
as one batch, the median of `repeats` alternating timings each, and how many uint8 values differ.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ditserve.services.tools.bench.common import median


def measure_decode_batching(model: Path, prompt: str, batch: int = 8, repeats: int = 3) -> dict[str, Any]:
    """Per-output decode time alone and in a batch of `batch`, and the batch's outputs against the solo ones."""
    import torch

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.tools.local_model import LocalModel

    local = LocalModel.open(ModelFolder(model), "cpu", "fp32")
    embedding = local.encode(prompt)
    latents = torch.cat([local.denoise(local.inputs(embedding, seed, 1)).result() for seed in range(batch)])

    def decode(chunk: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return local.decode(chunk)

    def timed(run: Any) -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        out = run()
        return time.perf_counter() - started, out

    decode(latents[:1])  # untimed: first-call costs
    alone, together = [], []
    for _ in range(repeats):
        seconds, solo = timed(lambda: np.concatenate([decode(latents[i : i + 1]) for i in range(batch)]))
        alone.append(seconds)
        seconds, batched = timed(lambda: decode(latents))
        together.append(seconds)
    differing = solo != batched
    return {
        "batch": batch,
        "solo_ms_per_output": 1000 * median(alone) / batch,
        "batched_ms_per_output": 1000 * median(together) / batch,
        "outputs_identical": int(sum(not output.any() for output in differing)),
        "values_differing": int(differing.sum()),
        "values_per_output": int(differing[0].size),
        "max_difference": int(np.abs(solo.astype(np.int16) - batched.astype(np.int16)).max()),
    }

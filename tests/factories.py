"""What the tests build alike: a CPU stage, a tiny FLUX transformer, a step-cached transformer call.

Importable as `factories` from every test (pytest puts tests/, where the root conftest.py lives, on
sys.path); torch and the services load on first use, so a torch-free test can still import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import FluxTransformer2DModel

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.common.stage import StageContext
    from ditserve.services.denoiser.cache.policy import CacheConfig
    from ditserve.services.denoiser.cache.state import RequestCache
    from ditserve.services.denoiser.service import DenoiserService
    from ditserve.services.families.base import BlockExecutor


def cpu_stage(
    folder: Path | ModelFolder, role: str = "denoiser", profiles: Path | None = None, **fields: Any
) -> StageContext:
    """A stage on the CPU in FP32 for `folder` (a path or a ModelFolder); `profiles` is where its profiler
    writes (the default otherwise), `fields` any other StageContext field (limits, metrics)."""
    import torch

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.common.profiling import Profiler
    from ditserve.services.common.stage import StageContext

    if profiles is not None:
        fields["profiler"] = Profiler(profiles)
    folder = folder if isinstance(folder, ModelFolder) else ModelFolder(folder)
    return StageContext(role=role, folder=folder, device=torch.device("cpu"), dtype=torch.float32, **fields)


def cpu_denoiser(folder: Path | ModelFolder, profiles: Path | None = None, **options: Any) -> DenoiserService:
    """A denoiser servicer on cpu_stage(folder); `options` are DenoiserOptions fields (batching, cache, ...)."""
    from ditserve.services.denoiser.runtime import DenoiserOptions
    from ditserve.services.denoiser.service import DenoiserService

    return DenoiserService(cpu_stage(folder, profiles=profiles), DenoiserOptions(**options))


def tiny_flux(seed: int = 0, **config: Any) -> FluxTransformer2DModel:
    """`make-tiny-model`'s seeded transformer (1 double + 2 single blocks, 2 heads x 16) in eval mode;
    `config` changes its shape (more blocks or heads, guidance_embeds), the weights still seeded."""
    from ditserve.services.tools.modelgen.tiny_flux import tiny_transformer

    return tiny_transformer(seed, **config).eval()


def request_cache(config: CacheConfig, executor: BlockExecutor) -> RequestCache:
    """A request's cache state for `executor`'s blocks, with FLUX.1's published TeaCache coefficients."""
    from ditserve.services.denoiser.cache.state import RequestCache
    from ditserve.services.families.flux import FLUX1_TEACACHE_COEFFICIENTS

    return RequestCache(config, executor.num_blocks, FLUX1_TEACACHE_COEFFICIENTS)


def cached_forward(
    executor: BlockExecutor, cache: RequestCache, branch: str, step: int, total_steps: int, **transformer_kwargs: Any
) -> torch.Tensor:
    """One branch's noise prediction at one step, cached per its policy: a batch of one slot through
    forward_batch, as the runner makes it. Without caching, the transformer's own output bit for bit."""
    from ditserve.services.denoiser.cache.state import Slot, forward_batch

    slot = Slot(cache.branch(branch), step, total_steps, rows=transformer_kwargs["hidden_states"].shape[0])
    return forward_batch(executor, [slot], **transformer_kwargs)


def weight_digests(folder: Path) -> dict[str, str]:
    """Each safetensors file of a model folder, by its path in the folder: what two trainings must match."""
    import hashlib

    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in folder.rglob("*.safetensors")
    }


def forbid_latent_pool(monkeypatch: Any, job: type) -> None:
    """Fails the test if a trainer's job encodes its latent pool (a resumed run past its transformer phase)."""

    def no_pool(*_args: object) -> None:
        raise AssertionError("the latent pool was encoded for a finished transformer phase")

    monkeypatch.setattr(job, "_latent_pool", no_pool)

"""Steps a batch of trajectories through a family's transformer: CFG, step caching, failures kept apart.

Family-neutral: a family subclasses Trajectory (its latents, conditioning and timestep layout) and
TransformerRunner (how a job starts, what its transformer call takes), and everything here (one call for
both CFG branches of a batch, per-request cache slots, the sequence-parallel mirror, retrying a failed
batch one trajectory at a time) holds for every family. Each trajectory owns its noise generator and its
scheduler copy, so its result never depends on other traffic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import torch

from ditserve.services.denoiser.cache.policy import CacheConfig
from ditserve.services.denoiser.cache.state import RequestCache, Slot, forward_batch
from ditserve.services.denoiser.facts import ModelFacts
from ditserve.services.denoiser.job import DenoiseJob
from ditserve.services.families.base import BlockExecutor


class Trajectory:
    """One job's denoising state: latents, its own scheduler and timesteps, its cache, its CFG."""

    def __init__(
        self,
        latents: torch.Tensor,
        scheduler: Any,
        timesteps: torch.Tensor,
        cache: RequestCache,
        true_cfg_scale: float,
        has_negative: bool,
    ) -> None:
        self.latents = latents
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.cache = cache
        self.caching = cache.config.mode != "none"
        self.true_cfg_scale = true_cfg_scale
        self.has_negative = has_negative
        self.index = 0
        # whether it ever shared a transformer call with other trajectories: then its result may differ
        # from a solo run's low bits, and its decode may join theirs
        self.batched = False

    @property
    def rows(self) -> int:
        return self.latents.shape[0]

    def advance(self, noise: torch.Tensor, negative_noise: torch.Tensor | None) -> None:
        """Applies classic CFG (if any) and this trajectory's own scheduler step."""
        if negative_noise is not None:
            noise = negative_noise + self.true_cfg_scale * (noise - negative_noise)
        self.latents = self.scheduler.step(noise, self.timesteps[self.index], self.latents, return_dict=False)[0]
        self.index += 1
        if not torch.isfinite(self.latents).all():
            raise FloatingPointError("the latents became NaN or Inf")

    def result(self) -> torch.Tensor:
        return self.latents

    def computed_steps(self) -> dict[str, str]:
        """Per CFG branch, '1' for each step the transformer computed and '0' for each it reused."""
        if not self.caching:
            return {}
        return {name: branch.pattern for name, branch in self.cache.branches.items() if branch.decisions}


class CallMirror(Protocol):
    """Replays each transformer call on other processes: sequence parallelism (parallel/serving.py)."""

    def announce(
        self,
        trajectories: list[Trajectory],
        branches: tuple[str, ...],
        caching: bool,
        inputs: dict[str, torch.Tensor | None],
    ) -> None:
        """Before a call over the trajectories' rows of each branch in turn (as _call lays them out)."""

    def fail(self, error: Exception) -> Exception:
        """The error every trajectory of a failed call ends with: the other ranks' state is lost."""
        ...


class TransformerRunner(ABC):
    """Holds the transformer and the scheduler template; a family says how jobs start and call it.

    Under sequence parallelism `executor` runs on this rank's shard and `mirror` announces each call to
    the other ranks before rank 0 makes it. `joint_cfg_alone` (the denoiser's --joint-cfg always) gives
    a request alone the one call for both CFG branches that a batch takes: faster, no longer bit-exact.
    """

    temporal_factor = 1  # frames per latent frame after the first (a video VAE's); clips are tk+1 frames
    # Transformer inputs every row of a call shares (position ids); every other tensor input has a row per
    # sample, so the two CFG branches of a batch can share one call with their rows concatenated.
    shared_inputs: frozenset[str] = frozenset()

    def __init__(
        self,
        executor: BlockExecutor,
        scheduler: Any,
        facts: ModelFacts,
        device: torch.device,
        dtype: torch.dtype,
        on_cache_step: Callable[[str, bool], None] | None = None,
        mirror: CallMirror | None = None,
        joint_cfg_alone: bool = False,
    ) -> None:
        self.executor = executor
        self.scheduler = scheduler
        self.facts = facts
        self.device = device
        self.dtype = dtype
        self.on_cache_step = on_cache_step
        self.mirror = mirror
        self.joint_cfg_alone = joint_cfg_alone

    # --- what a family provides ---
    @abstractmethod
    def parse(self, request: Any, cache: CacheConfig, limits: Any) -> Any:
        """The family's inputs from a DenoiseRequest (cache already accepted); InvalidArgument names fields."""

    @abstractmethod
    def token_counts(self, inputs: Any) -> dict[str, int]:
        """Per request field, the tokens a sequence-parallel executor shards (each must divide by the world)."""

    @abstractmethod
    def shape_key(self, inputs: Any) -> Hashable:
        """What must match for two jobs to share a transformer call (shapes and CFG, not the step count)."""

    @abstractmethod
    def cost(self, inputs: Any) -> int:
        """Tokens the transformer processes per step for this job (the scheduler's token budget)."""

    @abstractmethod
    def start(self, job: DenoiseJob) -> Trajectory:
        """The job's trajectory: its noise, scheduler copy, timesteps and conditioning."""

    @abstractmethod
    def model_inputs(self, trajectories: list[Any], negative: bool) -> dict[str, torch.Tensor | None]:
        """The transformer's keyword arguments for one call over the trajectories' rows."""

    # --- the same for every family ---
    def new_cache(self, config: CacheConfig) -> RequestCache:
        return RequestCache(config, self.executor.num_blocks, self.facts.teacache_coefficients)

    def _call(
        self, trajectories: list[Trajectory], branches: tuple[str, ...], inputs: dict[str, torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """One transformer call over the trajectories' rows of each branch in turn, split back per branch
        and trajectory (in that order)."""
        runs = [(t, t.cache.branch(branch)) for branch in branches for t in trajectories]
        caching = any(t.caching for t in trajectories)
        if self.mirror is not None:
            self.mirror.announce(trajectories, branches, caching, inputs)
        if caching:
            slots = [Slot(cache, t.index, len(t.timesteps), t.rows) for t, cache in runs]
            noise = forward_batch(self.executor, slots, **inputs)
        else:  # every block, the model's own forward: bit-exact with the pipeline
            noise = self.executor.forward(**inputs)
            for _, cache in runs:
                cache.record(True)
        if self.on_cache_step is not None:
            for t, cache in runs:
                if t.caching:
                    self.on_cache_step(t.cache.config.mode, cache.decisions[-1])
        return list(noise.split([t.rows for t, _ in runs]))

    def _predict(self, trajectories: list[Trajectory], negative: bool) -> list[torch.Tensor]:
        """One CFG branch's call over the trajectories' samples, split back per trajectory."""
        branch = "uncond" if negative else "cond"
        return self._call(trajectories, (branch,), self.model_inputs(trajectories, negative))

    def _predict_both(self, trajectories: list[Trajectory]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Both CFG branches in one call, cond rows first; None where their inputs cannot share one."""
        joined = join_branches(
            self.model_inputs(trajectories, negative=False),
            self.model_inputs(trajectories, negative=True),
            self.shared_inputs,
        )
        if joined is None:
            return None
        noise = self._call(trajectories, ("cond", "uncond"), joined)
        return noise[: len(trajectories)], noise[len(trajectories) :]

    @torch.inference_mode()
    def step(self, trajectories: list[Trajectory]) -> list[Exception | None]:
        """One step for a batch; returns, per trajectory, the error that failed it.

        Alone, this is the pipeline's exact call sequence (bit-exact: with CFG, one call per branch), unless
        joint_cfg_alone; together, one transformer call for both CFG branches of all samples. A batch's rows
        already differ from their solo runs in the low bits (the matmuls block differently), and on the shipped
        image model one call of 2n rows costs less than two of n (24% at n = 8, 36% at n = 2; a request alone's
        denoise 30% less at n = 1). Under sequence parallelism the mirror announces each call, a joint one with
        a slot per branch, and the other ranks replay it. If a batched call raises, each trajectory is retried
        alone so only the culprit fails: no trajectory has moved before every prediction exists. Not with a
        mirror: the other ranks may be left inside a collective, so the call fails them all.
        """
        try:
            cfg = trajectories[0].has_negative
            joint = (len(trajectories) > 1 or self.joint_cfg_alone) and cfg
            both = self._predict_both(trajectories) if joint else None
            if both is not None:
                noise, negative = both
            else:
                noise = self._predict(trajectories, negative=False)
                negative = self._predict(trajectories, negative=True) if cfg else [None] * len(trajectories)
        except Exception as error:
            if self.mirror is not None:
                return [self.mirror.fail(error)] * len(trajectories)
            if len(trajectories) == 1:
                return [error]
            return [self.step([trajectory])[0] for trajectory in trajectories]
        if len(trajectories) > 1:  # their latents now move by a shared call: the low bits of a batch
            for trajectory in trajectories:
                trajectory.batched = True
        errors: list[Exception | None] = []
        for trajectory, cond, uncond in zip(trajectories, noise, negative, strict=True):
            try:
                trajectory.advance(cond, uncond)
                errors.append(None)
            except Exception as error:
                errors.append(error)
        return errors


def join_branches(
    cond: dict[str, torch.Tensor | None], uncond: dict[str, torch.Tensor | None], shared: frozenset[str]
) -> dict[str, torch.Tensor | None] | None:
    """One call's inputs for both CFG branches: per-row tensors concatenated (cond rows first), shared
    ones and Nones kept where both branches agree; None where they cannot share a call (a negative prompt
    of another length, or shared inputs that differ)."""
    joined: dict[str, torch.Tensor | None] = {}
    for key, value in cond.items():
        other = uncond[key]
        if key in shared or value is None or other is None:
            if not (value is other or (value is not None and other is not None and torch.equal(value, other))):
                return None
            joined[key] = value
        elif value.shape[1:] != other.shape[1:]:
            return None
        else:
            joined[key] = torch.cat([value, other])
    return joined


def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Rows of several trajectories as one batch (no copy for one)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

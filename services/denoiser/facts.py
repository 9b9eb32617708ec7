"""A model's facts, read once from its folder: request defaults and everything calibrated for it.

The cache takes its TeaCache coefficients and step masks from here, not from constructor defaults, so a
model's own calibration always wins over its family's published values. Accepting a cache policy is pure
logic on these facts and the model's block count: no torch, no probe object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ditserve.services.common.errors import InvalidArgument, StartupError
from ditserve.services.common.model import SIDECAR, ModelDefaults, ModelFolder
from ditserve.services.denoiser.cache.policy import CacheConfig, TeaCacheConfig, model_teacache_coefficients
from ditserve.services.denoiser.cache.step_masks import Mask, mask_orders, resolve, stored_masks


@dataclass(frozen=True)
class ModelFacts:
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    teacache_coefficients: tuple[float, ...] | None = None  # calibrated, else the family's published ones
    step_masks: Mapping[int, Mapping[int, Mask]] = field(default_factory=dict)  # {steps: {computed: mask}}
    mask_orders: Mapping[int, int] = field(default_factory=dict)  # {steps: the forecast its masks assume}
    num_blocks: int = 0  # the transformer's cacheable blocks, for DBCache's Fn + Bn

    @classmethod
    def load(cls, folder: ModelFolder, published: tuple[float, ...] | None, num_blocks: int) -> ModelFacts:
        """The folder's facts; a malformed calibration is a start-up error naming ditserve.json."""
        try:
            return cls(
                defaults=folder.defaults,
                teacache_coefficients=model_teacache_coefficients(published, folder.sidecar),
                step_masks=stored_masks(folder.sidecar),
                mask_orders=mask_orders(folder.sidecar),
                num_blocks=num_blocks,
            )
        except (InvalidArgument, ValueError) as error:
            raise StartupError(f"{folder.path / SIDECAR}: {error}") from None

    def accept(self, config: CacheConfig, steps: int) -> CacheConfig:
        """The policy with a calibrated mask filled in; raises InvalidArgument (field relative to the policy)
        for one the model cannot serve: Fn + Bn deeper than the model, no TeaCache coefficients, no
        calibrated mask for these steps or another forecast than its masks were searched for."""
        config = resolve(config, steps, self.step_masks, self.mask_orders)
        if config.teacache is not None:
            self.teacache(config.teacache)
        if config.dbcache is not None:
            config.dbcache.check_blocks(self.num_blocks)
        return config

    def teacache(self, config: TeaCacheConfig) -> tuple[float, ...]:
        """The coefficients a TeaCache request runs with: its own, else the model's."""
        return config.coefficients_for(self.teacache_coefficients)

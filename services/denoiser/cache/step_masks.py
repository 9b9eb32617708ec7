"""Per-model step masks: which steps a static mask computes, searched on calibration prompts; pure logic.

Why search: with a static mask which steps compute matters as much as how many, and the best choice depends
on the model and on how skipped steps are forecast. On the default model, hand-spaced masks (k steps at
round(27 (i/(k-1))^1.3)) are not even monotone in k (latent SNR 35.2 dB at k=10, 30.1 dB at k=11), while
the searched ones are better at every k from 7 to 12 (k=9: 33.3 against 25.6 dB). The objective
(calibrate.py) is the final latents' error against the uncached run on the calibration prompts, so the
bench's prompts never choose a mask.

Method: backward greedy with local polish. Start from every step computed; drop the computed step whose
loss raises the error least; after each drop, move single computed steps to a neighbouring cached
position while that lowers the error (greedy alone strands long cached runs at small k). The first and
last step always compute, as scm_mask makes them. Every mask from steps - 1 down to `fewest` computed
steps is kept, with its error.

The masks live in the model's ditserve.json as strings in the SCM presets' notation ("1" computes):
{"step_masks": {"28": {"9": "1010...1", ...}}}. A request names one with scm preset "calibrated" and
computed_steps k; resolve() turns it into explicit bins before the request is accepted, and refuses a
request whose forecast is not the one the masks were searched for: the same mask under another forecast
can lose most of its quality (on the shipped video model, 27.4 against 14.1 dB latent SNR).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ditserve.services.common.errors import InvalidArgument
from ditserve.services.denoiser.cache.policy import CALIBRATED, CacheConfig, SCMConfig, mask_bins

STEP_MASKS_KEY = "step_masks"  # in ditserve.json, next to the model's other calibrated constants
MASK_CALIBRATION_KEY = "step_mask_calibration"  # how they were searched, the forecast order included

Mask = tuple[bool, ...]


@dataclass(frozen=True)
class SearchedMask:
    mask: Mask
    error: float


def mask_text(mask: Mask) -> str:
    return "".join("1" if compute else "0" for compute in mask)


def parse_mask(text: str) -> Mask:
    if not text or set(text) - {"0", "1"}:
        raise ValueError(f"a step mask is a string of 0 and 1, got {text!r}")
    return tuple(char == "1" for char in text)


class _Memo:
    """The objective, each mask evaluated once (polish revisits masks greedy already tried)."""

    def __init__(self, error: Callable[[Mask], float]) -> None:
        self.error = error
        self.seen: dict[Mask, float] = {}

    def __call__(self, mask: Mask) -> float:
        if mask not in self.seen:
            self.seen[mask] = self.error(mask)
        return self.seen[mask]


def _drop(mask: Mask, step: int) -> Mask:
    return (*mask[:step], False, *mask[step + 1 :])


def _polish(mask: Mask, error: _Memo, max_passes: int) -> Mask:
    """First-improvement local search over moves of one computed step to an adjacent cached one."""
    best = error(mask)
    for _ in range(max_passes):
        improved = False
        for step in range(1, len(mask) - 2):
            if mask[step] == mask[step + 1]:
                continue
            moved = list(mask)
            moved[step], moved[step + 1] = mask[step + 1], mask[step]
            candidate = tuple(moved)
            if error(candidate) < best:
                mask, best, improved = candidate, error(candidate), True
        if not improved:
            break
    return mask


def search_masks(
    steps: int,
    fewest: int,
    error: Callable[[Mask], float],
    on_level: Callable[[int, SearchedMask], None] | None = None,
    max_passes: int = 3,
) -> dict[int, SearchedMask]:
    """The best mask found for every count of computed steps from steps - 1 down to fewest (>= 2)."""
    if steps < 3:
        raise ValueError(f"a mask search needs at least 3 steps (first and last always compute), got {steps}")
    if not 2 <= fewest < steps:
        raise ValueError(f"fewest must be in [2, {steps - 1}], got {fewest}")
    memo = _Memo(error)
    mask: Mask = (True,) * steps
    found: dict[int, SearchedMask] = {}
    for computed in range(steps - 1, fewest - 1, -1):
        droppable = [step for step in range(1, steps - 1) if mask[step]]
        mask = min((_drop(mask, step) for step in droppable), key=memo)
        mask = _polish(mask, memo, max_passes)
        found[computed] = SearchedMask(mask, memo(mask))
        if on_level is not None:
            on_level(computed, found[computed])
    return found


def stored_masks(sidecar: Mapping[str, object]) -> dict[int, dict[int, Mask]]:
    """ditserve.json's calibrated masks: {steps: {computed steps: mask}}; {} when it has none."""
    raw = sidecar.get(STEP_MASKS_KEY, {})
    if not isinstance(raw, Mapping):
        raise ValueError(f"{STEP_MASKS_KEY} must map step counts to masks, got {type(raw).__name__}")
    masks: dict[int, dict[int, Mask]] = {}
    for steps, by_count in raw.items():
        if not isinstance(by_count, Mapping):
            raise ValueError(f"{STEP_MASKS_KEY}[{steps}] must map computed-step counts to masks")
        masks[int(steps)] = {int(count): parse_mask(text) for count, text in by_count.items()}
        for count, mask in masks[int(steps)].items():
            if len(mask) != int(steps) or sum(mask) != count:
                raise ValueError(f"{STEP_MASKS_KEY}[{steps}][{count}] = {mask_text(mask)!r} is not {count} of {steps}")
    return masks


def mask_forecast_order(sidecar: Mapping[str, object], steps: int) -> int:
    """The TaylorSeer order a model's masks for `steps` were searched for (0: plain reuse); 1, the
    search's first default, where ditserve.json does not say."""
    provenance = sidecar.get(MASK_CALIBRATION_KEY, {})
    entry = provenance.get(str(steps), {}) if isinstance(provenance, Mapping) else {}
    order = entry.get("taylorseer_order", 1) if isinstance(entry, Mapping) else 1
    if isinstance(order, bool) or order not in (0, 1, 2):
        raise ValueError(f"{MASK_CALIBRATION_KEY}[{steps}].taylorseer_order must be 0, 1 or 2, got {order!r}")
    return order


def mask_orders(sidecar: Mapping[str, object]) -> dict[int, int]:
    """{steps: the forecast order its masks were searched for}, for every step count with stored masks."""
    return {steps: mask_forecast_order(sidecar, steps) for steps in stored_masks(sidecar)}


def describe_masks(masks: Mapping[int, Mapping[int, Mask]], orders: Mapping[int, int]) -> str:
    """What a client may ask for, as Info reports it: "28 steps: 6-27 computed, TaylorSeer order 1"."""
    if not masks:
        return "none (ditserve calibrate step-mask)"
    forecast = {0: "plain reuse"}
    return "; ".join(
        f"{steps} steps: {min(by_count)}-{max(by_count)} computed,"
        f" {forecast.get(orders[steps], f'TaylorSeer order {orders[steps]}')}"
        for steps, by_count in sorted(masks.items())
    )


def _forecast(order: int) -> str:
    return f'TaylorSeer order {order} ("taylorseer": {{"order": {order}}})' if order else "plain reuse (no taylorseer)"


def resolve(
    config: CacheConfig, steps: int, masks: Mapping[int, Mapping[int, Mask]], orders: Mapping[int, int]
) -> CacheConfig:
    """config with a "calibrated" SCM preset replaced by the model's mask as explicit bins; else config.

    orders: mask_orders() of the same model."""
    scm = config.dbcache.scm if config.dbcache is not None else None
    if scm is None or scm.preset != CALIBRATED:
        return config
    if steps not in masks:
        have = f"for {sorted(masks)} steps only" if masks else "none"
        raise InvalidArgument(
            "dbcache.scm.preset",
            f"the model has no calibrated masks for {steps} steps ({have}):"
            f" run `ditserve calibrate step-mask --model DIR --steps {steps}`",
        )
    by_count = masks[steps]
    if scm.computed_steps not in by_count:
        raise InvalidArgument(
            "dbcache.scm.computed_steps",
            f"the model's calibrated masks for {steps} steps compute {min(by_count)} to {max(by_count)} steps,"
            f" got {scm.computed_steps}",
        )
    asked = config.dbcache.taylorseer.order if config.dbcache.taylorseer is not None else 0
    if asked != orders[steps]:
        raise InvalidArgument(
            "dbcache.taylorseer",
            f"the model's calibrated masks for {steps} steps were searched for {_forecast(orders[steps])}, this"
            f" asks for {_forecast(asked)}: ask for theirs, or send another mask as compute_bins and cache_bins",
        )
    compute, cache = mask_bins(by_count[scm.computed_steps])
    explicit = SCMConfig(compute_bins=compute, cache_bins=cache, policy=scm.policy)
    return dataclasses.replace(config, dbcache=dataclasses.replace(config.dbcache, scm=explicit))

"""The rows of `ditserve bench cache`: which configurations it runs, by what name, on which prompts.

Rows (--rows narrows them by name pattern; the two uncached baselines and the control always run):
- ours: our own loop in this process, as the denoiser serves it (the family's runner, one trajectory per
  prompt): none; a control, none with the initial noise nudged by CONTROL_NUDGE (no caching, and a change
  far smaller than any cache makes: what the quality measures make of that is their noise floor, and it
  never enters the summary); TeaCache at TEACACHE_THRESHOLDS, and with TaylorSeer (order 1) forecasting the skipped
  residual at TEACACHE_TAYLORSEER_THRESHOLDS; DBCache at Fn 1 and at the deeper Fn cache-dit uses on
  FLUX.1 (4 and 8 of its 57 blocks) scaled to this model's depth, each at DBCACHE_THRESHOLDS, without and
  with TaylorSeer (order 1); the four SCM presets (dynamic, on DBCache Fn 1 with TaylorSeer); whole-step
  caching (DBCache Fn 0 Bn 0: the model's calibrated static mask of WHOLE_STEP_COMPUTED computed steps,
  searched by `ditserve calibrate step-mask` on the calibration prompts, and the skipped steps' transformer
  output forecast as the masks were searched for: by TaylorSeer of the order stored with them, or, at order
  0, the last computed output reused; rows of a model without such masks report an error); and the
  baseline any step cache must beat, uncached at fewer steps (the scheduler's own k-step schedule, k the
  computed steps of each whole-step row: the same transformer compute).
- cache-dit: each of our DBCache and SCM rows field for field (Fn, Bn, threshold, warmup, caps, TaylorSeer
  order, the very same SCM step mask) through cache_dit.enable_cache on the family's pipeline (FluxPipeline,
  WanPipeline), with enable_separate_cfg=True under classic CFG so each branch keeps its own cache, as
  cache-dit advises.
- diffusers: the family's pipeline uncached (the peers' baseline) and its transformer's enable_cache hooks:
  FirstBlockCache at FBC_THRESHOLDS; TaylorSeerCache in lite mode (blocks skipped, proj_out forecast,
  factors kept in the model's dtype rather than its bf16 default; computed every N-th step after a
  warmup of 3) at TAYLORSEER_INTERVALS; MagCache at
  MAGCACHE_THRESHOLDS with magnitude ratios from MagCache's own calibrate mode on the calibration prompts.
- diffusers@ours: the TaylorSeerCache and MagCache rows again (the peers that head the pipeline rows; MagCache
  with the ratios its calibration measured in the pipeline), their hooks on our loop's transformer
  (uncached requests call the model's own forward, which the hooks wrap), each CFG branch in its own cache
  context as the pipelines set them: the best peer timed without the pipeline's overhead, against ours/none.

Prompts (for a model trained on a vocabulary such as the shapes prompts; cache.py says what --prompt-file
changes). One seeded shuffle of its evaluation prompts without the calibration ones, seed i for the i-th: the
quality set is its first --quality-prompts (default: all of them), the timed set its first
--prompts. Two sets because the two measures need different things: a timing needs repeats, which a few
prompts give cheaply, while fidelity moves in whole prompts, and borderline shapes flip under changes far
below what PSNR notices, so a few prompts cannot tell a cache's loss from that luck.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ditserve.services.denoiser.cache.policy import (
    CALIBRATED,
    SCM_PRESETS,
    CacheConfig,
    DBCacheConfig,
    SCMConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)

FLUX1_BLOCKS = 57  # 19 double + 38 single: the depth cache-dit's Fn settings are quoted for
CACHE_DIT_FLUX1_FN = (4, 8)
# TeaCache4FLUX's published FLUX.1 settings (0.25-0.8), and below them, where a calibrated small model keeps 30 dB.
TEACACHE_THRESHOLDS = (0.06, 0.08, 0.1, 0.12, 0.15, 0.25, 0.4, 0.6, 0.8)
# TaylorSeer forecasts what TeaCache skips, so it is tried where plain reuse falls under 30 dB.
TEACACHE_TAYLORSEER_THRESHOLDS = (0.1, 0.12, 0.15, 0.25)
DBCACHE_THRESHOLDS = (0.08, 0.16, 0.24)
# SCM rows: the mask's cached steps still pass the DBCache rule (policy dynamic), with no cap of their own.
SCM_BASE = DBCacheConfig(fn=1, max_continuous_cached_steps=-1, taylorseer=TaylorSeerConfig(order=1))
FBC_THRESHOLDS = (0.05, 0.08, 0.12, 0.2)
TAYLORSEER_INTERVALS = (2, 3, 4, 5)
# Whole-step rows: computed steps out of the schedule, on the model's calibrated masks.
WHOLE_STEP_COMPUTED = (7, 8, 9, 10, 11, 12)
MAGCACHE_THRESHOLDS = (0.06, 0.12, 0.24)
# The control row: uncached, its initial noise nudged by this much noise (std): no cache, a tiny change.
CONTROL_NUDGE = 0.01
UNCACHED = ("none", "control", "fewer-steps")  # never ours' best: the fewer-steps rows are its baseline
PROMPT_SEED = 0
# The peers' hooks timed in our own loop too, so a ratio against them does not depend on harness overhead.
PEER_IN_OURS = "diffusers@ours"
HARNESS = {"ours": "ours", PEER_IN_OURS: "ours", "cache-dit": "pipeline", "diffusers": "pipeline"}
BASELINES = {"ours": "ours/none", "pipeline": "diffusers/none"}


@dataclass
class Row:
    """One configuration and what it measured; `cache` serves ours and cache-dit, `hook` diffusers."""

    name: str
    peer: str  # "ours", "cache-dit" or "diffusers"
    method: str
    cache: CacheConfig = field(default_factory=CacheConfig)
    hook: dict[str, float] = field(default_factory=dict)
    steps: int | None = None  # a fewer-steps row's own step count (None: the bench's)
    seconds: list[list[float]] = field(default_factory=list)  # per prompt, per round
    latents: list[Any] = field(default_factory=list)  # first round, per prompt
    skipped: list[float] = field(default_factory=list)  # first round, per prompt
    deterministic: bool = True  # every round's latents equal the first round's
    error: str | None = None

    @property
    def harness(self) -> str:
        return HARNESS[self.peer]

    @property
    def params(self) -> dict[str, Any]:
        if self.peer in ("diffusers", PEER_IN_OURS):
            return dict(self.hook)
        if self.steps is not None:
            return {"steps": self.steps}
        config = self.cache.teacache or self.cache.dbcache
        return {} if config is None else dataclasses.asdict(config)


def depth_scaled_fn(num_blocks: int) -> list[int]:
    """Fn 1, and cache-dit's deeper FLUX.1 settings at this model's depth, each leaving a middle block."""
    if num_blocks <= 2:
        return [1]
    deeper = {min(num_blocks - 1, max(2, round(fn * num_blocks / FLUX1_BLOCKS))) for fn in CACHE_DIT_FLUX1_FN}
    return sorted({1} | deeper)


def whole_step_suffix(order: int) -> str:
    """How a whole-step row's name says what stands in for a skipped step: nothing (the last computed
    output, order 0), or TaylorSeer's forecast."""
    return {0: "", 1: " +taylorseer"}.get(order, f" +taylorseer order {order}")


def all_rows(num_blocks: int, whole_step_order: int = 1) -> list[Row]:
    """whole_step_order: the forecast the model's step masks were searched for (its ditserve.json says)."""
    rows = [Row("ours/none", "ours", "none"), Row("diffusers/none", "diffusers", "none")]
    rows.append(Row(f"ours/none nudged {CONTROL_NUDGE:g}", "ours", "control"))
    for threshold in TEACACHE_THRESHOLDS:
        rows.append(Row(f"ours/teacache t={threshold}", "ours", "teacache", CacheConfig(TeaCacheConfig(threshold))))
    for threshold in TEACACHE_TAYLORSEER_THRESHOLDS:
        config = TeaCacheConfig(threshold, taylorseer=TaylorSeerConfig(order=1, parent="teacache"))
        name = f"ours/teacache t={threshold} +taylorseer"
        rows.append(Row(name, "ours", "teacache+taylorseer", CacheConfig(config)))
    dbcache: list[tuple[str, str, DBCacheConfig]] = []
    for fn in depth_scaled_fn(num_blocks):
        for threshold in DBCACHE_THRESHOLDS:
            for taylorseer in (None, TaylorSeerConfig(order=1)):
                method = "dbcache+taylorseer" if taylorseer else "dbcache"
                suffix = " +taylorseer" if taylorseer else ""
                config = DBCacheConfig(fn=fn, residual_diff_threshold=threshold, taylorseer=taylorseer)
                dbcache.append((f"dbcache F{fn}B0 r={threshold}{suffix}", method, config))
    for preset in SCM_PRESETS:
        config = dataclasses.replace(SCM_BASE, scm=SCMConfig(preset=preset))
        dbcache.append((f"scm {preset}", "scm", config))
    for peer in ("ours", "cache-dit"):
        rows += [Row(f"{peer}/{name}", peer, method, CacheConfig(dbcache=c)) for name, method, c in dbcache]
    for k in WHOLE_STEP_COMPUTED:
        name = f"ours/whole-step calibrated k={k}{whole_step_suffix(whole_step_order)}"
        scm = SCMConfig(preset=CALIBRATED, computed_steps=k, policy="static")
        config = DBCacheConfig.whole_step(scm, whole_step_order)
        rows.append(Row(name, "ours", "whole-step", CacheConfig(dbcache=config)))
    # Simply asking for fewer steps: the scheduler's own k-step schedule, the compute of the k-step rows.
    rows += [Row(f"ours/fewer-steps {k}", "ours", "fewer-steps", steps=k) for k in WHOLE_STEP_COMPUTED]
    rows += [Row(f"diffusers/fbc t={t}", "diffusers", "fbc", hook={"threshold": t}) for t in FBC_THRESHOLDS]
    for peer in ("diffusers", PEER_IN_OURS):
        rows += [
            Row(f"{peer}/taylorseer-lite i={i}", peer, "taylorseer-lite", hook={"cache_interval": i})
            for i in TAYLORSEER_INTERVALS
        ]
    for peer in ("diffusers", PEER_IN_OURS):
        rows += [Row(f"{peer}/magcache t={t}", peer, "magcache", hook={"threshold": t}) for t in MAGCACHE_THRESHOLDS]
    return rows


def select_rows(rows: list[Row], patterns: str | None) -> list[Row]:
    if not patterns:
        return rows
    wanted = [pattern.strip() for pattern in patterns.split(",") if pattern.strip()]
    chosen = [
        row
        for row in rows
        if row.name in BASELINES.values()
        or row.method == "control"
        or any(fnmatch.fnmatchcase(row.name, p) for p in wanted)
    ]
    unmatched = [p for p in wanted if not any(fnmatch.fnmatchcase(row.name, p) for row in rows)]
    if unmatched:
        raise SystemExit(f"--rows: no row matches {unmatched} (rows are named like 'ours/teacache t=0.4')")
    return chosen


def bench_prompts(count: int | None, excluded: Sequence[str], vocabulary: Sequence[str]) -> list[tuple[str, int]]:
    """(prompt, seed) pairs: the first `count` (None: all) of a seeded shuffle of a vocabulary's evaluation
    prompts without the calibration ones, so a shorter list is the start of a longer one."""
    prompts = [prompt for prompt in vocabulary if prompt not in excluded]
    if count is not None and not 1 <= count <= len(prompts):
        raise SystemExit(f"there are {len(prompts)} bench prompts, asked for {count}")
    order = np.random.default_rng(PROMPT_SEED).permutation(len(prompts))[:count]
    return [(prompts[index], seed) for seed, index in enumerate(order)]

"""Step-caching policies: per-request configs, the decision rules, SCM step masks and TaylorSeer.

Pure Python, no torch: a decision only sees one scalar per step (a relative L1 distance), and TaylorSeer
only needs + - * on its values, so everything here runs on floats or numpy arrays in tests and on
tensors in the denoiser. Invalid values raise InvalidArgument naming the field, e.g. "dbcache.scm.preset".

Where the facts come from (read in their source, not copied):
- TeaCache, TeaCache4FLUX/teacache_flux.py of ali-vilab/TeaCache (the same code in its TangoFlux port):
  the FLUX.1 rescale coefficients, highest power first as numpy.poly1d takes them; the rule "accumulate
  the rescaled distance, compute once the sum reaches the threshold and reset it, always compute the
  first and the last step"; the published thresholds 0.25 / 0.4 / 0.6 / 0.8 for about 1.5x / 1.8x /
  2.0x / 2.25x on FLUX.1-dev. Our default is the most conservative, 0.25.
- DBCache, cache-dit 1.5.3 caching/cache_contexts/cache_manager.py (`can_cache`, `similarity`) and
  cache_context.py (`warmup_steps`, `mark_step_begin`): the order of the checks in DBCacheDecider, warmup
  as range(0, max_warmup_steps, warmup_interval) cut to the SCM mask's leading computed run, -1 as "no
  cap", the consecutive-cached counter reset by a computed step, threshold 0 as "never cache".
- SCM, cache-dit caching/cache_interface.py (`steps_mask`): the 28-step compute/cache bins of the four
  presets, and that the last step is always computed. cache_config.py: policy "dynamic" is the default.
- TaylorSeer, cache-dit calibrators/taylorseer.py and diffusers hooks/taylorseer_cache.py: derivatives
  from differences over computed steps, Taylor expansion on cached ones; order 1 by default.
- DBCache defaults are SGLang's (given in our issue): Fn 1, Bn 0, warmup 4, threshold 0.24, at most 3
  consecutive cached steps, TaylorSeer off and order 1 when on. Warmup interval 1 and no cap on cached
  steps are cache-dit's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from ditserve.services.common.errors import InvalidArgument

# Where `ditserve calibrate teacache` stores a model's own coefficients in its ditserve.json.
COEFFICIENTS_KEY = "teacache_coefficients"

# cache-dit's presets as (compute bins, cache bins) over 28 steps; the mask alternates them, compute first.
SCM_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "slow": ((8, 3, 3, 2, 1, 1), (1, 2, 2, 2, 3)),
    "medium": ((6, 2, 2, 2, 2, 1), (1, 3, 3, 3, 3)),
    "fast": ((6, 1, 1, 1, 1, 1), (1, 3, 4, 5, 4)),
    "ultra": ((4, 1, 1, 1, 1), (2, 5, 6, 7)),
}

# The SCM preset that names the model's own masks (step_masks.py), chosen by computed_steps.
CALIBRATED = "calibrated"

CacheMode = Literal["none", "teacache", "dbcache"]
SCMPolicy = Literal["static", "dynamic"]


def _integer(field: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidArgument(field, f"must be at least {minimum}, got {value}")
    return value


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(field, f"must be a finite number, got {value!r}")
    return float(value)


def _bins(field: str, bins: object) -> tuple[int, ...]:
    if isinstance(bins, (str, bytes)) or not isinstance(bins, Sequence):
        raise InvalidArgument(field, f"must be a list of step counts, got {bins!r}")
    return tuple(_integer(field, count, 1) for count in bins)


def _check_bins(compute_bins: object, cache_bins: object) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bins alternate compute, cache, compute, ..., so compute has as many entries as cache or one more."""
    compute = _bins("dbcache.scm.compute_bins", compute_bins)
    cache = _bins("dbcache.scm.cache_bins", cache_bins)
    if not compute:
        raise InvalidArgument("dbcache.scm.compute_bins", "must not be empty: the first step computes")
    if len(compute) - len(cache) not in (0, 1):
        raise InvalidArgument(
            "dbcache.scm.cache_bins",
            f"must have as many entries as compute_bins or one fewer, got {len(cache)} for {len(compute)}",
        )
    return compute, cache


def scm_mask(spec: str | tuple[Sequence[int], Sequence[int]], steps: int) -> list[bool]:
    """Which steps compute (True) under a steps computation mask: a preset name or (compute, cache) bins.

    Bins describe sum(bins) steps (28 for the presets). For another step count every run boundary (the
    running sum of the bins) is scaled by steps / sum(bins) and rounded half up, so each run keeps its
    share of the schedule wherever it falls; a short run may shrink to nothing. At the bins' own length
    this is the identity, which keeps the presets' published 28-step masks. Then the first step always
    computes (nothing is cached before it) and so does the last (cache-dit never caches it either).
    """
    if isinstance(spec, str):
        if spec not in SCM_PRESETS:
            raise InvalidArgument("dbcache.scm.preset", f"must be one of {sorted(SCM_PRESETS)}, got {spec!r}")
        compute, cache = SCM_PRESETS[spec]
    else:
        compute, cache = _check_bins(*spec)
    _integer("steps", steps, 1)
    runs = [0] * (len(compute) + len(cache))
    runs[::2], runs[1::2] = compute, cache
    total = sum(runs)
    mask: list[bool] = []
    boundary = 0
    for index, run in enumerate(runs):
        boundary += run
        end = (2 * boundary * steps + total) // (2 * total)  # round(boundary * steps / total), half up
        mask.extend([index % 2 == 0] * (end - len(mask)))
    mask[0] = mask[-1] = True
    return mask


def mask_bins(mask: Sequence[bool]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (compute, cache) bins of a mask that starts computing: scm_mask's inverse at the mask's length."""
    runs: list[int] = []
    for index, compute in enumerate(mask):
        if index and compute == mask[index - 1]:
            runs[-1] += 1
        else:
            runs.append(1)
    return tuple(runs[::2]), tuple(runs[1::2])


@dataclass(frozen=True)
class TeaCacheConfig:
    """TeaCache: skip whole steps while the accumulated, rescaled change of the indicator stays small."""

    threshold: float = 0.25
    coefficients: tuple[float, ...] | None = None  # None: the model family's published ones
    forced_first_steps: int = 1
    forced_last_steps: int = 1
    taylorseer: TaylorSeerConfig | None = None

    def __post_init__(self) -> None:
        if _number("teacache.threshold", self.threshold) < 0:
            raise InvalidArgument("teacache.threshold", f"must not be negative, got {self.threshold}")
        if self.coefficients is not None:
            if isinstance(self.coefficients, (str, bytes)) or not isinstance(self.coefficients, Sequence):
                raise InvalidArgument("teacache.coefficients", "must be a list of 5 numbers")
            if len(self.coefficients) != 5:
                raise InvalidArgument(
                    "teacache.coefficients",
                    f"must be the 5 coefficients of a 4th-order polynomial, got {len(self.coefficients)}",
                )
            coefficients = tuple(_number("teacache.coefficients", c) for c in self.coefficients)
            object.__setattr__(self, "coefficients", coefficients)
        # At least one of each: there is no residual before the first computed step, and the last step
        # shapes the final image most.
        _integer("teacache.forced_first_steps", self.forced_first_steps, 1)
        _integer("teacache.forced_last_steps", self.forced_last_steps, 1)
        if self.taylorseer is not None and not isinstance(self.taylorseer, TaylorSeerConfig):
            raise InvalidArgument("teacache.taylorseer", f"must be a TaylorSeerConfig: {self.taylorseer!r}")

    def coefficients_for(self, model_default: tuple[float, ...] | None) -> tuple[float, ...]:
        """The request's own coefficients, else the model's (see model_teacache_coefficients)."""
        if self.coefficients is not None:
            return self.coefficients
        if model_default is None:
            raise InvalidArgument(
                "teacache.coefficients",
                "the model has no TeaCache coefficients (none published for its family, none calibrated: "
                "run `ditserve calibrate teacache`); pass ones calibrated for it",
            )
        return model_default


def model_teacache_coefficients(
    published: tuple[float, ...] | None, sidecar: dict[str, object]
) -> tuple[float, ...] | None:
    """A model's default TeaCache coefficients: its calibrated ones (ditserve.json), else its family's
    published ones, else None. Calibrated values are validated as a request's would be."""
    calibrated = sidecar.get(COEFFICIENTS_KEY)
    if calibrated is None:
        return published
    return TeaCacheConfig(coefficients=calibrated).coefficients  # type: ignore[arg-type]


@dataclass(frozen=True)
class TaylorSeerConfig:
    """Forecast the reused residual from its values on computed steps instead of reusing the last one."""

    order: int = 1
    parent: str = field(default="dbcache", compare=False, repr=False)  # names the field in errors

    def __post_init__(self) -> None:
        name = f"{self.parent}.taylorseer.order"
        if _integer(name, self.order, 1) > 2:
            raise InvalidArgument(name, f"must be 1 or 2, got {self.order}")


@dataclass(frozen=True)
class SCMConfig:
    """A steps computation mask: which steps compute, from a preset, explicit bins, or the model's own.

    static: the mask alone decides (its 0 steps always reuse the cache). dynamic: its 1 steps always
    compute, and its 0 steps go through the usual DBCache rule (caps, then the Fn diff against the
    threshold), so they still compute when the diff says the step changed too much. Preset "calibrated"
    with computed_steps k names the model's searched mask of k computed steps (step_masks.py), which the
    denoiser resolves to bins when it accepts the request.
    """

    preset: str | None = None
    compute_bins: tuple[int, ...] | None = None
    cache_bins: tuple[int, ...] | None = None
    policy: SCMPolicy = "dynamic"
    computed_steps: int | None = None

    def __post_init__(self) -> None:
        has_bins = self.compute_bins is not None or self.cache_bins is not None
        presets = sorted([*SCM_PRESETS, CALIBRATED])
        if self.preset is not None and has_bins:
            raise InvalidArgument("dbcache.scm", "give a preset or compute/cache bins, not both")
        if self.preset is None and not has_bins:
            raise InvalidArgument("dbcache.scm.preset", f"give one of {presets} or compute_bins and cache_bins")
        if self.preset is not None and self.preset not in presets:
            raise InvalidArgument("dbcache.scm.preset", f"must be one of {presets}, got {self.preset!r}")
        if self.preset == CALIBRATED:
            if self.computed_steps is None:
                raise InvalidArgument("dbcache.scm.computed_steps", f"is required with preset {CALIBRATED!r}")
            _integer("dbcache.scm.computed_steps", self.computed_steps, 2)
        elif self.computed_steps is not None:
            raise InvalidArgument("dbcache.scm.computed_steps", f"is only for preset {CALIBRATED!r}")
        if has_bins:
            compute, cache = _check_bins(self.compute_bins, self.cache_bins)
            object.__setattr__(self, "compute_bins", compute)
            object.__setattr__(self, "cache_bins", cache)
        if self.policy not in ("static", "dynamic"):
            raise InvalidArgument("dbcache.scm.policy", f"must be 'static' or 'dynamic', got {self.policy!r}")

    def mask(self, steps: int) -> list[bool]:
        if self.preset == CALIBRATED:
            raise ValueError("a calibrated mask is the model's: resolve it first (step_masks.resolve)")
        if self.preset is not None:
            return scm_mask(self.preset, steps)
        return scm_mask((self.compute_bins or (), self.cache_bins or ()), steps)


@dataclass(frozen=True)
class DBCacheConfig:
    """DBCache: always compute the first Fn and last Bn blocks; reuse the middle while the Fn residual holds.

    max_cached_steps and max_continuous_cached_steps: -1 means no cap. Fn 0 (beyond cache-dit, which
    needs Fn >= 1) skips every block on a cached step, so only a static SCM mask can choose those steps:
    with TaylorSeer it is TaylorSeer's own fixed schedule, on any mask rather than every N-th step.
    """

    fn: int = 1
    bn: int = 0
    residual_diff_threshold: float = 0.24
    max_warmup_steps: int = 4
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = 3
    taylorseer: TaylorSeerConfig | None = None
    scm: SCMConfig | None = None

    def __post_init__(self) -> None:
        _integer("dbcache.fn", self.fn, 0)
        _integer("dbcache.bn", self.bn, 0)
        if _number("dbcache.residual_diff_threshold", self.residual_diff_threshold) < 0:
            raise InvalidArgument(
                "dbcache.residual_diff_threshold", f"must not be negative, got {self.residual_diff_threshold}"
            )
        _integer("dbcache.max_warmup_steps", self.max_warmup_steps, 0)
        _integer("dbcache.warmup_interval", self.warmup_interval, 1)
        _integer("dbcache.max_cached_steps", self.max_cached_steps, -1)
        _integer("dbcache.max_continuous_cached_steps", self.max_continuous_cached_steps, -1)
        if self.taylorseer is not None and not isinstance(self.taylorseer, TaylorSeerConfig):
            raise InvalidArgument("dbcache.taylorseer", f"must be a TaylorSeerConfig: {self.taylorseer!r}")
        if self.scm is not None and not isinstance(self.scm, SCMConfig):
            raise InvalidArgument("dbcache.scm", f"must be an SCMConfig, got {self.scm!r}")
        if self.fn == 0 and (self.scm is None or self.scm.policy != "static"):
            # The diff is taken on the Fn residual: with no first block only a static mask can decide.
            raise InvalidArgument("dbcache.fn", "0 needs a static step mask (dbcache.scm with policy 'static')")

    @classmethod
    def whole_step(cls, scm: SCMConfig, taylorseer_order: int = 1) -> DBCacheConfig:
        """Fn 0 Bn 0 on a static mask: a cached step skips the whole call; TaylorSeer of taylorseer_order
        forecasts its output, or at order 0 the last computed output is reused (as step masks store it)."""
        taylorseer = TaylorSeerConfig(order=taylorseer_order) if taylorseer_order else None
        return cls(fn=0, bn=0, max_warmup_steps=0, taylorseer=taylorseer, scm=scm)

    def check_blocks(self, num_blocks: int) -> None:
        """Fn and Bn are model-independent numbers; they must leave the model a middle to cache."""
        if self.fn + self.bn >= num_blocks:
            raise InvalidArgument(
                "dbcache.fn",
                f"fn + bn = {self.fn + self.bn} leaves no middle block of the model's {num_blocks} to cache",
            )


@dataclass(frozen=True)
class CacheConfig:
    """One request's step-caching policy: none (the default), TeaCache or DBCache."""

    teacache: TeaCacheConfig | None = None
    dbcache: DBCacheConfig | None = None

    def __post_init__(self) -> None:
        if self.teacache is not None and self.dbcache is not None:
            raise InvalidArgument("cache", "choose one of teacache and dbcache, not both")
        if self.teacache is not None and not isinstance(self.teacache, TeaCacheConfig):
            raise InvalidArgument("cache.teacache", f"must be a TeaCacheConfig, got {self.teacache!r}")
        if self.dbcache is not None and not isinstance(self.dbcache, DBCacheConfig):
            raise InvalidArgument("cache.dbcache", f"must be a DBCacheConfig, got {self.dbcache!r}")

    @property
    def mode(self) -> CacheMode:
        if self.teacache is not None:
            return "teacache"
        return "dbcache" if self.dbcache is not None else "none"


class TeaCacheDecider:
    """TeaCache's rule for one branch of one request; decide() is called once per step, in order."""

    def __init__(self, config: TeaCacheConfig, model_coefficients: tuple[float, ...] | None) -> None:
        self.config = config
        self.coefficients = config.coefficients_for(model_coefficients)
        self.accumulated = 0.0

    def rescale(self, rel_l1: float) -> float:
        """The polynomial maps the indicator's change onto the output's change it predicts."""
        value = 0.0
        for coefficient in self.coefficients:
            value = value * rel_l1 + coefficient
        return value

    def decide(self, step: int, total_steps: int, rel_l1: float | None) -> bool:
        """True: compute the step. rel_l1: the indicator's relative L1 change since the previous step."""
        config = self.config
        forced = step < config.forced_first_steps or step >= total_steps - config.forced_last_steps
        if forced or rel_l1 is None or config.threshold <= 0:
            self.accumulated = 0.0
            return True
        self.accumulated += self.rescale(rel_l1)
        if self.accumulated < config.threshold:  # False for NaN too: an unreadable change computes
            return False
        self.accumulated = 0.0
        return True


class DBCacheDecider:
    """DBCache's rule for one branch of one request; decide() is called once per step, in order."""

    def __init__(self, config: DBCacheConfig) -> None:
        self.config = config
        self.cached_steps = 0
        self.continuous_cached_steps = 0

    def decide(self, step: int, total_steps: int, diff: float | None) -> bool:
        """True: compute the middle blocks.

        diff: the Fn residual's relative L1 distance to the one of the last computed step, None before any.
        """
        computed = self._must_compute(step, total_steps, diff)
        if computed:
            self.continuous_cached_steps = 0
        else:
            self.cached_steps += 1
            self.continuous_cached_steps += 1
        return computed

    def _must_compute(self, step: int, total_steps: int, diff: float | None) -> bool:
        config = self.config
        mask = config.scm.mask(total_steps) if config.scm is not None else None
        if self._in_warmup(step, mask):
            return True
        if mask is not None:
            if mask[step]:
                return True
            if config.scm is not None and config.scm.policy == "static":
                return False
        if diff is None:
            return True
        if 0 <= config.max_cached_steps <= self.cached_steps:
            return True
        if 0 <= config.max_continuous_cached_steps <= self.continuous_cached_steps:
            return True
        return not diff < config.residual_diff_threshold  # threshold 0 never caches; NaN computes

    def _in_warmup(self, step: int, mask: list[bool] | None) -> bool:
        warmup = self.config.max_warmup_steps
        if mask is not None:  # the mask's leading computed run bounds the warmup, as in cache-dit
            leading = next((index for index, compute in enumerate(mask) if not compute), len(mask))
            warmup = min(warmup, leading)
        return step < warmup and step % self.config.warmup_interval == 0


Value = TypeVar("Value")  # anything with +, - and * by a float: float, numpy array, torch tensor


class TaylorSeer(Generic[Value]):
    """Forecasts a value on cached steps from its values on computed steps (TaylorSeer, arXiv 2503.06923).

    update() keeps the last order + 1 computed points; predict() evaluates the Taylor expansion around the
    newest one. Its derivatives are those of the polynomial through the kept points (Newton divided
    differences), so a series that is a polynomial of degree <= order is forecast exactly, even with
    uneven gaps between computed steps. diffusers and cache-dit divide successive differences by the
    latest gap only: the same for order 1, but at order 2 their first derivative is the backward
    difference, off by half the second difference, and uneven gaps skew it further. Order 0 (used for
    plain reuse) returns the last value; with fewer points than order + 1 the order drops to fit.
    """

    def __init__(self, order: int) -> None:
        if order < 0:
            raise ValueError(f"order must be at least 0, got {order}")
        self.order = order
        self._points: list[tuple[int, Value]] = []  # newest first
        self._taylor: list[Value] = []  # the value, then derivative k / k!, at the newest point

    def update(self, step: int, value: Value) -> None:
        if self._points and step <= self._points[0][0]:
            raise ValueError(f"steps must increase: {step} after {self._points[0][0]}")
        self._points = [(step, value), *self._points[: self.order]]
        self._taylor = _taylor_coefficients(self._points)

    def predict(self, step: int) -> Value:
        if not self._points:
            raise ValueError("predict() needs an update() first")
        offset = float(step - self._points[0][0])
        result = self._taylor[0]
        for power, coefficient in enumerate(self._taylor[1:], start=1):
            result = result + coefficient * offset**power
        return result


def _taylor_coefficients(points: list[tuple[int, Value]]) -> list[Value]:
    """Coefficients in powers of k = t - t0 of the polynomial through points (newest, t0, first)."""
    times = [float(step) for step, _ in points]
    column = [value for _, value in points]
    newton = [column[0]]  # newton[j] = f[t0, ..., tj]
    for j in range(1, len(points)):
        column = [(column[i] - column[i + 1]) * (1.0 / (times[i] - times[i + j])) for i in range(len(column) - 1)]
        newton.append(column[0])
    # p(t0 + k) = sum_j newton[j] * prod_{i<j} (k + t0 - ti); expand each product into powers of k.
    taylor: list[Value | None] = [None] * len(points)
    basis = [1.0]  # prod_{i<j} (k + t0 - ti), lowest power first
    for j, term in enumerate(newton):
        for power, weight in enumerate(basis):
            if weight:
                part = term if weight == 1.0 else term * weight  # no copy for plain reuse (order 0)
                taylor[power] = part if taylor[power] is None else taylor[power] + part
        padded = [*basis, 0.0]
        shift = times[0] - times[j]
        basis = [shift * padded[p] + (padded[p - 1] if p else 0.0) for p in range(len(padded))]
    # Every power got newton[power] with weight 1 (the leading term of its basis), so none is left None.
    return [coefficient for coefficient in taylor if coefficient is not None]

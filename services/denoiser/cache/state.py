"""Per-request, per-branch step-cache state, and the transformer call that applies it to a family's blocks.

A RequestCache holds one BranchCache per CFG branch ("cond", "uncond"): the conditional and the
unconditional pass see different inputs, so each keeps its own residuals, counters and calibrators;
sharing them would reuse one branch's residual for the other. Nothing is global, so requests never
see each other's state, and forward_batch lets rows of several branches share one transformer call
while each decides on its own at its own step.

How a policy acts on the block sequence (a family's BlockExecutor, families/base.py): each branch has a
prefix of blocks it always runs, a middle it may skip, and a suffix it always runs. TeaCache: no prefix, no suffix, the
decision is taken on the first block's modulated input and a skipped step adds the stored residual
(output of the last block minus input of the first) to the embedded image tokens. DBCache: Fn prefix,
Bn suffix, the decision is taken on the Fn residual, and a skipped step adds the middle's stored (or
TaylorSeer-forecast) residual to both streams. The text stream's residual is kept only when Bn > 0:
with no suffix block the text stream is dropped after the middle, so it would change nothing.
DBCache at Fn 0 and Bn 0 (its static step mask decides alone) caches the whole call instead: a skipped
step returns the stored (or forecast) transformer output and runs nothing of the model, not even its
embedders. The output is also what varies most smoothly from step to step (a flow model's velocity), so
TaylorSeer forecasts it better than a residual that norm_out and proj_out would still transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ditserve.services.denoiser.cache.policy import CacheConfig, DBCacheDecider, TaylorSeer, TeaCacheDecider
from ditserve.services.families.base import BlockExecutor, StepInputs

BRANCHES = ("cond", "uncond")


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |current - previous| / mean |previous|, the change measure of TeaCache and DBCache."""
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


class BranchCache:
    """One CFG branch of one request: its decider, its residuals, and what it decided at each step."""

    def __init__(self, config: CacheConfig, num_blocks: int, teacache_coefficients: tuple[float, ...] | None) -> None:
        self.num_blocks = num_blocks
        self.decisions: list[bool] = []  # per step, in order; True: computed
        self.blocks_run = 0
        self.blocks_total = 0
        self._previous_signal: torch.Tensor | None = None
        self._decider: TeaCacheDecider | DBCacheDecider | None = None
        order = 0  # plain reuse of the last residual
        self.prefix_end = self.suffix_start = num_blocks  # policy none: every block is prefix
        # DBCache Fn 0 Bn 0: no block runs on a cached step, so neither does anything else of the model.
        self.caches_whole_step = False
        if config.teacache is not None:
            self._decider = TeaCacheDecider(config.teacache, teacache_coefficients)
            self.prefix_end = 0
            if config.teacache.taylorseer is not None:
                order = config.teacache.taylorseer.order
        elif config.dbcache is not None:
            config.dbcache.check_blocks(num_blocks)
            self._decider = DBCacheDecider(config.dbcache)
            self.prefix_end = config.dbcache.fn
            self.suffix_start = num_blocks - config.dbcache.bn
            self.caches_whole_step = config.dbcache.fn == 0 and config.dbcache.bn == 0
            if config.dbcache.taylorseer is not None:
                order = config.dbcache.taylorseer.order
        # The middle's hidden-stream residual; for a whole-step cache, the transformer's output.
        self._hidden_residual: TaylorSeer[torch.Tensor] = TaylorSeer(order)
        self._encoder_residual: TaylorSeer[torch.Tensor] | None = (
            TaylorSeer(order) if self.suffix_start < num_blocks else None
        )

    @property
    def caching(self) -> bool:
        return self._decider is not None

    @property
    def keeps_encoder_residual(self) -> bool:
        return self._encoder_residual is not None

    @property
    def skipped_fraction(self) -> float:
        """Share of this branch's transformer-block evaluations that reused the cache instead."""
        return 1.0 - self.blocks_run / self.blocks_total if self.blocks_total else 0.0

    @property
    def pattern(self) -> str:
        """The decisions as an SCM-style string, 1 computed and 0 cached, for logs and timing reports."""
        return "".join("1" if computed else "0" for computed in self.decisions)

    def signal(
        self, executor: BlockExecutor, embedded: torch.Tensor, temb: torch.Tensor, current: torch.Tensor
    ) -> torch.Tensor | None:
        """What the decision watches: TeaCache the first block's modulated input, DBCache the Fn residual
        (none at Fn 0, whose static mask decides alone)."""
        if isinstance(self._decider, TeaCacheDecider):
            return executor.cache_signal(embedded, temb)
        return current - embedded if self.prefix_end > 0 else None

    def decide(
        self,
        step: int,
        total_steps: int,
        signal: torch.Tensor | None,
        relative_l1: Callable[[torch.Tensor, torch.Tensor], float],
    ) -> bool:
        assert self._decider is not None, "policy none has nothing to decide"
        previous = self._previous_signal
        distance = None if previous is None or signal is None else relative_l1(signal, previous)
        computed = self._decider.decide(step, total_steps, distance)
        # TeaCache compares consecutive steps; DBCache compares with the last computed step.
        if computed or isinstance(self._decider, TeaCacheDecider):
            self._previous_signal = signal
        return computed

    def store(self, step: int, hidden_residual: torch.Tensor, encoder_residual: torch.Tensor | None) -> None:
        self._hidden_residual.update(step, hidden_residual)
        if self._encoder_residual is not None and encoder_residual is not None:
            self._encoder_residual.update(step, encoder_residual)

    def decide_step(self, step: int, total_steps: int) -> bool:
        """A whole-step cache's decision, which needs no signal: taken before the model runs."""
        assert isinstance(self._decider, DBCacheDecider) and self.caches_whole_step
        return self._decider.decide(step, total_steps, None)

    def reuse(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self._hidden_residual.predict(step)
        encoder = self._encoder_residual.predict(step) if self._encoder_residual is not None else None
        return hidden, encoder

    def record(self, computed: bool) -> None:
        self.decisions.append(computed)
        middle = self.suffix_start - self.prefix_end
        self.blocks_total += self.num_blocks
        self.blocks_run += self.num_blocks if computed else self.num_blocks - middle


class RequestCache:
    """A request's cache policy, with one BranchCache per CFG branch."""

    def __init__(self, config: CacheConfig, num_blocks: int, teacache_coefficients: tuple[float, ...] | None) -> None:
        self.config = config
        self.num_blocks = num_blocks
        self.teacache_coefficients = teacache_coefficients
        self.branches: dict[str, BranchCache] = {"cond": self._new_branch()}

    def _new_branch(self) -> BranchCache:
        return BranchCache(self.config, self.num_blocks, self.teacache_coefficients)

    def branch(self, name: str) -> BranchCache:
        if name not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {name!r}")
        if name not in self.branches:
            self.branches[name] = self._new_branch()
        return self.branches[name]

    @property
    def skipped_fraction(self) -> float:
        total = sum(branch.blocks_total for branch in self.branches.values())
        run = sum(branch.blocks_run for branch in self.branches.values())
        return 1.0 - run / total if total else 0.0

    def decisions(self) -> dict[str, list[bool]]:
        return {name: list(branch.decisions) for name, branch in self.branches.items() if branch.decisions}


@dataclass(frozen=True)
class Slot:
    """A branch's rows in a batched transformer call: `rows` consecutive rows, at its own step."""

    cache: BranchCache
    step: int
    total_steps: int
    rows: int


class _SlotRun:
    """One slot during one call: its rows, its decision, and the streams where its middle begins."""

    def __init__(self, slot: Slot, start: int) -> None:
        self.slot = slot
        self.cache = slot.cache
        self.rows = slice(start, start + slot.rows)
        self.computed = True
        self._hidden_mark: torch.Tensor | None = None
        self._encoder_mark: torch.Tensor | None = None

    def active(self, index: int) -> bool:
        return self.computed or index < self.cache.prefix_end or index >= self.cache.suffix_start

    def decide(self, executor: BlockExecutor, inputs: StepInputs, hidden: torch.Tensor, encoder: torch.Tensor) -> None:
        rows = self.rows
        self._hidden_mark, self._encoder_mark = hidden[rows], encoder[rows]
        signal = self.cache.signal(executor, inputs.hidden_states[rows], inputs.temb[rows], hidden[rows])
        self.computed = self.cache.decide(self.slot.step, self.slot.total_steps, signal, executor.relative_l1)

    def close_middle(self, hidden: torch.Tensor, encoder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the middle's residual after computing it, or applies the stored one instead of it."""
        assert self._hidden_mark is not None and self._encoder_mark is not None
        rows, step = self.rows, self.slot.step
        if self.computed:
            encoder_residual = None
            if self.cache.keeps_encoder_residual:
                encoder_residual = encoder[rows] - self._encoder_mark
            self.cache.store(step, hidden[rows] - self._hidden_mark, encoder_residual)
            return hidden, encoder
        hidden_residual, encoder_residual = self.cache.reuse(step)
        hidden = _replace_rows(hidden, rows, self._hidden_mark + hidden_residual)
        if encoder_residual is not None:
            encoder = _replace_rows(encoder, rows, self._encoder_mark + encoder_residual)
        return hidden, encoder


def _replace_rows(tensor: torch.Tensor, rows: slice, value: torch.Tensor) -> torch.Tensor:
    """Out of place: earlier slices of `tensor` are kept as marks and must not change."""
    if rows.start == 0 and rows.stop == tensor.shape[0]:
        return value
    tensor = tensor.clone()
    tensor[rows] = value
    return tensor


def _run_block(
    executor: BlockExecutor,
    index: int,
    hidden: torch.Tensor,
    encoder: torch.Tensor,
    inputs: StepInputs,
    rows: list[slice],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs one block on the given rows only; the full batch goes through untouched, as in the model."""
    if sum(r.stop - r.start for r in rows) == hidden.shape[0]:
        return executor.run_block(index, hidden, encoder, inputs.temb, inputs.rotary_emb)
    if not rows:
        return hidden, encoder
    index_rows = torch.cat([torch.arange(r.start, r.stop, device=hidden.device) for r in rows])
    sub_hidden, sub_encoder = executor.run_block(
        index, hidden[index_rows], encoder[index_rows], inputs.temb[index_rows], inputs.rotary_emb
    )
    return hidden.index_copy(0, index_rows, sub_hidden), encoder.index_copy(0, index_rows, sub_encoder)


def _check_slots(slots: Sequence[Slot], batch: int) -> None:
    if sum(slot.rows for slot in slots) != batch:
        raise ValueError(f"the slots cover {sum(slot.rows for slot in slots)} rows of a batch of {batch}")
    if len({id(slot.cache) for slot in slots}) != len(slots):
        raise ValueError("a branch cache appears twice in one call; each branch needs its own BranchCache")
    for slot in slots:
        if not 0 <= slot.step < slot.total_steps:
            raise ValueError(f"step {slot.step} is outside 0..{slot.total_steps - 1}")
        if slot.step != len(slot.cache.decisions):
            raise ValueError(
                f"got step {slot.step} where step {len(slot.cache.decisions)} was due: a branch takes every "
                "step once, in order (is one BranchCache serving two branches?)"
            )


def forward_batch(executor: BlockExecutor, slots: Sequence[Slot], **transformer_kwargs: Any) -> torch.Tensor:
    """One transformer call whose consecutive row groups (slots) each cache by their own decisions.

    Blocks run on the rows that need them: all rows before a slot's decision point and in its suffix,
    and in its middle only when it computes. With no slot caching this is executor.forward().
    """
    _check_slots(slots, transformer_kwargs["hidden_states"].shape[0])
    if not any(slot.cache.caching for slot in slots):
        output = executor.forward(**transformer_kwargs)
        for slot in slots:
            slot.cache.record(True)
        return output

    runs: list[_SlotRun] = []
    start = 0
    for slot in slots:
        runs.append(_SlotRun(slot, start))
        start += slot.rows
    whole = [run for run in runs if run.cache.caches_whole_step]
    for run in whole:
        run.computed = run.cache.decide_step(run.slot.step, run.slot.total_steps)
    if len(whole) == len(runs) and not any(run.computed for run in whole):
        for run in runs:
            run.cache.record(False)
        return torch.cat([run.cache.reuse(run.slot.step)[0] for run in runs])

    inputs = executor.embed(**transformer_kwargs)
    caching = [run for run in runs if run.cache.caching and not run.cache.caches_whole_step]
    hidden, encoder = inputs.hidden_states, inputs.encoder_hidden_states
    for index in range(executor.num_blocks + 1):
        for run in caching:
            if run.cache.prefix_end == index:
                run.decide(executor, inputs, hidden, encoder)
            if run.cache.suffix_start == index:
                hidden, encoder = run.close_middle(hidden, encoder)
        if index < executor.num_blocks:
            active = [run.rows for run in runs if run.active(index)]
            hidden, encoder = _run_block(executor, index, hidden, encoder, inputs, active)
    output = executor.finish(hidden, inputs)
    for run in whole:
        if run.computed:
            run.cache.store(run.slot.step, output[run.rows], None)
        else:
            output = _replace_rows(output, run.rows, run.cache.reuse(run.slot.step)[0])
    for run in runs:
        run.cache.record(run.computed)
    return output

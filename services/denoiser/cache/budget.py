"""Budgeted whole-step caching: exactly k computed steps per branch, which ones decided at run time. Pure.

Why: a static mask computes the same steps for every prompt, while how fast a request's transformer output
bends varies between prompts (on the default model the spread of its second difference is about 2x at
every step). The budget policy keeps the mask's count k as a hard budget (k transformer calls per CFG
branch, no more, no fewer) and its positions as the plan that paces the spending, and lets each request
move its computed steps toward where its own forecast is worst.

The signal costs no transformer block: after each computed step the branch has its last three outputs,
and the order-2 Newton term of the polynomial through them is exactly where TaylorSeer's order-2 and
order-1 forecasts disagree. Skipping step s forecasts with an error of about
curvature * (s - t0) * (s - t1), t0 and t1 the last two computed steps (curvature: mean |f[t0, t1, t2]|
over mean |f(t0)|, so relative like the other cache signals).

The rule: the first and last steps compute; until three outputs exist the plan decides; then step s
computes when that estimate reaches threshold * (the plan's computed steps still ahead) / (budget left):
a request that has spent ahead of the plan needs a larger error to spend more, one behind it a smaller.
Whatever the signal says, the budget is exact: with none left a step is skipped, and with as many left
as steps remain every step computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

Value = TypeVar("Value")  # anything with +, - and * by a float: float, numpy array, torch tensor

POINTS = 3  # the outputs an order-2 divided difference needs


def second_divided_difference(points: Sequence[tuple[int, Value]]) -> Value:
    """f[t0, t1, t2] of three (step, value) points, newest first: the order-2 forecast's extra term."""
    if len(points) != POINTS:
        raise ValueError(f"a second divided difference takes {POINTS} points, got {len(points)}")
    (t0, f0), (t1, f1), (t2, f2) = points
    first = (f0 - f1) * (1.0 / (t0 - t1))
    second = (f1 - f2) * (1.0 / (t1 - t2))
    return (first - second) * (1.0 / (t0 - t2))


class BudgetDecider:
    """The budget rule for one branch of one request; decide() is called once per step, in order."""

    def __init__(self, plan_for: Callable[[int], Sequence[bool]], threshold: float) -> None:
        """plan_for(total_steps): the mask that sets the budget and paces it (SCMConfig.mask)."""
        self.plan_for = plan_for
        self.plan: tuple[bool, ...] = ()  # on the first step, when the request's step count is known
        self.threshold = threshold
        self.computed: list[int] = []  # the steps computed so far, in order
        self.curvature: float | None = None  # from the last three computed outputs

    def observe(self, curvature: float) -> None:
        """The relative curvature of the outputs, taken after a computed step once three exist."""
        self.curvature = curvature

    def estimate(self, step: int) -> float | None:
        """The relative error of forecasting this step instead of computing it; None before three outputs."""
        if self.curvature is None or len(self.computed) < POINTS:
            return None
        return self.curvature * (step - self.computed[-1]) * (step - self.computed[-2])

    def decide(self, step: int, total_steps: int) -> bool:
        """True: compute the step."""
        if not self.plan:
            self.plan = tuple(self.plan_for(total_steps))
            if len(self.plan) != total_steps or not (self.plan[0] and self.plan[-1]):
                raise ValueError(f"a plan is one decision per step, first and last computed: {self.plan}")
        if total_steps != len(self.plan):
            raise ValueError(f"the plan has {len(self.plan)} steps, the request {total_steps}")
        computed = self._must_compute(step, total_steps - 1)
        if computed:
            self.computed.append(step)
        return computed

    def _must_compute(self, step: int, last: int) -> bool:
        if step in (0, last):
            return True
        left = sum(self.plan) - 1 - len(self.computed)  # the last step's call is spoken for
        if left <= 0:
            return False
        if left >= last - step:
            return True
        estimate = self.estimate(step)
        if estimate is None:
            return self.plan[step]
        planned = sum(self.plan[step:last])
        return not estimate < self.threshold * planned / left  # NaN computes

"""The denoiser's batching policy: which requests share each denoising step. Pure Python, no clock.

Shaped like vLLM v1's scheduler: the engine calls `schedule(now)` before every step and
`update_from_output(plan, output)` after it; both sides are plain dataclasses, so the policy is
tested without torch, grpc or sleeping (every call that needs time takes `now`, monotonic seconds).

Modes:
  off        one request at a time, FIFO.
  dynamic    request-level batches: with no batch running, the oldest waiting request gathers the
             waiting requests of its key (FIFO, up to max_batch_size / max_batch_cost); the batch is
             dispatched when full, over budget or once the oldest has waited batch_delay_ms, then runs
             all its steps with no joins. A key fixes total_steps, so the members finish together.
  continuous step-level batches: at every step boundary the running batch admits waiting requests of
             its key into free slots (each starts at its own step 0) and finished ones leave; when it
             empties, the next batch forms at once from the oldest waiting request.

Admission is FIFO within a key and stops at the first request that does not fit, so a big request
is never overtaken by smaller ones behind it. The first member of a batch always fits: a request
whose cost alone exceeds max_batch_cost runs alone instead of never.

Fairness (continuous): the running batch stops admitting as soon as a waiting request of another key
has waited max_wait_steps steps; it drains, and the next batch forms from the oldest waiting request.
Bound: with Q = max_queue and T = the largest total_steps, a request finishes at most
W + (Q + 1) * T steps after `add`, where W = max_wait_steps in continuous mode and 0 otherwise
(given arrivals that grow with add order, as when the caller passes arrival = now).
(Once it has waited W steps, every window of T steps starts at least one of the at most Q requests
not younger than it: either a closed batch drains and a new one forms from the oldest, or a batch of
its own key admits its FIFO head. Off and dynamic form every batch from the oldest and run it to the
end, so the same count holds with W = 0.) Steps, not seconds: the dynamic delay costs time, not steps.

Stop reasons, set on every plan that admits requests (`joined` not empty), a bounded label set:
  alone  mode off: one request per batch by configuration.
  full   the batch reached max_batch_size.
  cost   the next waiting request of the key would exceed max_batch_cost, or the budget is spent.
  delay  dynamic: the oldest member waited batch_delay_ms; the batch leaves partly full.
  drain  continuous: every waiting request of the key was admitted (its queue drained); later ones
         join at a step boundary, so nothing waits for more.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal, get_args

Mode = Literal["off", "dynamic", "continuous"]
StopReason = Literal["alone", "full", "cost", "delay", "drain"]
MODES: tuple[str, ...] = get_args(Mode)
STOP_REASONS: tuple[str, ...] = get_args(StopReason)


class QueueFull(Exception):
    """max_queue requests already wait: the caller answers RESOURCE_EXHAUSTED so the client retries."""

    def __init__(self, max_queue: int) -> None:
        super().__init__(f"denoiser queue is full ({max_queue} waiting); retry later or add replicas")
        self.max_queue = max_queue


@dataclass(frozen=True)
class BatchingConfig:
    mode: Mode
    """off | dynamic | continuous: see the module docstring."""
    max_batch_size: int = 8
    """Most requests in one step's batch (ignored when mode is off)."""
    batch_delay_ms: float = 5.0
    """dynamic: how long the oldest waiting request may wait for company before its batch leaves."""
    max_batch_cost: int | None = None
    """Budget on the summed request costs of one batch (image tokens x CFG factor); None: no budget."""
    max_queue: int = 64
    """Most waiting (not yet running) requests; `add` raises QueueFull beyond it."""
    max_wait_steps: int = 0
    """continuous: steps a request of another key may wait before the running batch stops admitting."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {', '.join(MODES)}")
        _check_int("max_batch_size", self.max_batch_size, 1)
        _check_int("max_queue", self.max_queue, 1)
        _check_int("max_wait_steps", self.max_wait_steps, 0)
        if self.max_batch_cost is not None:
            _check_int("max_batch_cost", self.max_batch_cost, 1)
        delay = self.batch_delay_ms
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < math.inf:
            raise ValueError(f"batch_delay_ms: {delay!r} is not a finite number >= 0")

    def batch_key(self, shape_key: Hashable, steps: int) -> Hashable:
        """A request's batch key: its shape (what one transformer call needs to match) and, for request-level
        (dynamic) batches, its step count, so the members finish together. Continuous batches mix steps."""
        return (shape_key, steps if self.mode == "dynamic" else None)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: {value!r} is not an integer >= {minimum}")


@dataclass(frozen=True)
class ScheduledRequest:
    """A request as the scheduler sees it; `key` is built by the caller so only compatible ones batch."""

    request_id: str
    key: Hashable
    """Compatibility: model, height, width, steps, guidance mode, latent shape."""
    cost: int
    """What it weighs against max_batch_cost, e.g. image tokens x CFG factor."""
    total_steps: int
    arrival: float
    """Monotonic seconds; orders the queue (oldest first) and starts the dynamic delay."""
    deadline: float | None = None
    """Monotonic seconds after which the result is useless: dropped and reported as expired."""

    def __post_init__(self) -> None:
        _check_int("cost", self.cost, 1)
        _check_int("total_steps", self.total_steps, 1)


@dataclass(frozen=True)
class StepPlan:
    """What the engine does before the next step; an empty `request_ids` means run nothing."""

    request_ids: list[str]
    """This step's batch: members keep their order from step to step, newcomers go last."""
    joined: list[str]
    """Requests that start (step 0) in this step: the engine creates their trajectories."""
    stop_reason: StopReason | None
    """Why admission stopped, set exactly when `joined` is not empty."""
    expired: list[str]
    """Dropped because their deadline passed (waiting or running): answer DEADLINE_EXCEEDED."""
    cancelled: list[str]
    """Removed by `cancel` since the last plan: the engine drops their trajectories."""
    wait_s: float | None
    """Set when work waits for time (the dynamic delay): call `schedule` again after this long."""


@dataclass(frozen=True)
class StepOutput:
    """What happened in the step: the requests whose computation raised."""

    failed: list[str] = field(default_factory=list)


@dataclass
class _Entry:
    request: ScheduledRequest
    seq: int
    added_step: int
    steps_done: int = 0


class BatchScheduler:
    """Owns the waiting queue and the running batch; not thread-safe (the engine serializes calls)."""

    def __init__(self, config: BatchingConfig) -> None:
        self.config = config
        self._waiting: dict[str, _Entry] = {}
        self._running: dict[str, _Entry] = {}  # admission order: the plan's stable order
        self._expired: list[str] = []
        self._cancelled: list[str] = []
        self._in_flight: StepPlan | None = None
        self._steps = 0  # completed steps: the fairness clock
        self._seq = 0  # add order: breaks ties between equal arrivals

    @property
    def num_waiting(self) -> int:
        """Queue depth."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests in the running batch."""
        return len(self._running)

    def steps_done(self, request_id: str) -> int:
        """Steps completed by a running request (0 while it waits); KeyError for an unknown id."""
        entry = self._running.get(request_id) or self._waiting[request_id]
        return entry.steps_done

    def add(self, request: ScheduledRequest, now: float) -> None:
        """Queue a request; expired waiting ones are dropped first so they never hold a slot."""
        rid = request.request_id
        if rid in self._waiting or rid in self._running:
            raise ValueError(f"request_id: {rid!r} is already scheduled")
        self._expire(self._waiting, now)
        if len(self._waiting) >= self.config.max_queue:
            raise QueueFull(self.config.max_queue)
        self._waiting[rid] = _Entry(request, self._seq, self._steps)
        self._seq += 1

    def cancel(self, request_id: str) -> bool:
        """Remove a waiting or running request now; False when it is not (or no longer) scheduled."""
        if self._waiting.pop(request_id, None) is None and self._running.pop(request_id, None) is None:
            return False
        self._cancelled.append(request_id)
        return True

    def schedule(self, now: float) -> StepPlan | None:
        """Plan the next step; None when there is nothing to run, wait for or report."""
        if self._in_flight is not None:
            raise RuntimeError("schedule() before update_from_output() of the plan in flight")
        self._expire(self._waiting, now)
        self._expire(self._running, now)
        joined, reason, wait_s = self._admit(now)
        expired, self._expired = self._expired, []
        cancelled, self._cancelled = self._cancelled, []
        plan = StepPlan(list(self._running), joined, reason, expired, cancelled, wait_s)
        if plan.request_ids:
            self._in_flight = plan
        elif not (expired or cancelled or wait_s is not None):
            return None
        return plan

    def update_from_output(self, plan: StepPlan, output: StepOutput) -> list[str]:
        """Advance the step's requests; return those that reached total_steps (finished, gone).

        Failed requests leave alone; requests cancelled while the step ran are skipped.
        """
        if plan is not self._in_flight:
            raise ValueError("update_from_output() takes the plan from the last schedule()")
        failed = set(output.failed)
        if stray := failed - set(plan.request_ids):
            raise ValueError(f"failed: {sorted(stray)} were not in the plan")
        self._in_flight = None
        self._steps += 1
        finished = []
        for rid in plan.request_ids:
            entry = self._running.get(rid)
            if entry is None:
                continue
            if rid in failed:
                del self._running[rid]
                continue
            entry.steps_done += 1
            if entry.steps_done >= entry.request.total_steps:
                del self._running[rid]
                finished.append(rid)
        return finished

    def _expire(self, entries: dict[str, _Entry], now: float) -> None:
        for rid, entry in list(entries.items()):
            deadline = entry.request.deadline
            if deadline is not None and now >= deadline:
                del entries[rid]
                self._expired.append(rid)

    def _admit(self, now: float) -> tuple[list[str], StopReason | None, float | None]:
        """Move waiting requests into the running batch; returns (joined, stop reason, wait_s)."""
        mode = self.config.mode
        if not self._waiting or (self._running and (mode != "continuous" or self._closed())):
            return [], None, None
        queue = sorted(self._waiting.values(), key=lambda e: (e.request.arrival, e.seq))
        if mode == "off":
            admitted: list[_Entry] = queue[:1]
            reason: StopReason | None = "alone"
        else:
            key = self._running_key() if self._running else queue[0].request.key
            admitted, reason = self._gather([e for e in queue if e.request.key == key])
            if reason is None and mode == "dynamic":
                waited = now - queue[0].request.arrival
                delay = self.config.batch_delay_ms / 1000.0
                if waited < delay:
                    return [], None, delay - waited
                reason = "delay"
        if not admitted:
            return [], None, None
        for entry in admitted:
            rid = entry.request.request_id
            self._running[rid] = self._waiting.pop(rid)
        return [e.request.request_id for e in admitted], reason or "drain", None

    def _gather(self, candidates: list[_Entry]) -> tuple[list[_Entry], StopReason | None]:
        """FIFO admission into the running batch's free room; the reason is None if room is left."""
        limit, budget = self.config.max_batch_size, self.config.max_batch_cost
        size = len(self._running)
        cost = sum(e.request.cost for e in self._running.values())
        admitted = []
        for entry in candidates:
            if size >= limit:
                return admitted, "full"
            if budget is not None and size > 0 and cost + entry.request.cost > budget:
                return admitted, "cost"
            admitted.append(entry)
            size += 1
            cost += entry.request.cost
        if size >= limit:
            return admitted, "full"
        if budget is not None and cost >= budget:
            return admitted, "cost"
        return admitted, None

    def _running_key(self) -> Hashable:
        return next(iter(self._running.values())).request.key

    def _closed(self) -> bool:
        """Continuous fairness: a request of another key has waited max_wait_steps, so stop admitting."""
        key = self._running_key()
        return any(
            e.request.key != key and self._steps - e.added_step >= self.config.max_wait_steps
            for e in self._waiting.values()
        )

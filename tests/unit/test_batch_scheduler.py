"""The denoiser's batching scheduler, driven by hand: no torch, no clock, no threads.

Requests come from `create_requests` (as in vLLM's scheduler tests) and steps are hand-built StepOutputs,
so every plan is deterministic. The property test replays random arrival sequences under random configs
and checks the limits on every plan and the documented finish bound on every request.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, deque

import pytest
from hypothesis import given, settings, target
from hypothesis import strategies as st

from ditserve.services.denoiser.batching import (
    MODES,
    STOP_REASONS,
    BatchingConfig,
    BatchScheduler,
    QueueFull,
    ScheduledRequest,
    StepOutput,
    StepPlan,
)


def create_requests(
    n: int,
    *,
    key: str = "a",
    cost: int = 1,
    total_steps: int = 2,
    arrival: float = 0.0,
    deadline: float | None = None,
    first: int = 0,
) -> list[ScheduledRequest]:
    """Ids are key + index (a0, a1, ...); the key carries total_steps, as the caller's key does."""
    return [
        ScheduledRequest(f"{key}{i}", (key, total_steps), cost, total_steps, arrival, deadline)
        for i in range(first, first + n)
    ]


def create_scheduler(mode: str, *requests: ScheduledRequest, now: float = 0.0, **config: object) -> BatchScheduler:
    scheduler = BatchScheduler(BatchingConfig(mode, **config))
    for request in requests:
        scheduler.add(request, now)
    return scheduler


def step(scheduler: BatchScheduler, now: float = 0.0, failed: tuple[str, ...] = ()) -> tuple[StepPlan, list[str]]:
    """One engine iteration that runs something: schedule, then report the step."""
    plan = scheduler.schedule(now)
    assert plan is not None and plan.request_ids, plan
    return plan, scheduler.update_from_output(plan, StepOutput(list(failed)))


def test_the_scheduler_imports_neither_torch_nor_grpc() -> None:
    probe = (
        "import sys, ditserve.services.denoiser.batching\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc')])"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("mode", "fast"),
        ("max_batch_size", 0),
        ("max_batch_size", 2.0),
        ("max_batch_size", True),
        ("batch_delay_ms", -1.0),
        ("batch_delay_ms", float("nan")),
        ("batch_delay_ms", float("inf")),
        ("max_batch_cost", 0),
        ("max_queue", 0),
        ("max_wait_steps", -1),
    ],
)
def test_config_errors_name_the_field_and_value(name: str, value: object) -> None:
    fields = {"mode": "dynamic", name: value}
    with pytest.raises(ValueError, match=re.escape(f"{name}: {value!r}")):
        BatchingConfig(**fields)


@pytest.mark.parametrize(("name", "value"), [("cost", 0), ("total_steps", 0)])
def test_request_errors_name_the_field_and_value(name: str, value: int) -> None:
    fields = {"request_id": "r", "key": "k", "cost": 1, "total_steps": 1, "arrival": 0.0, name: value}
    with pytest.raises(ValueError, match=f"{name}: {value}"):
        ScheduledRequest(**fields)


def test_off_runs_one_request_at_a_time_in_arrival_order() -> None:
    late, early = create_requests(1, arrival=1.0), create_requests(2, key="b", arrival=0.5)
    scheduler = create_scheduler("off", *late, *early, now=1.0)
    order = []
    while (plan := scheduler.schedule(1.0)) is not None:
        assert len(plan.request_ids) == 1
        assert plan.stop_reason == ("alone" if plan.joined else None)
        finished = scheduler.update_from_output(plan, StepOutput())
        order += finished
    assert order == ["b0", "b1", "a0"]


def test_dynamic_waits_out_the_delay_then_coalesces_the_key() -> None:
    scheduler = create_scheduler("dynamic", *create_requests(3), *create_requests(1, key="b"))
    plan = scheduler.schedule(0.0)
    assert plan == StepPlan([], [], None, [], [], pytest.approx(0.005))
    assert scheduler.schedule(0.002).wait_s == pytest.approx(0.003)
    plan = scheduler.schedule(0.005)
    assert plan.request_ids == plan.joined == ["a0", "a1", "a2"]
    assert plan.stop_reason == "delay" and plan.wait_s is None
    assert (scheduler.num_running, scheduler.num_waiting) == (3, 1)


def test_dynamic_dispatches_a_full_batch_at_once() -> None:
    scheduler = create_scheduler("dynamic", *create_requests(3), max_batch_size=2)
    plan = scheduler.schedule(0.0)
    assert plan.request_ids == ["a0", "a1"] and plan.stop_reason == "full"


@pytest.mark.parametrize(
    ("costs", "batch"),
    [
        ([2, 2, 2], ["a0", "a1"]),  # the next one would exceed the budget
        ([2, 3], ["a0", "a1"]),  # the budget is spent: nothing more can fit, so no delay
        ([2, 4, 1], ["a0"]),  # FIFO: a2 fits but may not overtake a1
        ([9], ["a0"]),  # over the budget alone: runs alone rather than never
    ],
)
def test_dynamic_dispatches_at_once_when_the_cost_budget_stops_it(costs: list[int], batch: list[str]) -> None:
    requests = [create_requests(1, cost=cost, first=i)[0] for i, cost in enumerate(costs)]
    scheduler = create_scheduler("dynamic", *requests, max_batch_cost=5)
    plan = scheduler.schedule(0.0)
    assert plan.request_ids == batch and plan.stop_reason == "cost"


def test_dynamic_batch_runs_all_steps_together_without_joins() -> None:
    scheduler = create_scheduler("dynamic", *create_requests(2, total_steps=3), batch_delay_ms=0.0)
    plan, finished = step(scheduler)
    assert plan.joined == ["a0", "a1"] and plan.stop_reason == "delay" and finished == []
    scheduler.add(create_requests(1, total_steps=3, first=2)[0], 0.0)
    assert step(scheduler) == (StepPlan(["a0", "a1"], [], None, [], [], None), [])
    assert step(scheduler)[1] == ["a0", "a1"]
    plan, _ = step(scheduler)
    assert plan.request_ids == plan.joined == ["a2"]


def test_continuous_admits_a_newcomer_at_the_next_boundary_and_lets_finished_ones_leave() -> None:
    scheduler = create_scheduler("continuous", *create_requests(1, total_steps=3))
    plan, _ = step(scheduler)
    assert plan.joined == ["a0"] and plan.stop_reason == "drain"
    scheduler.add(create_requests(1, total_steps=3, first=1)[0], 0.0)
    plan = scheduler.schedule(0.0)
    assert (plan.request_ids, plan.joined, plan.stop_reason) == (["a0", "a1"], ["a1"], "drain")
    assert (scheduler.steps_done("a0"), scheduler.steps_done("a1")) == (1, 0)  # a1 starts at its step 0
    assert scheduler.update_from_output(plan, StepOutput()) == []
    assert step(scheduler) == (StepPlan(["a0", "a1"], [], None, [], [], None), ["a0"])
    assert step(scheduler) == (StepPlan(["a1"], [], None, [], [], None), ["a1"])
    assert scheduler.schedule(0.0) is None


def test_continuous_fills_a_slot_as_soon_as_it_frees() -> None:
    scheduler = create_scheduler("continuous", *create_requests(1), max_batch_size=2)
    step(scheduler)
    for request in create_requests(2, first=1):
        scheduler.add(request, 0.0)
    plan, finished = step(scheduler)
    assert (plan.request_ids, plan.stop_reason, finished) == (["a0", "a1"], "full", ["a0"])
    plan, _ = step(scheduler)
    assert (plan.request_ids, plan.joined, plan.stop_reason) == (["a1", "a2"], ["a2"], "full")


@pytest.mark.parametrize("mode", ["dynamic", "continuous"])
def test_incompatible_keys_never_share_a_batch(mode: str) -> None:
    requests = [
        *create_requests(2, key="a"),
        *create_requests(2, key="b"),
        *create_requests(1, key="a", total_steps=4, first=2),  # same name, other steps: another key
    ]
    scheduler = create_scheduler(mode, *requests, batch_delay_ms=0.0)
    batches = []
    while (plan := scheduler.schedule(0.0)) is not None:
        batches.append(plan.request_ids)
        scheduler.update_from_output(plan, StepOutput())
    assert [batch for i, batch in enumerate(batches) if i == 0 or batch != batches[i - 1]] == [
        ["a0", "a1"],
        ["b0", "b1"],
        ["a2"],
    ]


def test_queue_full_raises_and_expired_requests_hold_no_slot() -> None:
    scheduler = create_scheduler(
        "continuous", *create_requests(1, deadline=1.0), *create_requests(1, key="b"), max_queue=2
    )
    with pytest.raises(QueueFull, match=r"queue is full \(2 waiting\)"):
        scheduler.add(create_requests(1, key="c")[0], 0.5)
    scheduler.add(create_requests(1, key="c")[0], 1.0)  # a0 expired at 1.0: its slot is free
    plan = scheduler.schedule(1.0)
    assert (plan.expired, plan.request_ids) == (["a0"], ["b0"])
    assert (scheduler.num_waiting, scheduler.num_running) == (1, 1)


def test_cancel_mid_batch_frees_the_slot_and_the_others_finish() -> None:
    scheduler = create_scheduler("continuous", *create_requests(3), max_batch_size=2)
    step(scheduler)
    assert scheduler.cancel("a0") and not scheduler.cancel("a0")
    assert scheduler.num_running == 1
    plan, finished = step(scheduler)
    assert (plan.request_ids, plan.joined, plan.cancelled, finished) == (["a1", "a2"], ["a2"], ["a0"], ["a1"])
    assert step(scheduler)[1] == ["a2"]


def test_cancel_while_the_step_runs_skips_the_request() -> None:
    scheduler = create_scheduler("dynamic", *create_requests(2, total_steps=1), batch_delay_ms=0.0)
    plan = scheduler.schedule(0.0)
    assert scheduler.cancel("a1")
    assert scheduler.update_from_output(plan, StepOutput()) == ["a0"]
    assert scheduler.schedule(0.0) == StepPlan([], [], None, [], ["a1"], None)
    assert scheduler.schedule(0.0) is None


def test_a_cancelled_waiting_request_never_runs() -> None:
    scheduler = create_scheduler("off", *create_requests(2, total_steps=1))
    assert scheduler.cancel("a1")
    plan, finished = step(scheduler)
    assert (plan.request_ids, plan.cancelled, finished) == (["a0"], ["a1"], ["a0"])
    assert scheduler.schedule(0.0) is None


def test_a_failing_request_leaves_alone() -> None:
    scheduler = create_scheduler("dynamic", *create_requests(3), batch_delay_ms=0.0)
    plan, finished = step(scheduler, failed=("a1",))
    assert plan.request_ids == ["a0", "a1", "a2"] and finished == []
    plan, finished = step(scheduler)
    assert plan.request_ids == finished == ["a0", "a2"]


def test_deadlines_expire_waiting_and_running_requests_once() -> None:
    scheduler = create_scheduler(
        "continuous", *create_requests(1, deadline=10.0), *create_requests(1, key="b", deadline=1.0)
    )
    assert step(scheduler)[0].request_ids == ["a0"]
    plan = scheduler.schedule(1.0)
    assert (plan.expired, plan.request_ids) == (["b0"], ["a0"])
    scheduler.update_from_output(plan, StepOutput())  # a0's 2 steps are done: it finished in time
    scheduler.add(create_requests(1, first=1, total_steps=5, deadline=12.0)[0], 11.0)
    step(scheduler, now=11.0)
    assert scheduler.schedule(12.0) == StepPlan([], [], None, ["a1"], [], None)
    assert scheduler.schedule(12.0) is None


def test_the_engine_must_report_each_plan_once() -> None:
    scheduler = create_scheduler("continuous", *create_requests(1))
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add(create_requests(1)[0], 0.0)
    plan = scheduler.schedule(0.0)
    with pytest.raises(RuntimeError, match="update_from_output"):
        scheduler.schedule(0.0)
    with pytest.raises(ValueError, match=r"failed: \['x'\]"):
        scheduler.update_from_output(plan, StepOutput(["x"]))
    scheduler.update_from_output(plan, StepOutput())
    with pytest.raises(ValueError, match="last schedule"):
        scheduler.update_from_output(plan, StepOutput())


def test_continuous_stops_admitting_once_another_key_waited_max_wait_steps() -> None:
    scheduler = create_scheduler("continuous", *create_requests(1, total_steps=3), max_wait_steps=2)
    step(scheduler)
    scheduler.add(create_requests(1, key="b", total_steps=1, arrival=1.0)[0], 1.0)
    started: dict[str, int] = {}
    for index in range(1, 7):
        scheduler.add(create_requests(1, total_steps=3, first=index, arrival=1.0 + index)[0], 1.0)
        plan, _ = step(scheduler)
        started.update(dict.fromkeys(plan.joined, index))
    # b0 waited 0 and 1 steps: a1, a2 join; then the a-batch drains (a0..a2), b0 goes next, then a3..a6.
    assert started == {"a1": 1, "a2": 2, "b0": 5, "a3": 6, "a4": 6, "a5": 6, "a6": 6}


def test_by_default_another_waiting_key_closes_admission_at_once() -> None:
    scheduler = create_scheduler("continuous", *create_requests(1, total_steps=2))
    step(scheduler)
    scheduler.add(create_requests(1, key="b", total_steps=1, arrival=1.0)[0], 1.0)
    scheduler.add(create_requests(1, first=1, arrival=2.0)[0], 2.0)
    batches = [step(scheduler)[0].request_ids for _ in range(4)]
    assert batches == [["a0"], ["b0"], ["a1"], ["a1"]]


# Property: random arrivals under random configs. Keys fix total_steps, as the caller's keys do.
KEYS = {"a": 1, "b": 3, "c": 2, "d": 2}
STEP_S = 0.004  # each step takes 4 ms, so 5 ms delays span steps


@st.composite
def configs(draw: st.DrawFn) -> BatchingConfig:
    return BatchingConfig(
        draw(st.sampled_from(MODES)),
        max_batch_size=draw(st.integers(1, 4)),
        batch_delay_ms=draw(st.sampled_from([0.0, 2.5, 5.0, 20.0])),
        max_batch_cost=draw(st.none() | st.integers(1, 8)),
        max_queue=draw(st.integers(1, 6)),
        max_wait_steps=draw(st.integers(0, 4)),
    )


arrivals = st.lists(
    st.tuples(st.integers(0, 6), st.sampled_from(sorted(KEYS)), st.integers(1, 5)),  # gap in ms, key, cost
    max_size=25,
)


def check_plan(
    config: BatchingConfig,
    plan: StepPlan,
    previous: list[str],
    waiting: dict[str, int],
    steps: int,
    by_id: dict[str, ScheduledRequest],
) -> None:
    """Limits hold, one key per batch, members keep their order, joins only where the mode allows.

    `waiting` maps each request not yet started to the step count when it was added.
    """
    ids = plan.request_ids
    assert len({by_id[rid].key for rid in ids}) == 1
    assert len(ids) <= (1 if config.mode == "off" else config.max_batch_size)
    if config.max_batch_cost is not None and len(ids) > 1:
        assert sum(by_id[rid].cost for rid in ids) <= config.max_batch_cost
    assert ids == previous + plan.joined
    assert plan.stop_reason in STOP_REASONS if plan.joined else plan.stop_reason is None
    if previous and plan.joined:  # a join into a running batch: continuous, and no other key starves
        assert config.mode == "continuous"
        key = by_id[previous[0]].key
        starving = [r for r, at in waiting.items() if by_id[r].key != key and steps - at >= config.max_wait_steps]
        assert not starving


@settings(max_examples=300, deadline=None)
@given(config=configs(), gaps=arrivals)
def test_every_request_finishes_within_the_bound_and_no_batch_breaks_a_limit(
    config: BatchingConfig, gaps: list[tuple[int, str, int]]
) -> None:
    pending, clock_ms = deque(), 0
    for i, (gap, name, cost) in enumerate(gaps):
        clock_ms += gap
        pending.append(ScheduledRequest(f"r{i}", (name, KEYS[name]), cost, KEYS[name], clock_ms / 1000))
    by_id = {request.request_id: request for request in pending}
    scheduler = BatchScheduler(config)
    now, steps, previous = 0.0, 0, []
    added: dict[str, int] = {}
    waiting: dict[str, int] = {}
    finished: dict[str, int] = {}
    ran: Counter[str] = Counter()
    for _ in range(10_000):
        while pending and pending[0].arrival <= now:
            request = pending.popleft()
            try:
                scheduler.add(request, now)
            except QueueFull:
                assert scheduler.num_waiting == config.max_queue
            else:
                added[request.request_id] = waiting[request.request_id] = steps
        plan = scheduler.schedule(now)
        if plan is None or not plan.request_ids:
            # Overshoot a little, as a real clock does: now + wait_s may round just short of the delay.
            wake = [now + plan.wait_s + 1e-9] if plan is not None and plan.wait_s is not None else []
            wake += [pending[0].arrival] if pending else []
            if not wake:
                break
            now = min(wake)
            continue
        check_plan(config, plan, previous, waiting, steps, by_id)
        for rid in plan.joined:
            del waiting[rid]
        ran.update(plan.request_ids)
        done = scheduler.update_from_output(plan, StepOutput())
        steps, now = steps + 1, now + STEP_S
        finished.update(dict.fromkeys(done, steps))
        previous = [rid for rid in plan.request_ids if rid not in done]
    assert scheduler.num_waiting == scheduler.num_running == 0
    assert finished.keys() == added.keys()
    longest = max((by_id[rid].total_steps for rid in added), default=0)
    wait = config.max_wait_steps if config.mode == "continuous" else 0
    bound = wait + (config.max_queue + 1) * longest
    for rid, added_at in added.items():
        assert ran[rid] == by_id[rid].total_steps
        assert finished[rid] - added_at <= bound, (rid, finished[rid] - added_at, bound)
    target(max((finished[rid] - at) / bound for rid, at in added.items()) if added else 0.0)

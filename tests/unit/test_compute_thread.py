"""ComputeThread: every call on one thread, in order, errors handed back, nesting without deadlock."""

from __future__ import annotations

import threading
import time

import pytest

from ditserve.services.common.compute import ComputeThread


@pytest.fixture
def compute() -> ComputeThread:
    thread = ComputeThread("test-compute")
    yield thread
    thread.close()


def test_calls_from_many_threads_run_on_one_other_thread_one_at_a_time(compute: ComputeThread) -> None:
    seen: list[int] = []
    running, overlaps = [0], [0]
    lock = threading.Lock()

    def work() -> int:
        with lock:
            running[0] += 1
            overlaps[0] = max(overlaps[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        seen.append(threading.get_ident())
        return threading.get_ident()

    callers = [threading.Thread(target=compute.run, args=(work,)) for _ in range(6)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(seen) == 6 and len(set(seen)) == 1
    assert seen[0] != threading.get_ident()
    assert overlaps[0] == 1


def test_the_result_and_the_error_come_back_to_the_caller(compute: ComputeThread) -> None:
    assert compute.run(lambda a, b: a + b, 2, 3) == 5

    def fail() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        compute.run(fail)
    assert compute.run(lambda: "still serving") == "still serving"


def test_a_call_made_on_the_compute_thread_runs_at_once(compute: ComputeThread) -> None:
    outer = compute.run(lambda: (threading.get_ident(), compute.run(threading.get_ident)))
    assert outer[0] == outer[1]


def test_submitted_work_runs_in_order(compute: ComputeThread) -> None:
    order: list[int] = []
    futures = [compute.submit(order.append, index) for index in range(20)]
    for future in futures:
        future.result(timeout=5)
    assert order == list(range(20))


def test_once_a_loop_owns_the_thread_other_work_is_refused_not_left_waiting(compute: ComputeThread) -> None:
    stop = threading.Event()
    owned = compute.own(stop.wait)
    with pytest.raises(RuntimeError, match="owned by a loop"):
        compute.run(lambda: None)
    stop.set()
    owned.result(timeout=5)

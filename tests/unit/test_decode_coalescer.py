"""The VAE's decode coalescer: which waiting requests join one call, and that every request gets its own
result (or its own error) back, whichever thread ran its call."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ditserve.services.vae.coalescer import DecodeCoalescer, Pending, group_is_full, take_group


def _pending(*spec: tuple[str, int]) -> list[Pending[int]]:
    return [Pending(key, count, index) for index, (key, count) in enumerate(spec)]


def test_the_oldest_request_takes_later_ones_of_its_key_while_they_fit() -> None:
    pending = _pending(("a", 2), ("b", 1), ("a", 3), ("a", 2), ("a", 1))
    assert [p.item for p in take_group(pending, 5)] == [0, 2]  # 2 + 3; the next "a" (2) no longer fits
    assert [p.item for p in take_group(pending, 8)] == [0, 2, 3, 4]
    assert [p.item for p in take_group(pending, 1)] == [0]  # over the batch by itself: alone
    assert group_is_full(pending, 5) and not group_is_full(pending, 9)


def _record(calls: list[list[int]], delay_s: float = 0.0) -> object:
    def decode(items: list[int]) -> list[int]:
        calls.append(list(items))
        time.sleep(delay_s)
        if 13 in items:
            raise ValueError("unlucky")
        return [item * 10 for item in items]

    return decode


def _submit_together(coalescer: DecodeCoalescer[int], requests: list[tuple[str, int]]) -> list[object]:
    """Each request from its own thread, in order, a little apart; each one's result or error."""

    def one(key: str, item: int) -> object:
        try:
            return coalescer.submit(key, 1, item)[0]
        except ValueError as error:
            return error

    with ThreadPoolExecutor(len(requests)) as pool:
        futures = []
        for key, item in requests:
            futures.append(pool.submit(one, key, item))
            time.sleep(0.02)
        return [future.result(timeout=30) for future in futures]


def test_at_batch_1_each_request_is_decoded_alone() -> None:
    calls: list[list[int]] = []
    coalescer = DecodeCoalescer(_record(calls, 0.05), max_batch=1, wait_s=0.0)
    assert _submit_together(coalescer, [("a", 1), ("a", 2), ("a", 3)]) == [10, 20, 30]
    assert sorted(calls) == [[1], [2], [3]]


def test_requests_of_one_shape_join_one_call_and_get_their_own_results() -> None:
    calls: list[list[int]] = []
    sizes: list[int] = []
    coalescer = DecodeCoalescer(_record(calls), max_batch=4, wait_s=2.0, observe=sizes.append)
    started = time.monotonic()
    assert _submit_together(coalescer, [("a", 1), ("a", 2), ("a", 3), ("a", 4)]) == [10, 20, 30, 40]
    assert calls == [[1, 2, 3, 4]] and sizes == [4]
    assert time.monotonic() - started < 1.5  # a full group does not wait out the window


def test_shapes_never_mix_and_a_waiting_request_is_not_left_behind() -> None:
    """While the first call runs, requests of two shapes wait; each shape is its own call, and every thread
    returns, including one whose own request was not in the group its thread decoded."""
    calls: list[list[int]] = []
    coalescer = DecodeCoalescer(_record(calls, 0.2), max_batch=8, wait_s=0.0)
    results = _submit_together(coalescer, [("a", 1), ("b", 2), ("a", 3), ("b", 4)])
    assert results == [10, 20, 30, 40]
    assert calls[0] == [1] and sorted(calls[1:]) == [[2, 4], [3]]


def test_a_failing_request_fails_alone() -> None:
    calls: list[list[int]] = []
    coalescer = DecodeCoalescer(_record(calls), max_batch=3, wait_s=2.0)
    results = _submit_together(coalescer, [("a", 1), ("a", 13), ("a", 3)])
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and str(results[1]) == "unlucky"
    assert calls == [[1, 13, 3], [1], [13], [3]]  # the batch failed: each again, alone


def test_the_wait_is_bounded_and_counted() -> None:
    calls: list[list[int]] = []
    coalescer = DecodeCoalescer(_record(calls), max_batch=4, wait_s=0.2)
    started = time.monotonic()
    result, waited_s = coalescer.submit("a", 1, 5)
    assert result == 50 and calls == [[5]]
    assert 0.2 <= waited_s < 1.0 and time.monotonic() - started < 1.0


def test_calls_never_overlap() -> None:
    running, overlaps = [0], []
    lock = threading.Lock()

    def decode(items: list[int]) -> list[int]:
        with lock:
            running[0] += 1
            overlaps.append(running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return items

    coalescer = DecodeCoalescer(decode, max_batch=2, wait_s=0.0)
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda i: coalescer.submit(i % 3, 1, i)[0], range(40))) == list(range(40))
    assert max(overlaps) == 1


@pytest.mark.parametrize(("max_batch", "wait_s"), [(0, 0.0), (2, -1.0)])
def test_bad_settings_are_refused(max_batch: int, wait_s: float) -> None:
    with pytest.raises(ValueError, match="batch"):
        DecodeCoalescer(lambda items: items, max_batch, wait_s)


def test_a_decode_that_loses_results_fails_its_requests_instead_of_hanging_them() -> None:
    coalescer = DecodeCoalescer(lambda items: items[:-1], max_batch=2, wait_s=0.0)
    with pytest.raises(RuntimeError, match="0 results for 1 requests"):
        coalescer.submit("a", 1, 1)


def test_a_request_joins_only_others_of_its_limit_and_one_alone_never_waits() -> None:
    """Decodes of a batched denoise (limit 4) join each other; one whose latents were made alone (limit 1)
    joins nothing and, its group full by itself, does not wait out the window."""
    calls: list[list[int]] = []
    coalescer = DecodeCoalescer(_record(calls, 0.2), max_batch=1, wait_s=0.0)

    def one(item: int, limit: int | None) -> object:
        return coalescer.submit("a", 1, item, limit)[0]

    with ThreadPoolExecutor(4) as pool:
        futures = []
        for item, limit in ((1, 4), (2, None), (3, 4), (4, 4)):
            futures.append(pool.submit(one, item, limit))
            time.sleep(0.02)
        assert [future.result(timeout=30) for future in futures] == [10, 20, 30, 40]
    assert calls[0] == [1] and sorted(calls[1:]) == [[2], [3, 4]]
    assert [p.item for p in take_group([Pending("a", 1, 0, 4), Pending("a", 1, 1, 1)], 4)] == [0]
    with pytest.raises(ValueError, match="at least 1"):
        coalescer.submit("a", 1, 5, 0)
    waited = DecodeCoalescer(_record([]), max_batch=8, wait_s=5.0)
    started = time.monotonic()
    assert waited.submit("a", 1, 6, 1)[0] == 60 and time.monotonic() - started < 2

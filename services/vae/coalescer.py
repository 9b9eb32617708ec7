"""Decodes from concurrent requests, joined into one VAE call when they have the same shape.

Each request says how many outputs the call it joins may hold (its limit; requests join only others of the
same shape and limit). On CPU a batched decode's convolutions and group norms reduce in another order than
a decode of one, so a coalesced image can differ from the one its request gets alone by one uint8 level in a
few values (`ditserve bench serving` reports how many, and what a batch saves): the VAE lets a request join
others when its latents come from a batched denoise, which already moved its low bits, or when
`--max-decode-batch` says every request may.

One decode runs at a time (decoding is memory-hungry). When the VAE is free, the oldest waiting request
is decoded together with every later one of the same shape, in arrival order, up to max_batch outputs;
with a wait, the call first waits up to that long after the oldest request arrived for more to join.
A request that fails inside a batch is retried alone, so only it fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")


@dataclass(eq=False)  # requests are compared by identity, never by their tensors
class Pending(Generic[Item]):
    """One request's decode: its shape key, its outputs' count, and what it decodes."""

    key: Hashable
    count: int
    item: Item
    limit: int = 1  # the most outputs of a call it joins
    arrived: float = field(default_factory=time.monotonic)
    decode_started: float | None = None
    future: Future[Any] = field(default_factory=Future)


def take_group(pending: Sequence[Pending[Item]], max_batch: int) -> list[Pending[Item]]:
    """The oldest request and, in arrival order, each later one with its key and limit that still fits in
    max_batch outputs (the oldest alone when it is over max_batch by itself)."""
    head = pending[0]
    group, total = [head], head.count
    for candidate in pending[1:]:
        if candidate.key == head.key and candidate.limit == head.limit and total + candidate.count <= max_batch:
            group.append(candidate)
            total += candidate.count
    return group


def group_is_full(pending: Sequence[Pending[Item]], max_batch: int) -> bool:
    """Whether waiting longer cannot grow the oldest request's group (it holds max_batch outputs)."""
    return sum(member.count for member in take_group(pending, max_batch)) >= max_batch


class DecodeCoalescer(Generic[Item]):
    """Runs decode(items) -> one result per item, one call at a time, for items submitted from any thread.

    decode is given the group's items in arrival order; observe(outputs) is called per decode call.
    max_batch: the limit of a request that names none.
    """

    def __init__(
        self,
        decode: Callable[[list[Item]], list[Any]],
        max_batch: int,
        wait_s: float,
        observe: Callable[[int], None] = lambda _: None,
    ) -> None:
        if max_batch < 1 or wait_s < 0:
            raise ValueError(f"the batch ({max_batch}) must be at least 1 and the wait ({wait_s} s) not negative")
        self.decode = decode
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.observe = observe
        self._pending: list[Pending[Item]] = []
        self._changed = threading.Condition()
        self._busy = False

    def submit(self, key: Hashable, count: int, item: Item, limit: int | None = None) -> tuple[Any, float]:
        """Decodes item (count outputs) with whatever joins it, in calls of at most limit outputs (default
        max_batch); returns its result and the seconds it waited for its decode call to start, or raises
        its error.

        The calling thread waits while another decodes; when the VAE is free and its own request is still
        waiting, it decodes the oldest group (which may be another request's) and looks again."""
        if limit is not None and limit < 1:
            raise ValueError(f"a decode's batch limit must be at least 1, got {limit}")
        request: Pending[Item] = Pending(key, count, item, self.max_batch if limit is None else limit)
        with self._changed:
            self._pending.append(request)
            self._changed.notify_all()
        while True:
            with self._changed:
                while self._busy and not request.future.done():
                    self._changed.wait()
                if request.future.done():
                    assert request.decode_started is not None
                    return request.future.result(), request.decode_started - request.arrived
                self._busy = True
                group = self._gather()
            try:
                self._run(group)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _gather(self) -> list[Pending[Item]]:
        """Under the lock: waits out the oldest request's window (or until its group is full), then removes
        and returns its group."""
        while not group_is_full(self._pending, self._pending[0].limit):
            remaining = self._pending[0].arrived + self.wait_s - time.monotonic()
            if remaining <= 0:
                break
            self._changed.wait(remaining)
        group = take_group(self._pending, self._pending[0].limit)
        self._pending = [request for request in self._pending if request not in group]
        return group

    def _run(self, group: list[Pending[Item]]) -> None:
        started = time.monotonic()
        for request in group:
            request.decode_started = started
        try:
            self.observe(sum(request.count for request in group))
            results = self.decode([request.item for request in group])
            if len(results) != len(group):  # else some requests' threads would wait forever
                raise RuntimeError(f"decode returned {len(results)} results for {len(group)} requests")
        except Exception as error:
            if len(group) == 1:
                group[0].future.set_exception(error)
                return
            for request in group:  # one bad request must not fail the others: each again, alone
                self._run([request])
            return
        for request, result in zip(group, results, strict=True):
            request.future.set_result(result)

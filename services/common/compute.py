"""The one thread a stage runs its torch work on: model loading, warm-up, encodes, steps, decodes.

PyTorch's CPU ops run on OpenMP, and libgomp keeps a team of worker threads for every OS thread that
has run a parallel region. Once a process holds more of those threads than it has cores, libgomp stops
letting idle workers spin (about 100 polls, then sleep), so every small op pays a futex wake-up. A
stage that loaded its model on the main thread and then ran requests on gRPC handler threads was in
that state for good: on 2 cores FluxPipeline on the shipped image model (20 steps, true CFG) took
0.65 s when run on a second thread after the main thread had used torch, against 0.29 s when all of it
ran on one thread (measured in one process; `ditserve bench transport` measures what the services gain).
Funnelling a stage's torch work through one long-lived thread keeps one team.

Handler threads still touch small tensors (decoding a request's tensors, range checks); PyTorch runs
ops under its parallel grain size without OpenMP, so at the shipped models' sizes those make no team.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    """A daemon thread running submitted calls one at a time, in submission order.

    run() from the thread itself calls directly, so work that nests (a model load that warms up) cannot
    deadlock. A long-lived loop (the denoiser's engine) may own() the thread; from then on run() from any
    other thread is refused rather than left waiting behind it forever.
    """

    def __init__(self, name: str = "compute") -> None:
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self._owned = False

    @property
    def ident(self) -> int | None:
        """The thread's identifier (threading.get_ident() on it)."""
        return self._thread.ident

    def _serve(self) -> None:
        while (task := self._tasks.get()) is not None:
            task()

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()

        def task() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(function(*args))
            except BaseException as error:  # handed to the caller through the future
                future.set_exception(error)

        self._tasks.put(task)
        return future

    def run(self, function: Callable[..., T], *args: Any) -> T:
        """function(*args) on the compute thread, after the work queued before it; its result or its error."""
        if threading.current_thread() is self._thread:
            return function(*args)
        if self._owned:
            raise RuntimeError(f"{self._thread.name} is owned by a loop: nothing else runs there")
        return self.submit(function, *args).result()

    def own(self, loop: Callable[[], None]) -> Future[None]:
        """Runs loop on the thread, once the work queued before it is done; the thread is its until it returns."""
        self._owned = True
        return self.submit(loop)

    def close(self) -> None:
        """The thread exits once the work already queued is done."""
        self._tasks.put(None)

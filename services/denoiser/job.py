"""One admitted Denoise request: its validated settings, its event stream, its cancel flag.

Pure Python (no torch, no grpc) so the engine's bookkeeping is testable alone.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    step_ms: float


@dataclass(frozen=True)
class Finished:
    latents: Any
    queue_ms: float
    step_ms: list[float]
    total_ms: float
    profile_trace: str = ""
    computed_steps: dict[str, str] = field(default_factory=dict)
    batched: bool = False  # shared a transformer call with another job


@dataclass(frozen=True)
class Failed:
    error: Exception


@dataclass(frozen=True)
class Cancelled:
    """Wakes the waiting handler when its caller has gone."""


Event = Progress | Finished | Failed | Cancelled


@dataclass
class DenoiseJob:
    """A request as the engine sees it; `inputs` holds the role-specific tensors and settings."""

    request_id: str
    inputs: Any
    steps: int
    profile_steps: int = 0
    deadline: float | None = None  # time.monotonic() after which the caller no longer waits (its gRPC deadline)
    submitted: float = field(default_factory=time.perf_counter)
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Called when the caller goes away: the engine drops the job at its next step boundary."""
        self._cancelled.set()
        self.events.put(Cancelled())

    def emit(self, event: Event) -> None:
        self.events.put(event)

"""Traces on demand: the torch profiler behind StartProfile/StopProfile, and named ranges.

`trace_range(name)` marks a stage, step or block for both tools users open:
the torch profiler's trace (record_function, in Perfetto) and Nsight Systems
(NVTX, only where CUDA is present, so CPU runs pay nothing for it). Trace
files always land under --profile-dir: callers choose a name, never a path.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ditserve.services.common.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:  # torch loads on first use, so the gateway and the engine's logic import without it
    import torch

SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@functools.cache
def _nvtx() -> bool:
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def trace_range(name: str) -> Iterator[None]:
    """A named range in the torch profiler's trace and, with CUDA, in Nsight (NVTX).

    A process that has not loaded torch runs no model, so there is nothing to trace: the range is
    skipped rather than paying torch's import (the engine's logic runs torch-free in tests).
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    from torch.profiler import record_function

    with record_function(name):
        if _nvtx():
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if _nvtx():
                torch.cuda.nvtx.range_pop()


def add_block_ranges(blocks: list[torch.nn.Module], prefix: str) -> None:
    """NVTX ranges around each transformer block for Nsight; nothing is installed without CUDA."""
    if not _nvtx():
        return
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(_push_hook(f"{prefix}[{index}]"))
        block.register_forward_hook(_pop_hook)


def _push_hook(name: str) -> Callable[..., None]:
    import torch

    def hook(module: torch.nn.Module, args: tuple) -> None:
        torch.cuda.nvtx.range_push(name)  # its return value must not reach torch: it would replace args

    return hook


def _pop_hook(module: torch.nn.Module, args: tuple, output: object) -> None:
    import torch

    torch.cuda.nvtx.range_pop()


def activities() -> list[Any]:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if _nvtx() else [])]


def _all_threads_config() -> object | None:
    """CPU ops are recorded per thread unless asked otherwise, and our model work runs on
    worker threads, not on the RPC thread that starts the profile (torch >= 2.7 can)."""
    from torch._C._profiler import _ExperimentalConfig

    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError:
        return None


def trace_path(profile_dir: Path, name: str) -> Path:
    """The trace file for `name`, refusing anything that could leave `profile_dir`."""
    if not SAFE_NAME.fullmatch(name) or name.startswith("."):
        raise InvalidArgument("name", f"{name!r} must be 1-64 of [A-Za-z0-9._-] and not start with '.'")
    root = profile_dir.resolve()
    path = (root / f"{name}.trace.json.gz").resolve()
    if path.parent != root:
        raise InvalidArgument("name", f"{name!r} would leave the profile directory")
    return path


class Profiler:
    """At most one on-demand profile per process."""

    def __init__(self, profile_dir: Path) -> None:
        self.profile_dir = Path(profile_dir)
        self._lock = threading.Lock()
        self._active: tuple[Any, Path] | None = None

    def start(self, name: str = "", record_shapes: bool = True, with_stack: bool = False) -> Path:
        """Starts tracing into `profile_dir/NAME.trace.json.gz`; returns that path."""
        path = trace_path(self.profile_dir, name or time.strftime("profile-%Y%m%d-%H%M%S"))
        with self._lock:
            if self._active is not None:
                raise FailedPrecondition("a profile is already running; stop it first")
            from torch.profiler import profile

            profiler = profile(
                activities=activities(),
                record_shapes=record_shapes,
                with_stack=with_stack,
                experimental_config=_all_threads_config(),
            )
            profiler.start()
            self._active = (profiler, path)
        return path

    def stop(self) -> Path:
        with self._lock:
            if self._active is None:
                raise FailedPrecondition("no profile is running; start one first")
            profiler, path = self._active
            self._active = None
        profiler.stop()
        return export(profiler, path)

    @property
    def running(self) -> bool:
        return self._active is not None


def export(profiler: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(path))
    return path

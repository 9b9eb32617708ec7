"""Sequence-parallel serving: rank 0 serves gRPC and replays every transformer call on the follower ranks.

The serving process is rank 0. It starts world - 1 follower processes (from a forkserver that imported
torch and the family's modules once); all join one process group and build the same sequence-parallel
executor of the model's family over the same model folder and the attention backend rank 0 resolved.
Before each transformer call the runner makes, rank 0 broadcasts a header (the slots: job, CFG branch,
step, rows; a job's cache config the first time it appears; jobs that ended) and then the input tensors.
A follower runs the identical call, so the collectives inside line up; it keeps one RequestCache per job,
as each rank caches its own shard's residuals (the cache decisions agree because their distance is
all-reduced in the family's sequence-parallel executor).

Headers travel on a gloo group whose timeout is practically unbounded: followers wait there while the
service is idle. The transformer's collectives use the world group with a bounded timeout. An error
inside a call leaves the other ranks inside a collective, so it breaks the group: the driver is marked
broken and every request, running or new, ends UNAVAILABLE until the service is restarted.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ditserve.client.launcher import free_port
from ditserve.services.common.errors import InvalidArgument, StartupError, Unavailable
from ditserve.services.common.model import ModelFolder
from ditserve.services.denoiser.attention.registry import BackendName
from ditserve.services.denoiser.cache.policy import CacheConfig
from ditserve.services.denoiser.cache.state import RequestCache, Slot, forward_batch
from ditserve.services.denoiser.parallel.attention import lse_kernel
from ditserve.services.denoiser.parallel.mesh import SPConfig, SPMesh, init_sequence_parallel
from ditserve.services.families import load_family
from ditserve.services.families.base import BlockExecutor
from ditserve.services.families.family import ModelFamily

log = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=365)  # followers wait for the next header as long as the service idles
CALL_TIMEOUT_S = 120.0  # a collective inside a call: longer than any rank lags behind another
READY_TIMEOUT_S = 600.0  # followers loading the model

TensorSpec = tuple[tuple[int, ...], torch.dtype] | None


def start_forkserver(family: ModelFamily) -> Any:
    """A forkserver context that imports torch and the family's modules once for every rank it starts."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", *family.sp_preload])
    return context


@dataclass(frozen=True)
class FollowerSpec:
    """What every rank needs to join the world and build rank 0's transformer (picklable)."""

    config: SPConfig
    model: str
    allow_pickle: bool
    device_type: str
    dtype: torch.dtype
    backend: BackendName
    teacache_coefficients: tuple[float, ...] | None
    port: int
    threads: int
    parent_pid: int
    timeout_s: float

    def device(self, rank: int) -> torch.device:
        """One GPU per rank on CUDA; every rank on the CPU otherwise."""
        return torch.device("cuda", rank) if self.device_type == "cuda" else torch.device("cpu")

    def join(self, rank: int) -> tuple[SPMesh, dist.ProcessGroup]:
        """The mesh (bounded timeout) and the header group (unbounded), created in the same order everywhere."""
        mesh = init_sequence_parallel(
            self.config,
            rank,
            self.device(rank),
            init_method=f"tcp://127.0.0.1:{self.port}",
            timeout=timedelta(seconds=self.timeout_s),
        )
        return mesh, dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


@dataclass(frozen=True)
class CallHeader:
    """One transformer call as rank 0 is about to make it; `tensors` follow, broadcast in this order."""

    caching: bool  # forward_batch with the slots' caches; else the transformer's own forward
    slots: list[tuple[int, str, int, int, int]]  # job, branch, step, total_steps, rows
    configs: dict[int, CacheConfig]  # jobs seen for the first time
    released: list[int]  # jobs that ended: their caches can go
    tensors: dict[str, TensorSpec]


class SPDriver:
    """Rank 0's side: starts the followers, mirrors each call to them, and notices when the group is lost.

    The runner calls `announce` before each transformer call and `fail` when a step raised.
    """

    def __init__(
        self, spec: FollowerSpec, family: ModelFamily, transformer: torch.nn.Module, processes: list[Any]
    ) -> None:
        self.spec = spec
        self.processes = processes
        self.mesh, self.headers = spec.join(0)
        self.executor: BlockExecutor = family.sequence_parallel_executor(transformer, self.mesh, spec.backend)
        self.broken: str | None = None
        self.on_broken: Callable[[str], None] | None = None  # the service's health: NOT_SERVING, and why
        self._jobs: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._ids = itertools.count()
        self._released: deque[int] = deque()

    @classmethod
    def start(
        cls,
        config: SPConfig,
        folder: ModelFolder,
        family: ModelFamily,
        transformer: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        backend: BackendName,
        teacache_coefficients: tuple[float, ...] | None,
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> SPDriver:
        """Checks the layout against the model, starts the followers and waits until they are ready."""
        try:
            config.check_heads(family.attention_heads(transformer))
            if config.ring > 1:
                lse_kernel(backend)
        except ValueError as error:
            raise StartupError(f"sequence parallel {config}: {error}") from None
        spec = FollowerSpec(
            config=config,
            model=str(folder.path),
            allow_pickle=folder.allow_pickle,
            device_type=device.type,
            dtype=dtype,
            backend=backend,
            teacache_coefficients=teacache_coefficients,
            port=free_port(),
            threads=torch.get_num_threads(),
            parent_pid=os.getpid(),
            timeout_s=timeout_s,
        )
        context = start_forkserver(family)
        ready = context.SimpleQueue()
        processes = [
            context.Process(target=follow, args=(rank, spec, ready), name=f"sp-rank-{rank}", daemon=True)
            for rank in range(1, config.world_size)
        ]
        for process in processes:
            process.start()
        log.info("sequence parallel %s: follower pids %s", config, [process.pid for process in processes])
        try:
            driver = cls(spec, family, transformer, processes)
        except Exception as error:
            _terminate(processes)
            raise StartupError(f"sequence parallel {config}: the ranks could not join: {error}") from None
        driver._wait_ready(ready)
        return driver

    def _wait_ready(self, ready: Any) -> None:
        """Blocks until every follower loaded the model; one that died instead fails startup."""
        pending = set(range(1, self.spec.config.world_size))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while pending:
            while not ready.empty():
                pending.discard(ready.get())
            if self._dead() or time.monotonic() > deadline:
                self.stop()
                raise StartupError(f"sequence parallel {self.spec.config}: ranks {sorted(pending)} did not start")
            time.sleep(0.05)

    def watch(self, interval_s: float = 1.0) -> None:
        """Notices a follower that exited while the service idles (a request would only find out later)."""

        def loop() -> None:
            while self.broken is None:
                if dead := self._dead():
                    self._break(f"{', '.join(dead)} exited")
                time.sleep(interval_s)

        threading.Thread(target=loop, name="sp-watch", daemon=True).start()

    def _break(self, why: str) -> None:
        if self.broken is None:
            log.error("the sequence-parallel group is lost: %s", why)
            self.broken = why
            if self.on_broken is not None:
                self.on_broken(why)

    def _dead(self) -> list[str]:
        return [process.name for process in self.processes if not process.is_alive()]

    @property
    def layout(self) -> str:
        return str(self.spec.config)

    def check_tokens(self, token_counts: dict[str, int], size: str) -> None:
        """Every token input is sharded evenly (sharding.py), so uneven requests are refused up front.

        token_counts: the field a count comes from -> its tokens, e.g. {"prompt.prompt_embeds": 512}.
        """
        world = self.spec.config.world_size
        for field, tokens in token_counts.items():
            if tokens % world:
                raise InvalidArgument(
                    field,
                    f"{size} gives {tokens} tokens, which do not divide by the {world} sequence-parallel ranks"
                    f" ({self.layout}); pick one that does",
                )

    def check_available(self) -> None:
        if self.broken is None and (dead := self._dead()):
            self._break(f"{', '.join(dead)} exited")
        if self.broken is not None:
            raise Unavailable(f"the sequence-parallel group is down ({self.broken}); restart the denoiser")

    def announce(
        self,
        trajectories: list[Any],
        branches: tuple[str, ...],
        caching: bool,
        inputs: dict[str, torch.Tensor | None],
    ) -> None:
        """Sends the followers the call rank 0 makes next, with its inputs: a slot per branch and
        trajectory, in the call's row order (both CFG branches when they share the call)."""
        self.check_available()
        configs: dict[int, CacheConfig] = {}
        jobs = [self._job(trajectory, configs) for trajectory in trajectories]
        slots = [
            (job, branch, trajectory.index, len(trajectory.timesteps), trajectory.latents.shape[0])
            for branch in branches
            for job, trajectory in zip(jobs, trajectories, strict=True)
        ]
        released = [self._released.popleft() for _ in range(len(self._released))]
        specs = {name: None if t is None else (tuple(t.shape), t.dtype) for name, t in inputs.items()}
        dist.broadcast_object_list([CallHeader(caching, slots, configs, released, specs)], src=0, group=self.headers)
        for tensor in inputs.values():
            if tensor is not None:
                dist.broadcast(tensor.contiguous(), src=0)

    def _job(self, trajectory: Any, configs: dict[int, CacheConfig]) -> int:
        """The trajectory's job id; a new one's cache config goes into configs, for the followers."""
        job = self._jobs.get(trajectory)
        if job is None:
            job = self._jobs[trajectory] = next(self._ids)
            weakref.finalize(trajectory, self._released.append, job)
            configs[job] = trajectory.cache.config
        return job

    def fail(self, error: Exception) -> Unavailable:
        """A call raised: the other ranks may be stuck in a collective, so the whole group is lost."""
        self._break(f"a call failed: {type(error).__name__}: {error}")
        return Unavailable(f"the sequence-parallel group is down ({self.broken}); restart the denoiser")

    def stop(self) -> None:
        """Ends the followers (a stop header if the group still works) and leaves the process group."""
        if self.broken is None and not self._dead():
            self.broken = "stopped"  # the watcher ends; a stopping service is not a broken one
            dist.broadcast_object_list([None], src=0, group=self.headers)
            for process in self.processes:
                process.join(timeout=10)
        _terminate(self.processes)  # a broken group's followers may sit in a collective until its timeout
        dist.destroy_process_group()


def _terminate(processes: list[Any]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)


def follow(rank: int, spec: FollowerSpec, ready: Any) -> None:
    """A follower rank: joins, builds the transformer, then replays rank 0's calls until a stop header."""
    torch.set_num_threads(spec.threads)
    threading.Thread(target=_exit_with_parent, args=(spec.parent_pid,), daemon=True).start()
    mesh, headers = spec.join(rank)
    folder = ModelFolder(spec.model, allow_pickle=spec.allow_pickle)
    family = load_family(folder)
    transformer = family.load_transformer(folder, mesh.device, spec.dtype)
    executor = family.sequence_parallel_executor(transformer, mesh, spec.backend)
    caches: dict[int, RequestCache] = {}
    ready.put(rank)
    with torch.inference_mode():
        while (header := _receive_header(headers)) is not None:
            for job in header.released:
                caches.pop(job, None)
            caches.update(
                {
                    job: RequestCache(config, executor.num_blocks, spec.teacache_coefficients)
                    for job, config in header.configs.items()
                }
            )
            inputs = {name: _receive_tensor(shape, mesh.device) for name, shape in header.tensors.items()}
            slots = [Slot(caches[job].branch(branch), *rest) for job, branch, *rest in header.slots]
            if header.caching:
                forward_batch(executor, slots, **inputs)
            else:  # as TransformerRunner._predict: the branches still count the step, so later cached calls line up
                executor.forward(**inputs)
                for slot in slots:
                    slot.cache.record(True)
    dist.destroy_process_group()


def _receive_header(group: dist.ProcessGroup) -> CallHeader | None:
    box: list[CallHeader | None] = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _receive_tensor(tensor_spec: TensorSpec, device: torch.device) -> torch.Tensor | None:
    if tensor_spec is None:
        return None
    shape, dtype = tensor_spec
    tensor = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(tensor, src=0)
    return tensor


def _exit_with_parent(parent_pid: int) -> None:
    """A rank 0 killed outright cannot send a stop header; its followers must not outlive it."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)

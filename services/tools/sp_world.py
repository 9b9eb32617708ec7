"""Runs a function on every rank of a local sequence-parallel world (CPU, gloo, loopback): tests and bench.

Processes start from a forkserver that has imported torch and diffusers once, so a 4-rank world starts in
about a second instead of each rank paying the imports again. Each rank runs with one intra-op thread
(OMP_NUM_THREADS=1): ranks share the machine's cores, and oversubscribed threads would only slow them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ditserve.client.launcher import free_port
from ditserve.services.denoiser.parallel.mesh import SPConfig, SPMesh, init_sequence_parallel

Result = TypeVar("Result")
PRELOAD = ["torch", "torch.distributed", "diffusers.models.transformers.transformer_flux"]


def run_world(
    config: SPConfig,
    fn: Callable[..., Result],
    *args: Any,
    timeout_s: float = 120.0,
) -> list[Result]:
    """fn(mesh, *args) on each of config.world_size CPU ranks; their results in rank order.

    `fn` must be importable by name (a module-level function) and its result picklable. A rank that
    raises fails the whole call with its traceback; the other ranks are terminated.
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    results = context.SimpleQueue()
    world = mp.start_processes(
        _rank_main,
        args=(config, free_port(), results, fn, args),
        nprocs=config.world_size,
        join=False,
        start_method="forkserver",
    )
    collected: dict[int, Result] = {}
    deadline = time.monotonic() + timeout_s
    while not world.join(timeout=0.05):  # raises, and ends the others, if a rank failed
        while not results.empty():  # drained as they come: a full pipe would block the rank
            rank, value = results.get()
            collected[rank] = value
        if time.monotonic() > deadline:
            for process in world.processes:
                process.terminate()
            raise TimeoutError(f"{config} world did not finish in {timeout_s:.0f} s")
    while not results.empty():
        rank, value = results.get()
        collected[rank] = value
    return [collected[rank] for rank in range(config.world_size)]


def _rank_main(
    rank: int, config: SPConfig, port: int, results: Any, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    address = f"tcp://127.0.0.1:{port}"
    mesh: SPMesh = init_sequence_parallel(config, rank, torch.device("cpu"), init_method=address)
    try:
        results.put((rank, fn(mesh, *args)))
    finally:
        dist.destroy_process_group()

"""`ditserve bench serving`: throughput and latency through the gateway, batching off/dynamic/continuous.

Three full stacks run side by side (one per --batching mode) on the same model; every load level is
run against each mode in turn (A B C, A B C, ...) so machine noise hits all modes alike. Closed loop:
C clients each send their next request when the last one returns. Open loop: the same --open-requests
Poisson arrivals for every mode, at a fixed rate near the off-mode capacity, latency counted from the
scheduled arrival. The p99 is the second-slowest of the default 200: enough arrivals for it not to be
the slowest one, and for off's queue to grow to what that load keeps it at.

Requests ask for the model folder's defaults at --steps (a video family: its frames, returned raw), the
work of the family's in-process reference (reference.py). Before the stacks start, that reference
measures the bound batching can reach on this machine: the model's throughput at batch 8 against batch 1,
in one process under the services' OpenMP policy; continuous batching is reported as a fraction of it,
as a ratio of speed-ups (fraction_of_bound) and in outputs per second (fraction_of_batched_throughput).
Every request sends the same prompt, so the encoder's embedding cache answers all but the first.
The stacks run the VAE's defaults: decodes of batched denoises join each other (`vae_batch_size` says how
many a call held), others decode alone; `vae_coalescing` measures in-process what joining BOUND_BATCH
decodes into one call saves, and how many values it changes.

Every row also counts the CPU time each process of its stack (and this process, the clients) used per
completed request, and the bound the reference's per output at batch 1 and BOUND_BATCH: on a machine whose
cores the batched denoiser fills, throughput is cores over CPU per request, so the two say where the
services' share of the bound goes (which stage, and how much more than the reference's own work).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from ditserve.client.config import add_model_argument
from ditserve.services.tools.bench.common import median, process_cpu_seconds, result_document
from ditserve.services.tools.bench.decode_batching import measure_decode_batching

MODES = ("off", "dynamic", "continuous")
PROMPT = "a red circle on a blue background"
STARTUP_TIMEOUT_S = 600.0  # a loaded 2-core machine starts twelve model processes slowly
BOUND_BATCH = 8
BOUND_REPEATS = 3
TARGETS = {"throughput_ratio_continuous": 3.5, "fraction_of_bound": 0.95, "p99_ratio_continuous": 0.4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per request (default: 20)")
    parser.add_argument("--concurrency", default="1,4,8,16", help="closed-loop client counts (default: 1,4,8,16)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per load level and mode")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="open-loop requests/s (default: 0.9 x off's capacity at 8)"
    )
    parser.add_argument(
        "--open-requests",
        type=int,
        default=200,
        help="open-loop arrivals per mode, whose p99 is reported (default: 200)",
    )
    parser.add_argument("--max-batch-size", type=int, default=16)


def _scrape(port: int, sample: str) -> float:
    """The sum of a metric's samples whose name and labels start with `sample` (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(sample))


def _scrape_steps(port: int) -> float:
    return _scrape(port, "ditserve_denoise_step_duration_seconds_count")


def _decode_batch_size(port: int) -> float | None:
    """The VAE's mean images per decode call since it started (None: it decoded nothing)."""
    calls = _scrape(port, "ditserve_decode_batch_size_count")
    return _scrape(port, "ditserve_decode_batch_size_sum") / calls if calls else None


def _encoder_hit_rate(port: int) -> float | None:
    """The encoder's embedding cache hits over lookups since it started (None: its cache is off)."""
    hits = _scrape(port, 'ditserve_embedding_cache_lookups_total{result="hit"}')
    misses = _scrape(port, 'ditserve_embedding_cache_lookups_total{result="miss"}')
    return hits / (hits + misses) if hits + misses else None


class Load:
    """Sends requests to one gateway and records each one's latency and queue time."""

    def __init__(self, target: str, settings: dict[str, Any]) -> None:
        from ditserve.client.stub import PipelineClient

        self.client = PipelineClient(target)
        self.settings = settings
        self.latencies: list[float] = []
        self.queue_ms: list[float] = []
        self.errors = 0
        self._lock = threading.Lock()
        self._seed = 0

    def one(self, started: float | None = None) -> None:
        with self._lock:
            self._seed += 1
            seed = self._seed
        started = time.perf_counter() if started is None else started
        try:
            output = self.client.generate(PROMPT, seed=seed, timeout=120, **self.settings)
        except Exception:
            with self._lock:
                self.errors += 1
            return
        with self._lock:
            self.latencies.append(time.perf_counter() - started)
            self.queue_ms.append(output.timing.queue_ms)

    def closed(self, clients: int, seconds: float) -> float:
        """Runs `clients` request loops for `seconds`; returns the measured wall time."""
        stop = time.perf_counter() + seconds
        started = time.perf_counter()

        def loop() -> None:
            while time.perf_counter() < stop:
                self.one()

        threads = [threading.Thread(target=loop) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    def open(self, arrivals: list[float]) -> float:
        """Sends one request at each arrival time (seconds from now); returns the wall time to the last answer."""
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
            for arrival in arrivals:
                delay = started + arrival - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(self.one, started + arrival)
        return time.perf_counter() - started


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """`count` arrival times (seconds from the start) of a Poisson process at `rate` per second."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(rate)
        arrivals.append(t)
    return arrivals


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    return {role: process_cpu_seconds(pid) for role, pid in pids.items()}


def _row(
    mode: str,
    load: str,
    value: float,
    runner: Load,
    wall: float,
    steps_delta: float,
    steps: int,
    cpu_s: dict[str, float],
) -> dict:
    lat = sorted(runner.latencies)
    done = len(lat)
    cpu_ms = {role: 1000 * seconds / done for role, seconds in cpu_s.items()} if done else {}
    return {
        "mode": mode,
        "load": load,
        "level": value,
        "completed": done,
        "errors": runner.errors,
        "req_per_s": done / wall,
        "latency_mean_s": sum(lat) / done if done else None,
        "latency_p50_s": median(lat) if done else None,
        "latency_p99_s": lat[min(done - 1, int(0.99 * done))] if done else None,
        "queue_ms_mean": sum(runner.queue_ms) / done if done else None,
        "mean_batch_size": done * steps / steps_delta if steps_delta else None,
        "cpu_ms_per_request": {**cpu_ms, "total": sum(cpu_ms.values())} if done else None,
    }


def batching_bound(model: Path, steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The in-process reference's throughput at batch BOUND_BATCH over batch 1 (medians of alternating
    runs), and the request settings that do its work."""
    from ditserve.services.tools.bench.reference import InProcessWorker, services_environment

    with InProcessWorker(model, steps, services_environment()) as worker:
        worker(PROMPT, 0, 1)  # untimed: first-call costs
        single, batched = [], []
        cpu_s = {1: 0.0, BOUND_BATCH: 0.0}
        for repeat in range(BOUND_REPEATS):
            for batch, times in ((1, single), (BOUND_BATCH, batched)):
                before = process_cpu_seconds(worker.process.pid)
                times.append(worker(PROMPT, repeat, batch)[0])
                cpu_s[batch] += process_cpu_seconds(worker.process.pid) - before
        settings = worker.settings
    single_s, batched_s = median(single), median(batched)
    bound = {
        "batch": BOUND_BATCH,
        "batch1_s": single_s,
        f"batch{BOUND_BATCH}_s": batched_s,
        "throughput_ratio": BOUND_BATCH * single_s / batched_s,
        # CPU per output, each call's whole process (its pixels' trip to the parent included)
        "batch1_cpu_ms": 1000 * cpu_s[1] / BOUND_REPEATS,
        f"batch{BOUND_BATCH}_cpu_ms_per_output": 1000 * cpu_s[BOUND_BATCH] / (BOUND_BATCH * BOUND_REPEATS),
    }
    return bound, settings


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ditserve.client.launcher import Ports, Stack

    bound, settings = batching_bound(Path(args.model), args.steps)
    decoding = measure_decode_batching(Path(args.model), PROMPT, BOUND_BATCH)
    saved_s = (decoding["solo_ms_per_output"] - decoding["batched_ms_per_output"]) / 1000
    levels = [int(c) for c in args.concurrency.split(",")]
    stacks = {}
    for mode in MODES:
        extra = {"denoiser": ["--batching", mode, "--max-batch-size", str(args.max_batch_size)]}
        stacks[mode] = Stack(model=Path(args.model), ports=Ports.free(), extra_args=extra)
    rows: list[dict[str, Any]] = []
    try:
        for stack in stacks.values():
            stack.start(timeout=STARTUP_TIMEOUT_S)
        for stack in stacks.values():  # warm every path once
            Load(stack.gateway, settings).closed(2, 1.0)

        def measure(mode: str, load: str, value: float, body: Any) -> dict:
            stack = stacks[mode]
            runner = Load(stack.gateway, settings)
            pids = {role: process.pid for role, process in stack.processes.items()} | {"clients": os.getpid()}
            before = _scrape_steps(stack.ports.metrics["denoiser"])
            cpu_before = _cpu_seconds(pids)
            wall = body(runner)
            cpu = {role: seconds - cpu_before[role] for role, seconds in _cpu_seconds(pids).items()}
            delta = _scrape_steps(stack.ports.metrics["denoiser"]) - before
            row = _row(mode, load, value, runner, wall, delta, args.steps, cpu)
            rows.append(row)
            return row

        for clients in levels:
            for mode in MODES:
                measure(mode, "closed", clients, lambda r, c=clients: r.closed(c, args.seconds))
        capacity = next(r["req_per_s"] for r in rows if r["mode"] == "off" and r["level"] == 8)
        rate = args.rate or 0.9 * capacity
        arrivals = poisson_arrivals(rate, args.open_requests, seed=0)
        for mode in MODES:
            measure(mode, "open", rate, lambda r: r.open(arrivals))
        hit_rates = {mode: _encoder_hit_rate(stack.ports.metrics["encoder"]) for mode, stack in stacks.items()}
        decode_batches = {mode: _decode_batch_size(stack.ports.metrics["vae"]) for mode, stack in stacks.items()}
    finally:
        for stack in stacks.values():
            stack.stop()

    def pick(mode: str, load: str, level: float | None = None) -> dict:
        return next(
            r for r in rows if r["mode"] == mode and r["load"] == load and (level is None or r["level"] == level)
        )

    off8 = pick("off", "closed", 8)["req_per_s"]
    continuous8 = pick("continuous", "closed", 8)["req_per_s"]
    continuous = continuous8 / off8
    p99 = pick("continuous", "open")["latency_p99_s"] / pick("off", "open")["latency_p99_s"]
    summary = {
        # what the ratios divide: requests served per second at 8 clients, each mode
        "req_per_s_8_clients": {mode: pick(mode, "closed", 8)["req_per_s"] for mode in MODES},
        # and the CPU each process spent per request there, against the reference's per output (the bound)
        "cpu_ms_per_request_8_clients": {mode: pick(mode, "closed", 8)["cpu_ms_per_request"] for mode in MODES},
        "throughput_ratio_dynamic": pick("dynamic", "closed", 8)["req_per_s"] / off8,
        "throughput_ratio_continuous": continuous,
        "in_process_bound": bound,
        "fraction_of_bound": continuous / bound["throughput_ratio"],
        # The same bound in absolute terms: continuous req/s at 8 clients over the in-process batch's
        # outputs/s. fraction_of_bound divides two ratios whose batch-1 sides can differ (the services'
        # off mode overlaps one request's decode with the next one's denoising; one in-process call cannot).
        "fraction_of_batched_throughput": continuous8 * bound[f"batch{BOUND_BATCH}_s"] / BOUND_BATCH,
        "p99_ratio_continuous": p99,
        "open_loop_rate": rate,
        "encoder_cache_hit_rate": hit_rates,
        "vae_batch_size": decode_batches,
        # what joining decodes saves of a batch-1 request's time, and what it changes
        "vae_coalescing": {**decoding, "saved_fraction_of_request": saved_s / bound["batch1_s"]},
        "errors": sum(r["errors"] for r in rows),
        "targets": TARGETS,
    }
    summary["targets_met"] = {
        "throughput_ratio_continuous": continuous >= TARGETS["throughput_ratio_continuous"],
        "fraction_of_bound": summary["fraction_of_bound"] >= TARGETS["fraction_of_bound"],
        "p99_ratio_continuous": p99 <= TARGETS["p99_ratio_continuous"],
    }
    config = {
        **settings,
        "steps": args.steps,
        "concurrency": levels,
        "seconds": args.seconds,
        "open_requests": args.open_requests,
        "max_batch_size": args.max_batch_size,
    }
    return result_document("serving", str(args.model), config, rows, summary)

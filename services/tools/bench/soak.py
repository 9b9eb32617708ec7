"""`ditserve bench soak`: mixed valid and invalid traffic while stages are killed and restarted.

Every request must end, within its deadline plus a margin, with an image or a gRPC status: `hung`
counts those that did not end in time and `lost` those that never reported at all (both must be 0).
RSS of every service is read after warm-up and at the end.
"""

from __future__ import annotations

import argparse
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ditserve.client.config import STAGES, add_model_argument
from ditserve.services.tools.bench.common import result_document

PROMPT = "a red circle on a blue background"
BAD = [
    {"width": 100},
    {"steps": 10_000},
    {"num_images": 99},
    {"guidance_scale": float("nan")},
    {"prompt": ""},
    {"cache": '{"dbcache": {"fn": 0}}'},
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long traffic runs (default: 60)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients (default: 8)")
    parser.add_argument("--invalid-fraction", type=float, default=0.2)
    parser.add_argument("--kill-every", type=float, default=15.0, help="seconds between stage kills (0: none)")
    parser.add_argument("--timeout", type=float, default=30.0, help="each request's deadline in seconds")
    parser.add_argument(
        "--max-queue", type=int, default=4, help="the denoiser's queue bound: more clients than this overload it"
    )


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(self, gateway: str, timeout: float, invalid_fraction: float) -> None:
        self.gateway = gateway
        self.timeout = timeout
        self.invalid_fraction = invalid_fraction
        self.lock = threading.Lock()
        self.started = 0
        self.outcomes: dict[str, int] = {}
        self.durations: list[float] = []
        self.refused_ms: list[float] = []

    def client(self, stop: threading.Event, seed: int) -> None:
        import grpc

        from ditserve.client.cli import cache_policy
        from ditserve.client.stub import PipelineClient

        rng = random.Random(seed)
        with PipelineClient(self.gateway) as client:
            while not stop.is_set():
                settings: dict[str, Any] = {"steps": rng.randint(2, 8), "seed": rng.randint(0, 2**31)}
                prompt = PROMPT
                if rng.random() < self.invalid_fraction:
                    bad = dict(rng.choice(BAD))
                    prompt = bad.pop("prompt", PROMPT)
                    if "cache" in bad:
                        bad["cache"] = cache_policy(bad["cache"])
                    settings.update(bad)
                with self.lock:
                    self.started += 1
                began = time.monotonic()
                try:
                    client.generate(prompt, timeout=self.timeout, **settings)
                    outcome = "OK"
                except grpc.RpcError as error:
                    outcome = error.code().name
                    if error.code() is grpc.StatusCode.UNAVAILABLE:
                        time.sleep(0.2)  # a client backs off while a stage restarts
                with self.lock:
                    self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
                    self.durations.append(time.monotonic() - began)
                    if outcome == "RESOURCE_EXHAUSTED":
                        self.refused_ms.append((time.monotonic() - began) * 1000)


def _p99(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ditserve.client.launcher import Ports, Stack

    stack = Stack(model=Path(args.model), ports=Ports.free())
    stack.extra_args = {
        "denoiser": ["--batching", "continuous", "--max-batch-size", "4", "--max-queue", str(args.max_queue)]
    }
    stack.start()
    soak = Soak(stack.gateway, args.timeout, args.invalid_fraction)
    stop = threading.Event()
    kills: list[dict[str, Any]] = []
    rss: dict[str, dict[str, float]] = {}
    try:
        threads = [threading.Thread(target=soak.client, args=(stop, i)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        time.sleep(min(5.0, args.seconds / 4))  # warm-up before the first RSS reading
        rss = {role: {"after_warmup_mb": _rss_mb(p.pid)} for role, p in stack.processes.items()}
        end = time.monotonic() + args.seconds
        rng = random.Random(0)
        next_kill = time.monotonic() + args.kill_every if args.kill_every else float("inf")
        while time.monotonic() < end:
            if time.monotonic() >= next_kill:
                role = rng.choice(STAGES)
                stack.processes[role].send_signal(signal.SIGKILL)
                stack.processes[role].wait()
                time.sleep(1.0)
                stack.start_role(role)
                stack.wait_ready(role, 120)
                kills.append({"role": role, "at_s": round(args.seconds - (end - time.monotonic()), 1)})
                rss[role]["after_warmup_mb"] = None  # a restarted process has no comparable baseline
                next_kill = time.monotonic() + args.kill_every
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(timeout=args.timeout + 10)
        for role, process in stack.processes.items():
            rss[role]["end_mb"] = _rss_mb(process.pid)
    finally:
        stop.set()
        stack.stop()
    ended = sum(soak.outcomes.values())
    growth = [r["end_mb"] - r["after_warmup_mb"] for r in rss.values() if r["after_warmup_mb"] is not None]
    summary = {
        "requests": soak.started,
        "succeeded": soak.outcomes.get("OK", 0),
        "failed_with_status": ended - soak.outcomes.get("OK", 0),
        "hung": sum(d > args.timeout + 5 for d in soak.durations),
        "lost": soak.started - ended,
        "rss_growth_mb": max(growth) if growth else None,
        "refused_ms_p99": _p99(soak.refused_ms),
    }
    keys = ("seconds", "clients", "invalid_fraction", "kill_every", "timeout", "max_queue")
    config = {key: getattr(args, key) for key in keys}
    rows = [{"outcomes": soak.outcomes, "kills": kills, "rss": rss}]
    return result_document("soak", str(args.model), config, rows, summary)

"""`ditserve bench real_scale`: the four services at a published model's full size, on one device.

What bench/gpu_real_scale.sh runs on a GPU (FLUX.1-dev shapes, 1024x1024, 28 steps, bf16) and the suite
runs on a CPU with the tiny preset, so the script cannot rot. On a `make-model --random-weights` folder
(weights random, seeded: the services and the in-process pipeline hold the same ones), in order, each
section skipped once --budget-s is spent:
  a. the four services against FluxPipeline in-process: seconds per image, overhead ratio, identical pixels;
  f. device memory per service (its ditserve_device_memory_bytes: CUDA allocated/reserved, host RSS);
  d. step caching through the services: whole-step caching computing 8 steps, DBCache F8B0;
  e. continuous batching at --batch-size px: images per second with 1, 4 and 8 concurrent clients;
  b. one denoising step (both CFG branches as configured) per attention backend, in process;
  c. that step with --compile off/on and --quantize off/on (fp8 on CUDA sm89+, int8-weight elsewhere);
then, with what is left of the budget, --wan-preset (Wan2.1-T2V-1.3B, 480x832 x 33 frames, --wan-steps):
  g. its four services against WanPipeline in-process: seconds per video, overhead ratio, identical frames;
  h. its denoising step per attention backend, in process.
Every size is written into the preset folder's defaults, so the services, the in-process pipeline and the
step rows run one request shape. Random weights time the shapes; they never stand for image quality.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ditserve.services.tools.bench.common import result_document

log = logging.getLogger(__name__)
PROMPT = "a red circle on a blue background"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="flux.1-dev", help="a make-model preset of the FLUX family")
    parser.add_argument("--folder", type=Path, default=None, help="where the preset is written (default: a temp dir)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--size", type=int, default=1024, help="(a, d) image side in pixels")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=512, help="(e) image side for the batching run")
    parser.add_argument("--clients", default="1,4,8", help="(e) concurrent clients")
    parser.add_argument("--repeats", type=int, default=2, help="timed images per measurement after a warm-up")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the sections left after this long")
    parser.add_argument("--no-compile", action="store_true", help="(c) leave out the compiled rows (slow on CPU)")
    parser.add_argument("--wan-preset", default="wan2.1-t2v-1.3b", help="(g, h) a Wan make-model preset; '' skips")
    parser.add_argument("--wan-size", default="480x832", help="(g, h) HEIGHTxWIDTH of the clip")
    parser.add_argument("--wan-frames", type=int, default=33, help="(g, h) frames per clip")
    parser.add_argument(
        "--wan-steps", type=int, default=10, help="(g) steps per clip: the overhead is per step, 10 fit the budget"
    )


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _timed(repeats: int, call: Any) -> tuple[float, Any]:
    """A warm-up call, then the median seconds of `repeats` calls and the last result."""
    result = call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _preset_folder(name: str, path: Path, **defaults: int) -> Any:
    """The preset written to `path` with `defaults` (height, width, steps, num_frames) as its request defaults."""
    from ditserve.services.common.model import SIDECAR, ModelFolder
    from ditserve.services.tools.modelgen.presets import write_preset

    write_preset(name, path)
    sidecar = json.loads((path / SIDECAR).read_text())
    sidecar.update({f"default_{key}": value for key, value in defaults.items()})
    (path / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return ModelFolder(path)


def _in_process_pipeline(folder: Any, device: Any, dtype: Any) -> Any:
    """The folder's diffusers pipeline from its components, random weights seeded as the services seed them."""
    import diffusers

    parts = [name for name, entry in folder.index.items() if not name.startswith("_") and entry and entry[0]]
    return getattr(diffusers, folder.index["_class_name"])(**{name: folder.load(name, device, dtype) for name in parts})


def _served_vs_in_process(
    client: Any, folder: Any, device: Any, dtype: Any, repeats: int, section: Any, name: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The services' request at the folder's defaults, then (budget allowing) the family's pipeline in-process
    doing the same work: seconds per output each, overhead ratio, identical pixels."""
    from ditserve.services.families import family_name
    from ditserve.services.tools.bench.reference import REFERENCES

    reference_class = REFERENCES[family_name(folder)]
    settings = reference_class.served_settings(folder.defaults, folder.defaults.steps)
    served_s, served = _timed(repeats, lambda: client.generate(PROMPT, seed=1, **settings))
    rows = [{"section": name, "what": "four services", "seconds_per_image": served_s}]
    summary: dict[str, Any] = {}
    if section(f"{name}: in-process"):
        pipe = _in_process_pipeline(folder, device, dtype)
        reference = reference_class(folder.path, folder.defaults.steps, pipe=pipe)
        local_s, local = _timed(repeats, lambda: reference(PROMPT, seed=1))
        del reference, pipe
        served_pixels = reference_class.served(served)
        rows.append(
            {"section": name, "what": f"{reference_class.pipeline_class} in-process", "seconds_per_image": local_s}
        )
        summary["overhead_ratio"] = served_s / local_s
        summary["identical_outputs"] = bool(np.array_equal(local, served_pixels))
        summary["max_abs_pixel_diff"] = int(np.abs(local.astype(int) - served_pixels.astype(int)).max())
    return rows, summary


def _memory(port: int) -> dict[str, float]:
    """A service's ditserve_device_memory_bytes by kind (cuda_allocated, cuda_reserved, host_rss)."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.findall(r'^ditserve_device_memory_bytes\{kind="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {kind: float(value) for kind, value in found}


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _cache_policies(steps: int, blocks: int) -> dict[str, str]:
    """Whole-step caching (DBCache Fn 0 Bn 0, a static mask computing k = 8 steps spread evenly) and DBCache
    F8B0; k and Fn shrink for a tiny preset's few steps and blocks."""
    computed = min(8, steps // 2)
    bins = min(computed, steps - computed)
    scm = {"compute_bins": _split(computed, bins), "cache_bins": _split(steps - computed, bins), "policy": "static"}
    fn = min(8, blocks - 1)
    return {
        f"whole-step k={computed}": json.dumps({"dbcache": {"fn": 0, "bn": 0, "scm": scm}}),
        f"dbcache F{fn}B0": json.dumps({"dbcache": {"fn": fn, "bn": 0}}),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ditserve.client import PipelineClient
    from ditserve.client.cache_policy import parse_cache_policy
    from ditserve.services.common.device import dtype_name, resolve_device, resolve_dtype

    budget = Budget(args.budget_s)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    work = Path(tempfile.mkdtemp(prefix="real-scale-"))
    size = {"height": args.size, "width": args.size}
    folder = _preset_folder(args.preset, args.folder or work / args.preset, **size, steps=args.steps)
    device_flags = ["--device", str(device), "--dtype", dtype_name(dtype)]
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"skipped": []}

    def section(name: str) -> bool:
        if budget.left() > 0:
            log.info("section %s (%.0f s left)", name, budget.left())
            return True
        summary["skipped"].append(name)
        return False

    stack = _stack(folder, device_flags, work / "logs")
    try:
        client = PipelineClient(stack.gateway)
        served_rows, served_summary = _served_vs_in_process(client, folder, device, dtype, args.repeats, section, "a")
        rows += served_rows
        summary.update(served_summary)
        served_s = served_rows[0]["seconds_per_image"]
        if section("f"):
            roles = ("encoder", "denoiser", "vae")
            summary["memory_bytes"] = {role: _memory(stack.ports.metrics[role]) for role in roles}
        transformer = folder.config("transformer")
        blocks = transformer["num_layers"] + transformer["num_single_layers"]
        for name, text in _cache_policies(args.steps, blocks).items():
            if not section(f"d: {name}"):
                continue
            cache = parse_cache_policy(text)
            seconds, _ = _timed(
                args.repeats, lambda cache=cache: client.generate(PROMPT, steps=args.steps, seed=1, cache=cache, **size)
            )
            rows.append({"section": "d", "what": name, "seconds_per_image": seconds, "speedup": served_s / seconds})
        client.close()
        if section("e"):
            batching = [*device_flags, "--batching", "continuous", "--max-batch-size", "8"]
            stack.restart_role("denoiser", batching, timeout=600)
            stack.restart_role("gateway")
            for clients in (int(n) for n in args.clients.split(",")):
                rows.append({"section": "e", **_throughput(stack.gateway, clients, args.batch_size, args.steps)})
    finally:
        stack.stop()
    step_seconds = StepTimer(folder, device, dtype, args.repeats)
    _attention_rows(rows, section, "b", step_seconds)
    _optimize_rows(rows, section, args.no_compile, step_seconds)
    if args.wan_preset and section("g"):
        _wan_sections(args, section, work, device, dtype, rows, summary)
    config = {
        "preset": args.preset,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "size": args.size,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "weights": "random (timing and memory only)",
        "wan": {"preset": args.wan_preset, "size": args.wan_size, "frames": args.wan_frames, "steps": args.wan_steps},
    }
    return result_document("real_scale", args.preset, config, rows, summary)


def _wan_sections(
    args: argparse.Namespace, section: Any, work: Path, device: Any, dtype: Any, rows: list, summary: dict[str, Any]
) -> None:
    """(g, h) on the Wan preset at --wan-size x --wan-frames, on the device and dtype of the FLUX rows."""
    from ditserve.client import PipelineClient
    from ditserve.services.common.device import dtype_name

    height, width = (int(side) for side in args.wan_size.split("x"))
    clip = {"height": height, "width": width, "num_frames": args.wan_frames, "steps": args.wan_steps}
    wan = _preset_folder(args.wan_preset, work / args.wan_preset, **clip)
    stack = _stack(wan, ["--device", str(device), "--dtype", dtype_name(dtype)], work / "wan-logs")
    try:
        with PipelineClient(stack.gateway) as client:
            wan_rows, summary["wan"] = _served_vs_in_process(client, wan, device, dtype, args.repeats, section, "g")
    finally:
        stack.stop()
    rows += wan_rows
    _attention_rows(rows, section, "h", StepTimer(wan, device, dtype, args.repeats))


def _throughput(gateway: str, clients: int, side: int, steps: int) -> dict[str, Any]:
    """`clients` threads, each one image at side x side, at once: images per second over the whole run."""
    from ditserve.client import PipelineClient

    errors: list[BaseException] = []

    def one(seed: int) -> None:
        try:
            with PipelineClient(gateway) as client:
                client.generate(PROMPT, steps=steps, seed=seed, height=side, width=side)
        except BaseException as error:  # reported in the row, never hidden
            errors.append(error)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"what": f"continuous batching, {clients} clients", "clients": clients, "seconds": seconds}
    row["images_per_second"] = clients / seconds
    if errors:
        row["errors"] = [repr(error) for error in errors]
    return row


def _stack(folder: Any, device_flags: list[str], log_dir: Path) -> Any:
    """The four services on free loopback ports, SERVING."""
    from ditserve.client.launcher import Ports, Stack

    roles = ("encoder", "denoiser", "vae")
    stack = Stack(folder.path, Ports.free(), log_dir=log_dir, extra_args={role: list(device_flags) for role in roles})
    stack.start(timeout=600)
    return stack


@dataclass(frozen=True)
class StepTimer:
    """One step at the folder's default request through an in-process denoiser runtime: median seconds."""

    folder: Any
    device: Any
    dtype: Any
    repeats: int

    def __call__(self, options: Any) -> float:
        import torch

        from ditserve.services.common.stage import StageContext
        from ditserve.services.denoiser.compile import warm_up
        from ditserve.services.denoiser.runtime import build_runtime

        stage = StageContext(role="denoiser", folder=self.folder, device=self.device, dtype=self.dtype)
        runtime = build_runtime(stage, options)
        try:
            args_ = (runtime.family, runtime.runner.executor.transformer, runtime.runner, stage.limits, (1,))
            times = [warm_up(*args_) for _ in range(self.repeats + 1)][1:]
        finally:
            runtime.close()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return statistics.median(times)


def _attention_rows(rows: list, section: Any, name: str, step_seconds: StepTimer) -> None:
    """(b, h) the step per attention backend that can run here."""
    from ditserve.services.denoiser.attention import available_backends
    from ditserve.services.denoiser.runtime import DenoiserOptions

    head_dim = step_seconds.folder.config("transformer")["attention_head_dim"]
    for backend_name, reason in available_backends(step_seconds.device, step_seconds.dtype, head_dim).items():
        backend = backend_name.value  # sdpa_math: the reference kernel, 27-30x slower on GPUs
        if reason is not None or backend == "sdpa_math" or not section(f"{name}: {backend}"):
            continue
        seconds = step_seconds(DenoiserOptions(attention_backend=backend))
        rows.append({"section": name, "what": f"attention {backend}", "step_seconds": seconds})


def _optimize_rows(rows: list, section: Any, no_compile: bool, step_seconds: StepTimer) -> None:
    """(c) the step with --compile off/on and --quantize off/on (fp8 on CUDA sm89+, int8-weight elsewhere)."""
    import torch

    from ditserve.services.denoiser.runtime import DenoiserOptions

    device = step_seconds.device
    quantize = "fp8" if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) else "int8-weight"
    for name, options in (
        ("eager", DenoiserOptions()),
        ("compile", DenoiserOptions(compile=True)),
        (quantize, DenoiserOptions(quantize=quantize)),
        (f"{quantize}+compile", DenoiserOptions(quantize=quantize, compile=True)),
    ):
        if options.compile and no_compile:
            continue
        if section(f"c: {name}"):
            rows.append({"section": "c", "what": name, "step_seconds": step_seconds(options)})

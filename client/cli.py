"""The `ditserve` command: serve, up, demo, generate, info, make-tiny-model, bench.

Imports no torch at module level, so `ditserve generate` stays light; server
commands import the server side only when they run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

import grpc

from ditserve.client.config import (
    DEFAULT_HTTP_PORT,
    DEFAULT_PORTS,
    JOINT_CFG_CHOICES,
    QUANTIZE_CHOICES,
    add_model_argument,
    missing_model_hint,
    services_openmp,
)
from ditserve.client.options import Parser, expand_config, rpc_error_line, token_default

ROLES = ("gateway", "encoder", "denoiser", "vae")
BENCHES = ("transport", "attention", "serving", "sp", "soak", "cache", "fidelity", "optimize", "real_scale")
# services/tools/modelgen/presets.py PRESETS, named here so the parser needs no torch.
MODEL_PRESETS = ("flux.1-dev", "flux.1-schnell", "wan2.1-t2v-1.3b", "tiny-flux", "tiny-wan")


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        default="out.png",
        help="image or video path (a video family writes .mp4 or .webp by its suffix); several get _N suffixes",
    )
    parser.add_argument("--negative-prompt", default="", help="used with --true-cfg-scale > 1")
    parser.add_argument("--width", type=int, default=0, help="pixels, multiple of 16 (default: the model's)")
    parser.add_argument("--height", type=int, default=0, help="pixels, multiple of 16 (default: the model's)")
    parser.add_argument(
        "--steps",
        "--num-inference-steps",
        dest="steps",
        type=int,
        default=0,
        help="denoising steps (default: the model's)",
    )
    parser.add_argument("--guidance-scale", type=float, default=None, help="distilled guidance (FLUX.1-dev)")
    parser.add_argument("--true-cfg-scale", type=float, default=None, help="true CFG scale; > 1 also runs the negative")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed after the run")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument(
        "--frames",
        "--num-frames",
        dest="frames",
        type=int,
        default=0,
        help="video families: clip length, tk+1 for the VAE's temporal compression t (Wan2.1: 4k+1)",
    )
    parser.add_argument("--fps", type=float, default=0.0, help="video families: frames per second")
    parser.add_argument("--format", default="png", choices=["png", "jpeg", "webp", "raw"])
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline for the whole request, seconds")
    parser.add_argument("--profile-steps", type=int, default=0, help="trace the first N denoise steps on the denoiser")
    parser.add_argument(
        "--cache-policy",
        default=None,
        help="step caching: none, teacache, dbcache, or a CachePolicy as JSON, e.g."
        ' \'{"teacache": {"threshold": 0.4}}\' (default: the denoiser\'s)',
    )


def cache_policy(text: str | None) -> object:
    """--cache-policy's shorthand or JSON as a CachePolicy message (None: the denoiser's default)."""
    if text is None:
        return None
    from ditserve.client.cache_policy import parse_cache_policy

    try:
        return parse_cache_policy(text)
    except ValueError as error:
        raise SystemExit(f"--cache-policy: {error}") from None


VIDEO_SUFFIXES = {".mp4": "mp4", ".webp": "webp"}


def _generate(client: object, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    bar = tqdm(desc="denoise", unit="step", leave=True)

    def on_progress(progress: object) -> None:
        if progress.stage == "denoise":
            bar.total = progress.total_steps
            bar.update(progress.step - bar.n)
        else:
            bar.set_postfix_str(f"{progress.stage} done")

    try:
        output = client.generate(
            args.prompt,
            timeout=args.timeout,
            on_progress=on_progress,
            negative_prompt=args.negative_prompt,
            width=args.width,
            height=args.height,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            true_cfg_scale=args.true_cfg_scale,
            seed=args.seed,
            num_images=args.num_images,
            output_format=args.format,
            profile_steps=args.profile_steps,
            cache=cache_policy(args.cache_policy),
            num_frames=args.frames,
            fps=args.fps,
            video_format=VIDEO_SUFFIXES.get(Path(args.output).suffix.lower(), "mp4"),
        )
    except grpc.RpcError as error:
        bar.close()
        print(rpc_error_line("generate", getattr(args, "target", "the gateway"), error), file=sys.stderr)
        return 1
    bar.close()
    target = Path(args.output)
    target.parent.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(output.images):
        path = target if len(output.images) == 1 else target.with_stem(f"{target.stem}_{index}")
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})")
    for index, video in enumerate(output.encoded_videos):
        path = target if len(output.encoded_videos) == 1 else target.with_stem(f"{target.stem}_{index}")
        path.write_bytes(video.data)
        print(f"wrote {path} ({video.num_frames} frames of {video.width}x{video.height} at {video.fps:g} fps)")
    stages = ", ".join(f"{name} {ms:.0f} ms" for name, ms in output.timing.stage_ms.items())
    print(f"seed {output.seed}; total {output.timing.total_ms:.0f} ms ({stages})")
    for branch, steps in output.timing.computed_steps.items():
        print(f"{branch}: computed {steps.count('1')}/{len(steps)} steps ({steps})")
    if output.profile_trace:
        print(f"denoiser trace: {output.profile_trace}")
    return 0


def _security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument("--tls-ca", help="PEM CA to trust: connect over TLS")
    group.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    group.add_argument("--tls-key", help="PEM private key of --tls-cert")
    group.add_argument(
        "--token",
        default=token_default(),
        help="bearer token (default: $DITSERVE_TOKEN, else the file $DITSERVE_TOKEN_FILE names)",
    )
    group.add_argument("--token-file", help="file whose first line is the bearer token (keeps it out of `ps`)")


def _security(args: argparse.Namespace) -> object:
    from ditserve.client.security import ClientSecurity, token_from_file

    token = token_from_file(args.token_file) if args.token_file else args.token
    return ClientSecurity(args.tls_ca, args.tls_cert, args.tls_key, token)


def cmd_generate(args: argparse.Namespace) -> int:
    from ditserve.client.stub import PipelineClient

    with PipelineClient(args.target, security=_security(args)) as client:
        if args.wait_ready:
            client.wait_ready(args.wait_ready)
        return _generate(client, args)


def cmd_serve(args: argparse.Namespace) -> int:
    os.environ.update(services_openmp(os.environ, args.role))  # before torch loads OpenMP
    from ditserve.services.serve import run

    return run(args.role, args)


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    # Wake up now and then: a signal delivered to another thread runs its Python handler only once
    # the main thread runs bytecode, and a bare wait() may never return to let it.
    while not stop.wait(timeout=0.25):
        pass


# `up`'s denoiser flags that take a value, passed on as given; unset ones leave the denoiser's own default.
DENOISER_PASSTHROUGH = (
    "batching",
    "max_batch_size",
    "attention_backend",
    "attention_benchmark",
    "cache_policy",
    "quantize",
    "joint_cfg",
    "sp_ulysses",
    "sp_ring",
)


def _stack(args: argparse.Namespace) -> object:
    from ditserve.client.launcher import Ports, Stack

    ports = Ports.free() if getattr(args, "free_ports", False) else Ports.defaults()
    if getattr(args, "http_port", None) is not None:
        ports.http = args.http_port
    if getattr(args, "no_http", False):
        ports.http = None
    extra = {role: ["--device", args.device, "--dtype", args.dtype] for role in ("encoder", "denoiser", "vae")}
    for flag in DENOISER_PASSTHROUGH:
        value = getattr(args, flag, None)
        if value is not None:
            extra["denoiser"] += ["--" + flag.replace("_", "-"), str(value)]
    if getattr(args, "compile", False):
        extra["denoiser"].append("--compile")
    return Stack(model=Path(args.model), ports=ports, host=args.host, extra_args=extra)


def _check_can_serve(command: str, model: str) -> None:
    """Before starting four processes: the server extra is installed and the model folder is there."""
    import importlib.util

    missing = [name for name in ("torch", "diffusers", "fastapi") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"ditserve {command}: needs the server extra (pip install 'ditserve[serve]'): missing {', '.join(missing)}"
        )
    hint = missing_model_hint(Path(model))
    if hint:
        raise SystemExit(f"ditserve {command}: {hint}")


def cmd_up(args: argparse.Namespace) -> int:
    _check_can_serve("up", args.model)
    stack = _stack(args)
    print("starting encoder, denoiser, vae, then gateway ...", flush=True)
    stack.start(timeout=args.start_timeout)
    for role in ROLES:
        print(f"  {role:9s} grpc {stack.ports.address(role, args.host)}  metrics :{stack.ports.metrics[role]}")
    if stack.http_base:
        print(f"  {'http':9s} {stack.http_base} (OpenAI-compatible: POST /v1/images/generations)")
    print(f"ready: ditserve generate 'a red circle on a blue background' --target {stack.gateway}", flush=True)
    _wait_for_interrupt()
    print("stopping ...", flush=True)
    stack.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ditserve.client.stub import PipelineClient

    args.free_ports = True
    _check_can_serve("demo", args.model)
    stack = _stack(args)
    stack.log_dir = Path(args.output).parent / "logs"
    print(f"starting the four services on free loopback ports (logs in {stack.log_dir}) ...", flush=True)
    stack.start(timeout=args.start_timeout)
    try:
        with PipelineClient(stack.gateway) as client:
            return _generate(client, args)
    finally:
        stack.stop()


def cmd_info(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToJson

    from ditserve.client.stub import StageClient
    from ditserve.v1 import common_pb2

    client = StageClient(args.target, security=_security(args))
    try:
        print(MessageToJson(client.admin.Info(common_pb2.InfoRequest(), timeout=10)))
    finally:
        client.close()
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from ditserve.client.stub import StageClient
    from ditserve.v1 import common_pb2

    client = StageClient(args.target, security=_security(args))
    try:
        if args.action == "start":
            request = common_pb2.StartProfileRequest(name=args.name, record_shapes=True, with_stack=args.with_stack)
            status = client.admin.StartProfile(request, timeout=30)
            print(f"profiling {args.target}; trace will be {status.trace_path}")
        else:
            status = client.admin.StopProfile(common_pb2.StopProfileRequest(), timeout=120)
            print(f"wrote {status.trace_path} (open it in https://ui.perfetto.dev)")
    except grpc.RpcError as error:
        print(f"ditserve profile {args.action}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    if args.family == "wan":
        from ditserve.services.tools.modelgen.tiny_wan import write_tiny_wan as write
    else:
        from ditserve.services.tools.modelgen.tiny_flux import write_tiny_flux as write

    path = write(Path(args.dir), seed=args.seed)
    print(f"wrote a tiny {args.family} model (random weights: its outputs are noise) to {path}")
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from ditserve.services.tools.modelgen.presets import write_preset

    path = write_preset(args.preset, Path(args.random_weights))
    print(
        f"wrote {args.preset} to {path}: configs only; each service builds RANDOM weights at load time"
        " (for timing and memory, never image quality)"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ditserve.services.tools.training import train

    return train.run(args)


def _add_calibration_arguments(parser: argparse.ArgumentParser, prompts_help: str) -> None:
    add_model_argument(parser, "; written: its ditserve.json")
    parser.add_argument("--prompts", type=int, default=4, help=prompts_help)
    parser.add_argument(
        "--prompt-file",
        help="calibrate on prompts like yours: one per line, optionally 'SEED<TAB>PROMPT' (default, for a model"
        " whose ditserve.json names its prompt_vocabulary only: --prompts of that vocabulary's prompts)",
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])


def _calibration_prompts(args: argparse.Namespace) -> list:
    from ditserve.services.tools.calibrate import calibrate_prompts

    return calibrate_prompts(args.model, args.prompt_file, args.prompts)


def cmd_calibrate_teacache(args: argparse.Namespace) -> int:
    from ditserve.services.tools.calibrate import calibrate_teacache

    coefficients = calibrate_teacache(args.model, _calibration_prompts(args), args.steps, args.device, args.dtype)
    print(f"stored teacache_coefficients {list(coefficients)} in {Path(args.model) / 'ditserve.json'}")
    return 0


def cmd_calibrate_step_mask(args: argparse.Namespace) -> int:
    from ditserve.services.denoiser.cache.step_masks import mask_text
    from ditserve.services.tools.calibrate import calibrate_step_masks, snr_db

    try:
        found = calibrate_step_masks(
            args.model,
            _calibration_prompts(args),
            args.steps,
            args.fewest,
            args.order,
            args.objective,
            args.device,
            args.dtype,
        )
    except ValueError as error:
        raise SystemExit(f"calibrate step-mask: {error}") from None
    for computed, searched in sorted(found.items()):
        snr = snr_db(searched.error)
        print(f"{computed:3d} computed  {mask_text(searched.mask)}  latent SNR of the objective {snr:5.1f} dB")
    print(f"stored step_masks in {Path(args.model) / 'ditserve.json'}")
    return 0


def cmd_eval_fidelity(args: argparse.Namespace) -> int:
    from ditserve.services.tools.eval import command

    return command.run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    from ditserve.services.tools.bench.common import write_result

    module = importlib.import_module(f"ditserve.services.tools.bench.{args.bench}")
    document = module.run(args)
    # what `ditserve bench report` prints beside the figure: the command that made it
    document = {"bench": document["bench"], "command": shlex.join(["ditserve", *args.argv]), **document}
    path = write_result(args.out, document)
    print(f"wrote {path}")
    failures = document["summary"].get("failures") or []  # a comparison that is not valid fails the bench
    for failure in failures:
        print(f"bench {args.bench} failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def cmd_bench_report(args: argparse.Namespace) -> int:
    from ditserve.services.tools.bench import report

    return report.command(args)


def _stack_arguments(parser: argparse.ArgumentParser, up: bool = False) -> None:
    add_model_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address of all four services")
    parser.add_argument("--device", default="auto", help="device of the model stages")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="model stages' dtype")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for SERVING")
    if not up:
        return
    parser.add_argument("--free-ports", action="store_true", help="free loopback ports instead of the defaults")
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help=f"gateway's OpenAI-compatible HTTP port (default: {DEFAULT_HTTP_PORT})",
    )
    parser.add_argument("--no-http", action="store_true", help="gRPC only")
    group = parser.add_argument_group("denoiser (passed to `ditserve serve denoiser`; default: its own)")
    group.add_argument("--batching", choices=["off", "dynamic", "continuous"], default=None, help="batching mode")
    group.add_argument("--max-batch-size", type=int, default=None, help="requests per batch")
    group.add_argument(
        "--joint-cfg",
        choices=JOINT_CFG_CHOICES,
        default=None,
        help="always: a true-CFG request alone runs both branches in one call (faster, not bit-exact)",
    )
    group.add_argument("--attention-backend", default=None, help="auto, torch_sdpa, sdpa_cudnn, fa, ...")
    group.add_argument(
        "--attention-benchmark",
        choices=["auto", "on", "off"],
        default=None,
        help="how `auto` picks: times the backends on the model's shape on CUDA (auto), anywhere (on), or rules (off)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer's repeated blocks, warmed up before SERVING (faster steps on a GPU)",
    )
    group.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None,
        help="the blocks' Linears through torchao: int8-weight (any device) or fp8 (CUDA sm89+); Info reports it",
    )
    group.add_argument("--cache-policy", default=None, help="default step caching: none, teacache, dbcache or JSON")
    group.add_argument("--sp-ulysses", "--ulysses-degree", dest="sp_ulysses", type=int, default=None, help="Ulysses SP")
    group.add_argument("--sp-ring", "--ring-degree", dest="sp_ring", type=int, default=None, help="ring SP degree")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """`argv` decides which benchmark's flags to load, so other commands never import torch."""
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(
        prog="ditserve",
        description="Serve diffusion transformers as gRPC microservices (encoder, denoiser, vae, gateway).",
    )
    from ditserve import __version__

    parser.add_argument("--version", action="version", version=f"ditserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run one service", description="Run one service until SIGTERM.")
    roles = serve.add_subparsers(dest="role", required=True, metavar="ROLE")
    for role in ROLES:
        grpc_port, metrics_port = DEFAULT_PORTS[role]
        sub = roles.add_parser(role, help=f"the {role} (gRPC :{grpc_port}, metrics :{metrics_port})")
        _add_serve_arguments(sub, role)
        sub.set_defaults(func=cmd_serve)

    up = commands.add_parser("up", help="run all four services locally; Ctrl-C stops them")
    _stack_arguments(up, up=True)
    up.set_defaults(func=cmd_up)

    demo = commands.add_parser("demo", help="start the stack on free ports, generate one image, stop")
    _stack_arguments(demo)
    demo.add_argument("--prompt", default="a red circle on a blue background")
    _add_generation_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    generate = commands.add_parser("generate", help="generate images through a running gateway")
    generate.add_argument("prompt")
    generate.add_argument("--target", default=f"127.0.0.1:{DEFAULT_PORTS['gateway'][0]}", help="gateway address")
    generate.add_argument("--wait-ready", type=float, default=0, help="first wait this many seconds for SERVING")
    _add_generation_arguments(generate)
    _security_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    info = commands.add_parser("info", help="print a service's Info (model, dtype, device, version)")
    info.add_argument("--target", default=f"127.0.0.1:{DEFAULT_PORTS['gateway'][0]}")
    _security_arguments(info)
    info.set_defaults(func=cmd_info)

    profile = commands.add_parser("profile", help="start or stop the torch profiler on a running service")
    profile.add_argument("action", choices=["start", "stop"])
    profile.add_argument("--target", required=True, help="HOST:PORT of any ditserve service")
    profile.add_argument("--name", default="", help="trace file stem (default: a timestamp)")
    profile.add_argument("--with-stack", action="store_true", help="record Python stacks (slower)")
    _security_arguments(profile)
    profile.set_defaults(func=cmd_profile)

    tiny = commands.add_parser(
        "make-tiny-model",
        help="write a deterministic tiny model of a family's architecture (random weights), in diffusers layout",
    )
    tiny.add_argument("dir", help="an absent or empty folder")
    tiny.add_argument("--family", choices=("flux", "wan"), default="flux", help="(default: flux)")
    tiny.add_argument("--seed", type=int, default=0, help="(default: 0)")
    tiny.set_defaults(func=cmd_make_tiny_model)

    make_model = commands.add_parser(
        "make-model",
        help="write a published architecture (FLUX.1-dev, FLUX.1-schnell, Wan2.1-T2V-1.3B) as a random-weights folder",
        description="Writes the preset's configs in diffusers layout with no weights; its ditserve.json marks it"
        " random_weights, so each service builds its components with random weights on its own device at load"
        " time. For timing and memory only: random weights never stand for image quality (Info says so).",
    )
    make_model.add_argument("--preset", required=True, choices=MODEL_PRESETS)
    make_model.add_argument("--random-weights", required=True, metavar="DIR", help="an absent or empty folder")
    make_model.set_defaults(func=cmd_make_model)

    train = commands.add_parser(
        "train-default-model",
        help="train a shipped shapes model (--family flux: images, wan: video) from a seed, resumable",
    )
    if argv[:1] == ["train-default-model"]:
        _add_module_arguments(train, "ditserve.services.tools.training.train")
    train.set_defaults(func=cmd_train)

    calibrate = commands.add_parser("calibrate", help="fit per-model constants and store them with the model")
    methods = calibrate.add_subparsers(dest="method", required=True, metavar="METHOD")
    teacache = methods.add_parser("teacache", help="fit TeaCache's rescale polynomial from a few prompts")
    _add_calibration_arguments(teacache, prompts_help="calibration prompts (default: 4)")
    teacache.set_defaults(func=cmd_calibrate_teacache)
    step_mask = methods.add_parser(
        "step-mask",
        help="search the steps a whole-step cache computes, for every count down to a fifth of the steps",
        description="Searches, on calibration prompts, which k steps whole-step caching (dbcache fn 0, bn 0,"
        " static mask) should compute, for every k from steps-1 down to --fewest, with TaylorSeer of --order"
        " forecasting the others (order 0: the last computed output reused), minimising the final latents'"
        " mean plus worst error; stores them as the model's step_masks, with the order. Requests then ask for"
        ' {"dbcache": {"fn": 0, "bn": 0, "taylorseer": {"order": 1},'
        ' "scm": {"preset": "calibrated", "computed_steps": K, "policy": "static"}}}'
        " (without taylorseer for order-0 masks). About 6 minutes for the default image model on 2 cores,"
        " 18 for the video model at --prompts 8; the search is deterministic.",
    )
    _add_calibration_arguments(step_mask, prompts_help="calibration prompts, 2 seeds each (default: 4)")
    step_mask.add_argument("--fewest", type=int, default=None, help="fewest computed steps (default: steps / 5)")
    step_mask.add_argument(
        "--order",
        type=int,
        default=1,
        choices=[0, 1, 2],
        help="TaylorSeer order the masks are searched for; 0: skipped steps reuse the last computed output"
        " (default: 1)",
    )
    step_mask.add_argument(
        "--objective",
        default="mean+worst",
        choices=["mean", "mean+worst"],
        help="what the search minimises over the prompts: the final latents' mean relative error, or that plus"
        " the worst prompt's, which keeps a mask from ruining a few prompts (default: mean+worst)",
    )
    step_mask.set_defaults(func=cmd_calibrate_step_mask)

    evaluate = commands.add_parser("eval", help="score images against their prompts")
    scorers = evaluate.add_subparsers(dest="scorer", required=True, metavar="SCORER")
    fidelity = scorers.add_parser("fidelity", help="colour, shape and background of shapes-model images")
    _add_module_arguments(fidelity, "ditserve.services.tools.eval.command")
    fidelity.set_defaults(func=cmd_eval_fidelity)

    bench = commands.add_parser("bench", help="benchmarks that write a JSON result file")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name in BENCHES:
        sub = benches.add_parser(name, help=f"the {name} benchmark")
        sub.add_argument("--out", required=True, help="result JSON path")
        if argv[:2] == ["bench", name]:
            _add_module_arguments(sub, f"ditserve.services.tools.bench.{name}")
        sub.set_defaults(func=cmd_bench)
    report = benches.add_parser("report", help="README's benchmark table from the result files (no torch)")
    _add_module_arguments(report, "ditserve.services.tools.bench.report")
    report.set_defaults(func=cmd_bench_report)
    return parser


def _add_serve_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    """Server flags live with the server code; without the [serve] extra, say so when it runs."""
    try:
        from ditserve.services.serve import add_arguments
    except ImportError as error:
        parser.set_defaults(missing_extra=str(error))
        return
    add_arguments(parser, role)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON mapping of these flags' names to values (flags given after it win)",
    )


def _add_module_arguments(parser: argparse.ArgumentParser, module_name: str) -> None:
    """Flags owned by a server-side module, loaded only when its command is the one run (torch)."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        parser.set_defaults(missing_extra=str(error))
        return
    module.add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv = expand_config(argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv
    if getattr(args, "missing_extra", None):
        raise SystemExit(
            f"ditserve {args.command}: needs the server extra (pip install 'ditserve[serve]'): {args.missing_extra}"
        )
    try:
        return args.func(args)
    except grpc.RpcError as error:  # one line with a hint, never a traceback
        raise SystemExit(rpc_error_line(args.command, getattr(args, "target", "?"), error)) from None


if __name__ == "__main__":
    sys.exit(main())

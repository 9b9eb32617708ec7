"""`ditserve serve ROLE`: builds one role from its flags and serves until SIGTERM."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ditserve.client.config import DEFAULT_PORTS, JOINT_CFG_CHOICES, QUANTIZE_CHOICES, add_model_argument
from ditserve.services.common import device as device_flags
from ditserve.services.common.errors import StartupError
from ditserve.services.common.limits import RequestLimits
from ditserve.services.common.security import ServerSecurity
from ditserve.services.common.server import ServerOptions, Service, serve_forever

ROLES = ("gateway", "encoder", "denoiser", "vae")


def add_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    grpc_port, metrics_port = DEFAULT_PORTS[role]
    ServerOptions.add_arguments(parser, grpc_port, metrics_port)
    ServerSecurity.add_arguments(parser)
    RequestLimits.add_arguments(parser)
    parser.add_argument("--profile-dir", type=Path, default=Path("profiles"), help="where profiler traces are written")
    if role == "gateway":
        group = parser.add_argument_group(
            "stages (a gRPC target each: dns:///NAME:PORT for every address a name resolves to, HOST:PORT, or"
            " comma-separated IP:PORTs; round_robin over SERVING replicas, UNAVAILABLE retried before a response)"
        )
        for stage in ("encoder", "denoiser", "vae"):
            group.add_argument(f"--{stage}", default=f"127.0.0.1:{DEFAULT_PORTS[stage][0]}", help=f"{stage} replica(s)")
        group.add_argument("--stage-timeout", type=float, default=600.0, help="per-stage deadline in seconds")
        group.add_argument("--stage-tls-ca", help="PEM CA that signed the stages' certificates: call them over TLS")
        group.add_argument("--stage-tls-cert", help="PEM client certificate for stages that require mutual TLS")
        group.add_argument("--stage-tls-key", help="PEM private key of --stage-tls-cert")
        group.add_argument("--stage-token-file", help="file whose first line is the bearer token for the stages")
        from ditserve.services.gateway.http import HttpOptions

        HttpOptions.add_arguments(parser)
        return
    add_model_argument(parser)
    device_flags.add_arguments(parser)
    parser.add_argument(
        "--allow-pickle", action="store_true", help="also load .bin weights (pickle runs code: trusted folders only)"
    )
    if role == "denoiser":
        parser.add_argument(
            "--attention-backend",
            default=None,
            help="auto, torch_sdpa, sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math, fa, sage_attn"
            " (default: $DITSERVE_ATTENTION_BACKEND, else auto)",
        )
        parser.add_argument(
            "--attention-benchmark",
            default="auto",
            choices=["auto", "on", "off"],
            help="how `auto` picks: auto times each exact backend on the model's attention shape on a CUDA"
            " device (fixed rules elsewhere); on times them on any device; off keeps the rules (default: auto)",
        )
        parser.add_argument(
            "--attention-cache",
            type=Path,
            default=None,
            help="JSON file remembering `auto`'s measured choice per GPU, torch version, backends and shape, so a"
            " restart does not measure again (default: $DITSERVE_ATTENTION_CACHE, else"
            " $XDG_CACHE_HOME/ditserve/attention-auto.json)",
        )
        parser.add_argument(
            "--cache-policy",
            default="none",
            help="default step caching for requests that name none: none, teacache, dbcache (their"
            ' defaults) or a CachePolicy as JSON, e.g. \'{"dbcache": {"residual_diff_threshold": 0.3}}\'',
        )
        parser.add_argument(
            "--progress-interval-ms",
            type=float,
            default=50.0,
            help="send step progress at most this often, the last step always (default: 50; 0: every step)."
            " Each message costs two hops: at 20 steps of a few ms they were 13%% of a request's latency",
        )
        parser.add_argument(
            "--compile",
            action="store_true",
            help="torch.compile each repeated transformer block (regional), warmed up at the default request"
            " before health says SERVING",
        )
        parser.add_argument(
            "--quantize",
            default="none",
            choices=QUANTIZE_CHOICES,
            help="the blocks' Linears through torchao: int8-weight (any device) or fp8 (dynamic, CUDA sm89+)",
        )
        group = parser.add_argument_group("batching")
        group.add_argument(
            "--batching",
            default="off",
            choices=["off", "dynamic", "continuous"],
            help="off: one request at a time (bit-exact with the pipeline unless --joint-cfg always);"
            " dynamic: request-level batches; continuous: requests join and leave the running batch at step"
            " boundaries",
        )
        group.add_argument("--max-batch-size", type=int, default=8, help="requests per batch (default: 8)")
        group.add_argument(
            "--batch-delay-ms",
            type=float,
            default=5.0,
            help="dynamic: wait this long for company (default: 5)",
        )
        group.add_argument("--max-batch-cost", type=int, default=None, help="image tokens x CFG per batch")
        group.add_argument(
            "--max-wait-steps", type=int, default=0, help="continuous: steps another shape waits at most"
        )
        group.add_argument("--max-queue", type=int, default=64, help="waiting requests before RESOURCE_EXHAUSTED")
        group.add_argument(
            "--joint-cfg",
            default="batched",
            choices=JOINT_CFG_CHOICES,
            help="batched: a batch of true-CFG requests runs both branches in one transformer call, a request"
            " alone one call per branch (bit-exact with the pipeline); always: a request alone takes one call"
            " too, ~30%% less denoising time on the shipped image model, its latents within ~1e-5 of the"
            " pipeline's (default: batched)",
        )
        group = parser.add_argument_group(
            "sequence parallelism (one image's tokens split over ulysses x ring processes, one GPU each;"
            " see docs/sequence-parallel.md)"
        )
        group.add_argument(
            "--sp-ulysses",
            "--ulysses-degree",
            dest="sp_ulysses",
            type=int,
            default=1,
            help="Ulysses degree: must divide the heads",
        )
        group.add_argument(
            "--sp-ring",
            "--ring-degree",
            dest="sp_ring",
            type=int,
            default=1,
            help="ring degree (> 1 needs torch_sdpa, sdpa_flash or sdpa_math)",
        )
        group.add_argument(
            "--sp-timeout",
            type=float,
            default=120.0,
            help="seconds a collective inside a call may wait for the other ranks before the group is declared"
            " broken (the denoiser then answers NOT_SERVING) (default: 120)",
        )
    if role == "encoder":
        parser.add_argument(
            "--embedding-cache-mb",
            type=float,
            default=256.0,
            help="keep recent prompts' embeddings, up to this many MiB, keyed by prompt, sequence length and"
            " encoder; the empty negative prompt stays (default: 256; 0: off)",
        )
    if role == "vae":
        parser.add_argument(
            "--vae-tiling",
            action="store_true",
            help="decode in overlapping spatial tiles (diffusers' enable_tiling): bounded memory at large sizes,"
            " pixels not identical to an untiled decode. Wan's VAE already decodes one latent frame at a time",
        )
        parser.add_argument(
            "--max-decode-batch",
            type=int,
            default=1,
            help="join concurrent decodes of the same shape into one VAE call of up to this many images or"
            " clips: fewer, larger calls (what that saves: vae_coalescing in `ditserve bench serving`), but a"
            " joined image can differ from its solo decode by one uint8 level"
            " in a few values, and peak memory grows with the batch (default: 1, only decodes of batched"
            " denoises join, under --batched-decode-batch)",
        )
        parser.add_argument(
            "--batched-decode-batch",
            type=int,
            default=8,
            help="join concurrent decodes of the same shape whose latents a batched denoise made (the"
            " denoiser's --batching dynamic or continuous; they already differ from a solo run's in the low"
            " bits) into one VAE call of up to this many; a request denoised alone still decodes alone,"
            " bit-exact with the pipeline (default: 8; 1: each alone)",
        )
        parser.add_argument(
            "--decode-wait-ms",
            type=float,
            default=8.0,
            help="for a decode that may join others, how long it waits for more of its shape to come; a"
            " decode that may not never waits (default: 8)",
        )


def _addresses(value: str) -> list[str]:
    return [address.strip() for address in value.split(",") if address.strip()]


def build_service(role: str, args: argparse.Namespace) -> Service:
    """Loads the role's model components; a bad --model is a ModelLoadError here, before binding.

    A stage is built on its compute thread (common/compute.py), where all its torch work then runs.
    """
    limits = RequestLimits.from_args(args)
    if role == "gateway":
        from ditserve.client.security import ClientSecurity, token_from_file
        from ditserve.services.common.profiling import Profiler
        from ditserve.services.gateway.pool import stage_target
        from ditserve.services.gateway.service import GatewayConfig, GatewayService

        for stage in ("encoder", "denoiser", "vae"):
            try:
                stage_target(getattr(args, stage))
            except ValueError as error:
                raise StartupError(f"--{stage}: {error}") from None
        config = GatewayConfig(
            encoders=_addresses(args.encoder),
            denoisers=_addresses(args.denoiser),
            vaes=_addresses(args.vae),
            limits=limits,
            stage_timeout_s=args.stage_timeout,
            max_message_mb=args.max_message_mb,
            security=ClientSecurity(
                args.stage_tls_ca,
                args.stage_tls_cert,
                args.stage_tls_key,
                token_from_file(args.stage_token_file),
            ),
        )
        return GatewayService(config, Profiler(args.profile_dir))

    import torch

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.common.profiling import Profiler
    from ditserve.services.common.stage import StageContext

    if args.threads < 0:
        raise StartupError(f"--threads must be 0 (torch's own count) or more, got {args.threads}")
    device = device_flags.resolve_device(args.device)
    stage = StageContext(
        role=role,
        folder=ModelFolder(args.model, allow_pickle=args.allow_pickle),
        device=device,
        dtype=device_flags.resolve_dtype(args.dtype, device),
        limits=limits,
        profiler=Profiler(args.profile_dir),
    )
    if args.threads:
        stage.compute.run(torch.set_num_threads, args.threads)  # its OpenMP team is the compute thread's
    stage.details["threads"] = stage.compute.run(torch.get_num_threads)
    if role == "encoder":
        from ditserve.services.encoder.service import EncoderService

        return stage.compute.run(EncoderService, stage, args.embedding_cache_mb)
    if role == "denoiser":
        from ditserve.services.common.errors import InvalidArgument
        from ditserve.services.denoiser.attention import default_backend_name
        from ditserve.services.denoiser.batching import BatchingConfig
        from ditserve.services.denoiser.cache.wire import parse_flag
        from ditserve.services.denoiser.parallel.mesh import SPConfig
        from ditserve.services.denoiser.runtime import DenoiserOptions
        from ditserve.services.denoiser.service import DenoiserService

        backend = args.attention_backend or default_backend_name()
        try:
            batching = BatchingConfig(
                mode=args.batching,
                max_batch_size=args.max_batch_size,
                batch_delay_ms=args.batch_delay_ms,
                max_batch_cost=args.max_batch_cost,
                max_queue=args.max_queue,
                max_wait_steps=args.max_wait_steps,
            )
        except ValueError as error:
            raise StartupError(f"batching: {error}") from None
        try:
            cache = parse_flag(args.cache_policy)
        except InvalidArgument as error:
            raise StartupError(f"--cache-policy: {error}") from None
        try:
            sequence_parallel = SPConfig(args.sp_ulysses, args.sp_ring)
        except ValueError as error:
            raise StartupError(f"--sp-ulysses/--sp-ring: {error}") from None
        options = DenoiserOptions(
            batching=batching,
            attention_backend=backend,
            attention_benchmark=args.attention_benchmark,
            attention_cache=args.attention_cache,
            cache=cache,
            progress_interval_ms=args.progress_interval_ms,
            sequence_parallel=sequence_parallel,
            sp_timeout_s=args.sp_timeout,
            compile=args.compile,
            quantize=args.quantize,
            joint_cfg=args.joint_cfg,
        )
        denoiser = stage.compute.run(DenoiserService, stage, options)
        # Alerts and autoscalers compare ditserve_queue_depth with this, not with a number copied from a flag.
        from prometheus_client import Gauge

        capacity = "Waiting requests admitted before RESOURCE_EXHAUSTED (--max-queue)"
        Gauge("ditserve_queue_capacity", capacity, registry=denoiser.metrics.registry).set(args.max_queue)
        return denoiser
    from ditserve.services.vae.service import VaeService

    try:
        return stage.compute.run(
            VaeService,
            stage,
            args.vae_tiling,
            args.max_decode_batch,
            args.decode_wait_ms,
            args.batched_decode_batch,
        )
    except ValueError as error:
        raise StartupError(f"--max-decode-batch/--batched-decode-batch/--decode-wait-ms: {error}") from None


def run(role: str, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    try:
        service = build_service(role, args)
    except StartupError as error:
        raise SystemExit(f"ditserve serve {role}: {error}") from None
    http = None
    if role == "gateway":
        from ditserve.services.gateway.http import start_for_gateway

        try:
            http = start_for_gateway(args, service)
        except StartupError as error:
            raise SystemExit(f"ditserve serve {role}: {error}") from None
    try:
        serve_forever(service, ServerOptions.from_args(args), ServerSecurity.from_args(args))
    finally:
        if http is not None:  # gRPC drained first: in-flight HTTP requests are gRPC calls it waited for
            http.stop()
    return 0

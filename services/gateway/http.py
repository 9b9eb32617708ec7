"""The gateway's OpenAI-compatible HTTP front end: images, videos (videos.py), models and health.

It runs inside the gateway process and reaches Pipeline.Generate over a loopback gRPC channel with
our own client stub, so every validation, limit, bearer-token check and status code stays in one
place (the gRPC gateway): this layer only maps the OpenAI Images schema onto GenerateRequest and
gRPC statuses onto HTTP ones. curl, the `openai` SDK, Open WebUI and LangChain work unchanged.

FastAPI on uvicorn: the stack SGLang's and vLLM's OpenAI servers run on, maintained, asyncio-native
(grpc.aio streams map straight onto server-sent events), with pydantic for the request schema and
an OpenAPI page at /docs.

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time,
and `Request` is imported inside app() so that the CLI's parser never imports FastAPI.
"""

import argparse
import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ValidationError

from ditserve.client.config import DEFAULT_HTTP_PORT
from ditserve.client.security import NO_SECURITY, ClientSecurity
from ditserve.client.stub import channel_options
from ditserve.services.common.errors import StartupError
from ditserve.services.common.metrics import LATENCY_BUCKETS, ServiceMetrics
from ditserve.services.gateway import videos
from ditserve.services.gateway.openai_api import (
    HttpError,
    ImageGenerationRequest,
    VideoGenerationRequest,
    error_from_rpc,
    images_body,
    openai_error,
    sse,
    to_generate_request,
    to_video_request,
    validation_error,
)
from ditserve.services.gateway.videos import VideoJobs
from ditserve.v1 import common_pb2, common_pb2_grpc, pipeline_pb2, pipeline_pb2_grpc

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-ditserve-timeout"


@dataclass(frozen=True)
class HttpOptions:
    """The HTTP listener of the gateway; port None = off."""

    host: str = "127.0.0.1"
    port: int | None = DEFAULT_HTTP_PORT
    max_body_kb: int = 256
    timeout_s: float = 600.0
    max_video_jobs: int = 16
    grace_s: float = 30.0

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("OpenAI-compatible HTTP (POST /v1/images/generations, /v1/models, /health)")
        group.add_argument(
            "--http-port",
            type=int,
            default=None,
            help=f"HTTP port on --host (default: {DEFAULT_HTTP_PORT}, off when --tls-cert is set; 0 = any free)",
        )
        group.add_argument("--no-http", action="store_true", help="serve gRPC only (default: HTTP on)")
        group.add_argument(
            "--http-max-body-kb", type=int, default=256, help="larger request bodies answer 413 (default: 256)"
        )
        group.add_argument(
            "--http-max-video-jobs",
            type=int,
            default=16,
            help="video jobs kept (POST /v1/videos); the oldest finished one makes room, else 429 (default: 16)",
        )
        group.add_argument(
            "--http-timeout",
            type=float,
            default=600.0,
            help=f"seconds one HTTP request may take; the {TIMEOUT_HEADER} header lowers it (default: 600)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "HttpOptions":
        """The HTTP layer speaks plaintext gRPC to its own gateway: with --tls-cert it stays off by
        default, and asking for it is a start-up error (terminate TLS in front of it instead)."""
        port = DEFAULT_HTTP_PORT if args.http_port is None else args.http_port
        if getattr(args, "tls_cert", None) is not None and not args.no_http:
            if args.http_port is not None:
                raise StartupError("--http-port: the HTTP front end needs a plaintext gateway (no --tls-cert)")
            log.warning("HTTP front end off: the gateway serves TLS (--tls-cert)")
            port = None
        return cls(
            host=args.host,
            port=None if args.no_http else port,
            max_body_kb=args.http_max_body_kb,
            timeout_s=args.http_timeout,
            max_video_jobs=args.http_max_video_jobs,
            grace_s=args.grace_seconds,
        )


class HttpMetrics:
    """HTTP requests beside the gRPC families, on the gateway's registry (route templates only)."""

    ROUTES = ("/v1/images/generations", "/v1/videos", "/v1/models", "/health")

    def __init__(self, metrics: ServiceMetrics) -> None:
        registry = metrics.registry
        self.service = metrics.service
        self.requests = Counter(
            "ditserve_http_requests", "HTTP requests by final status", ["service", "route", "code"], registry=registry
        )
        self.duration = Histogram(
            "ditserve_http_request_duration_seconds",
            "HTTP request wall time, until the last byte",
            ["service", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "ditserve_http_requests_in_flight", "HTTP requests being served", ["service"], registry=registry
        ).labels(self.service)

    def route(self, path: str) -> str:
        """The route template: a video's id is not a label value (unbounded cardinality)."""
        if path.startswith("/v1/videos/"):
            return "/v1/videos/{id}/content" if path.endswith("/content") else "/v1/videos/{id}"
        return path if path in self.ROUTES else "other"


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class HttpEdge:
    """Pure ASGI wrapper: HTTP metrics for every request, and 413 for a body over the limit."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.metrics.route(scope["path"])
        started = time.perf_counter()
        status = {"code": 500}
        self.metrics.in_flight.inc()

        async def observed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await _send_json(observed_send, *self._too_large())
                return
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(self.metrics.service, route, str(status["code"])).inc()
            self.metrics.duration.labels(self.metrics.service, route).observe(time.perf_counter() - started)

    def _too_large(self) -> tuple[int, dict]:
        message = f"request body is over the limit of {self.max_body_bytes} bytes (--http-max-body-kb)"
        return 413, openai_error(413, message, "invalid_request_error")


async def _send_json(send: Callable, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@dataclass
class HttpFrontend:
    """The FastAPI app over a loopback channel to the gateway; `stages` are checked by /health."""

    gateway_target: str
    options: HttpOptions
    metrics: ServiceMetrics
    stages: dict[str, list[str]] = field(default_factory=dict)
    stage_security: ClientSecurity = NO_SECURITY
    max_message_mb: int = 256
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict, repr=False)
    _model_id: str | None = field(default=None, repr=False)
    _details: dict[str, str] = field(default_factory=dict, repr=False)
    _videos: VideoJobs | None = field(default=None, repr=False)

    def app(self) -> Any:
        from contextlib import asynccontextmanager

        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, Response, StreamingResponse

        @asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            yield
            for channel in self._channels.values():
                await channel.close()

        api = FastAPI(title="ditserve", version=_version(), lifespan=lifespan)

        @api.exception_handler(HttpError)
        async def _http_error(_: Request, error: HttpError) -> JSONResponse:
            return JSONResponse(error.body, status_code=error.status)

        @api.exception_handler(grpc.aio.AioRpcError)
        async def _rpc_error(_: Request, error: grpc.aio.AioRpcError) -> JSONResponse:
            status, body = error_from_rpc(error.code(), error.details() or "")
            return JSONResponse(body, status_code=status)

        @api.post("/v1/images/generations", response_model=None)
        async def images_generations(request: Request) -> JSONResponse | StreamingResponse:
            body = await self._body(request)
            message = to_generate_request(body, request.headers.get("x-request-id", ""))
            await self._served_model()
            self._check_kind(video=False)
            output_format = body.output_format or "png"
            call = self._pipeline().Generate(message, timeout=self._timeout(request), metadata=_forwarded_auth(request))
            wants_stream = body.stream or "text/event-stream" in request.headers.get("accept", "")
            if not wants_stream:
                async for event in call:
                    if event.HasField("result"):
                        return JSONResponse(images_body(event.result, output_format))
                raise HttpError(500, "the gateway ended the stream without a result", "server_error")
            # The first event (after validation and the encode) decides the HTTP status; later
            # failures (a full denoiser queue, a deadline) arrive as an `error` event.
            first = await call.read()
            return StreamingResponse(
                self._events(call, first, output_format),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )

        @api.post("/v1/videos", response_model=None)
        async def create_video(request: Request) -> JSONResponse:
            body = await self._body(request, VideoGenerationRequest)
            model = await self._served_model()
            self._check_kind(video=True)
            details = self._details
            message = to_video_request(
                body,
                float(details.get("default_fps") or 16.0),
                int(details.get("temporal_factor") or 4),
                request.headers.get("x-request-id", ""),
            )
            job = self._video_jobs().add(model, message)
            call = self._pipeline().Generate(message, timeout=self._timeout(request), metadata=_forwarded_auth(request))
            try:
                await videos.start(job, call)
            except BaseException:
                self._video_jobs().delete(job.id)
                raise
            return JSONResponse(job.body())

        @api.get("/v1/videos/{video_id}")
        async def get_video(video_id: str) -> JSONResponse:
            return JSONResponse(self._video_jobs().get(video_id).body())

        @api.get("/v1/videos/{video_id}/content", response_model=None)
        async def video_content(video_id: str) -> Response:
            data, media_type = videos.content(self._video_jobs().get(video_id))
            return Response(content=data, media_type=media_type)

        @api.delete("/v1/videos/{video_id}")
        async def delete_video(video_id: str) -> JSONResponse:
            job = self._video_jobs().delete(video_id)
            return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})

        @api.get("/v1/models")
        async def models(request: Request) -> JSONResponse:
            # Admin.Info on the gateway itself: the same bearer-token check as every other call.
            admin = common_pb2_grpc.AdminStub(self._channel(self.gateway_target, NO_SECURITY))
            await admin.Info(common_pb2.InfoRequest(), timeout=10, metadata=_forwarded_auth(request))
            model_id = await self._served_model()
            entry = {"id": model_id, "object": "model", "created": 0, "owned_by": "ditserve"}
            return JSONResponse({"object": "list", "data": [entry]})

        @api.get("/health")
        async def health() -> JSONResponse:
            checks = {"gateway": await self._serving([self.gateway_target], NO_SECURITY)}
            for stage, addresses in self.stages.items():
                checks[stage] = await self._serving(addresses, self.stage_security)
            ready = all(state == "SERVING" for state in checks.values())
            return JSONResponse(
                {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
            )

        return HttpEdge(api, HttpMetrics(self.metrics), self.options.max_body_kb * 1024)

    async def _body(self, request: Any, schema: type[BaseModel] = ImageGenerationRequest) -> Any:
        limit = self.options.max_body_kb * 1024
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no content-length to check up front
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"request body is over the limit of {limit} bytes (--http-max-body-kb)")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise HttpError(400, f"the body is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the body must be a JSON object with at least `prompt`")
        try:
            return schema.model_validate(data)
        except ValidationError as error:
            raise validation_error(error) from None

    async def _events(self, call: Any, first: pipeline_pb2.GenerateEvent, output_format: str) -> AsyncIterator[bytes]:
        event = first
        try:
            while event is not grpc.aio.EOF:
                if event.HasField("progress"):
                    progress = json_format.MessageToDict(event.progress, preserving_proto_field_name=True)
                    yield sse("image_generation.progress", {"type": "image_generation.progress", **progress})
                else:
                    body = images_body(event.result, output_format)
                    for index, image in enumerate(body["data"]):
                        completed = {"type": "image_generation.completed", "index": index, **image}
                        completed.update({k: body[k] for k in ("created", "output_format", "size", "seed")})
                        yield sse("image_generation.completed", completed)
                event = await call.read()
        except grpc.aio.AioRpcError as error:
            status, body = error_from_rpc(error.code(), error.details() or "")
            yield sse("error", {"type": "error", "status": status, **body})
        finally:
            call.cancel()  # a client that went away cancels the generation
        yield b"data: [DONE]\n\n"

    def _channel(self, target: str, security: ClientSecurity) -> grpc.aio.Channel:
        if target not in self._channels:
            self._channels[target] = security.aio_channel(target, channel_options(self.max_message_mb))
        return self._channels[target]

    def _pipeline(self) -> pipeline_pb2_grpc.PipelineStub:
        return pipeline_pb2_grpc.PipelineStub(self._channel(self.gateway_target, NO_SECURITY))

    def _timeout(self, request: Any) -> float:
        asked = request.headers.get(TIMEOUT_HEADER)
        if asked is None:
            return self.options.timeout_s
        try:
            value = float(asked)
        except ValueError:
            raise HttpError(400, f"{TIMEOUT_HEADER}: {asked!r} is not a number of seconds") from None
        if not value > 0:
            raise HttpError(400, f"{TIMEOUT_HEADER}: {asked!r} must be above 0")
        return min(value, self.options.timeout_s)

    async def _serving(self, addresses: list[str], security: ClientSecurity) -> str:
        """SERVING when any replica says so, else the last answer (health checks need no token)."""
        state = "NO_ADDRESS"
        for address in addresses:
            stub = health_pb2_grpc.HealthStub(self._channel(address, security))
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.aio.AioRpcError as error:
                state = error.code().name
            if state == "SERVING":
                break
        return state

    def _check_kind(self, video: bool) -> None:
        """Images from an image family, clips from a video family: the other route is a 400 naming model."""
        served_video = self._details.get("video") == "True"
        if served_video != video:
            kind, route = (
                ("a video", "POST /v1/videos") if served_video else ("an image", "POST /v1/images/generations")
            )
            raise HttpError(400, f"model: {self._model_id} is {kind} model; use {route}", param="model")

    def _video_jobs(self) -> VideoJobs:
        if self._videos is None:
            self._videos = VideoJobs(self.options.max_video_jobs)
        return self._videos

    async def _served_model(self) -> str:
        """The denoiser's model folder name, asked once (the gateway holds no model)."""
        if self._model_id is None:
            for address in self.stages.get("denoiser", []):
                admin = common_pb2_grpc.AdminStub(self._channel(address, self.stage_security))
                metadata = self.stage_security.metadata
                try:
                    info = await admin.Info(common_pb2.InfoRequest(), timeout=5, metadata=metadata)
                except grpc.aio.AioRpcError:
                    continue
                self._model_id = info.model.rstrip("/").rsplit("/", 1)[-1] or "ditserve"
                self._details = dict(info.details)
                break
            else:
                raise HttpError(503, "no denoiser answered Info", "service_unavailable_error")
        return self._model_id


def _forwarded_auth(request: Any) -> tuple[tuple[str, str], ...]:
    """The caller's bearer token goes to the gateway as gRPC metadata: one token config, checked in one place."""
    header = request.headers.get("authorization")
    return (("authorization", header),) if header else ()


def _version() -> str:
    import ditserve

    return ditserve.__version__


def loopback(host: str, port: int) -> str:
    """Where the gateway's own gRPC port answers from inside its process."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class HttpServer:
    """uvicorn on its own thread and event loop, on a socket bound up front (bind errors surface at start)."""

    def __init__(self, frontend: HttpFrontend) -> None:
        import uvicorn

        options = frontend.options
        family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((options.host, options.port or 0))
        except OSError as error:
            self.socket.close()
            raise StartupError(f"--http-port {options.port}: cannot bind {options.host}: {error}") from None
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            frontend.app(),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=max(1, int(options.grace_s)),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="gateway-http", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.socket]))

    def start(self, timeout: float = 30.0) -> "HttpServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise StartupError(f"the HTTP server on port {self.port} did not start")
            time.sleep(0.02)
        log.info("gateway serving OpenAI-compatible HTTP on %s:%d", self.socket.getsockname()[0], self.port)
        return self

    def stop(self) -> None:
        """Stops accepting, lets in-flight requests finish (up to the grace period)."""
        self.server.should_exit = True
        self.thread.join(timeout=self.server.config.timeout_graceful_shutdown or 30)
        self.socket.close()


def start_for_gateway(args: argparse.Namespace, service: Any) -> HttpServer | None:
    """The gateway's HTTP listener from its flags, bound before gRPC so a taken port fails fast."""
    options = HttpOptions.from_args(args)
    if options.port is None:
        return None
    if args.port == 0:  # the loopback channel needs the gRPC port before gRPC binds
        with socket.socket() as probe:
            probe.bind((args.host, 0))
            args.port = probe.getsockname()[1]
    config = service.config
    frontend = HttpFrontend(
        gateway_target=loopback(args.host, args.port),
        options=options,
        metrics=service.metrics,
        stages={
            "encoder": _targets(config.encoders),
            "denoiser": _targets(config.denoisers),
            "vae": _targets(config.vaes),
        },
        stage_security=config.security,
        max_message_mb=config.max_message_mb,
    )
    return HttpServer(frontend).start()


def _targets(value: str | list[str]) -> list[str]:
    """A stage as GatewayConfig names it (one target, comma-separated addresses, or a list) as a list."""
    items = value.split(",") if isinstance(value, str) else value
    return [item.strip() for item in items if item.strip()]

"""What the three model-holding stages share: folder, device, dtype, limits, metrics, Info."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

import ditserve
from ditserve.services.common.compute import ComputeThread
from ditserve.services.common.device import dtype_name
from ditserve.services.common.limits import RequestLimits
from ditserve.services.common.metrics import ServiceMetrics
from ditserve.services.common.model import ModelFolder
from ditserve.services.common.profiling import Profiler
from ditserve.services.families import family_name
from ditserve.v1 import common_pb2


@dataclass
class StageContext:
    """Everything a stage is configured with, built once from the command line."""

    role: str
    folder: ModelFolder
    device: torch.device
    dtype: torch.dtype
    limits: RequestLimits = field(default_factory=RequestLimits)
    metrics: ServiceMetrics = None  # type: ignore[assignment]
    profiler: Profiler = field(default_factory=lambda: Profiler(Path("profiles")))
    details: dict[str, object] = field(default_factory=dict)  # what start-up decided, added to Info's details
    compute: ComputeThread = field(default_factory=lambda: ComputeThread("compute"))  # runs all its torch work

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = ServiceMetrics(self.role)

    def publish_model_info(self, attention_backend: str = "", quantization: str = "none") -> None:
        self.metrics.set_model_info(
            quantization=quantization,
            model=self.folder.name,
            family=family_name(self.folder),
            dtype=dtype_name(self.dtype),
            device=str(self.device),
            attention_backend=attention_backend,
            version=ditserve.__version__,
        )
        self.metrics.watch_device_memory()

    def info(self, attention_backend: str = "", **details: object) -> common_pb2.InfoResponse:
        return common_pb2.InfoResponse(
            service=self.role,
            model=str(self.folder.path),
            dtype=dtype_name(self.dtype),
            device=str(self.device),
            version=ditserve.__version__,
            attention_backend=attention_backend,
            details={key: str(value) for key, value in {**self.weights_detail(), **self.details, **details}.items()},
        )

    def weights_detail(self) -> dict[str, str]:
        """A random-weights folder (make-model --random-weights) says so in every Info."""
        if not self.folder.random_weights:
            return {}
        return {"weights": "random (make-model --random-weights): for timing and memory only, never image quality"}

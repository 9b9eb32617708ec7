"""Prometheus families every service exports, on a registry of its own.

Names follow Prometheus conventions: `ditserve_` prefix, base units, `_total` counters, and
labels of bounded cardinality (no request ids, no prompts).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Requests (denoiser) or images and clips (VAE) that share one model call.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class DeviceMemoryCollector(Collector):
    """Reads memory at scrape time: accelerator allocator stats where present, host RSS always."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("ditserve_device_memory_bytes", "Memory held by this process", labels=["kind"])
        family.add_metric(["host_rss"], _rss_bytes())
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            family.add_metric(["cuda_allocated"], torch.cuda.memory_allocated())
            family.add_metric(["cuda_reserved"], torch.cuda.memory_reserved())
        yield family


def _rss_bytes() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ServiceMetrics:
    """The families shared by all four services; role-specific ones register on `registry`."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "ditserve_requests", "RPCs by final status", ["service", "method", "code"], registry=self.registry
        )
        self.duration = Histogram(
            "ditserve_request_duration_seconds",
            "RPC wall time",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ditserve_requests_in_flight", "RPCs being served", ["service"], registry=self.registry
        ).labels(service)
        self.retried = Counter(
            "ditserve_retried_requests",
            "Work RPCs that arrived as a gRPC retry (an earlier attempt failed UNAVAILABLE, e.g. on a dead replica)",
            ["service", "method"],
            registry=self.registry,
        )
        self.tensor_bytes = Counter(
            "ditserve_tensor_bytes", "Tensor payload bytes", ["service", "direction"], registry=self.registry
        )
        self.model_info = Gauge(
            "ditserve_model_info",
            "What this process serves (always 1)",
            ["service", "model", "family", "dtype", "device", "attention_backend", "quantization", "version"],
            registry=self.registry,
        )

    def set_model_info(
        self,
        *,
        model: str,
        dtype: str,
        device: str,
        attention_backend: str,
        version: str,
        family: str = "",
        quantization: str = "none",
    ) -> None:
        labels = (self.service, model, family, dtype, device, attention_backend, quantization, version)
        self.model_info.labels(*labels).set(1)

    def watch_device_memory(self) -> None:
        """Only model-holding services report device memory."""
        self.registry.register(DeviceMemoryCollector())

    def count_bytes(self, direction: str, nbytes: int) -> None:
        self.tensor_bytes.labels(self.service, direction).inc(nbytes)

    def serve_http(self, host: str, port: int) -> int:
        """Starts /metrics; returns the bound port (port 0 picks a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

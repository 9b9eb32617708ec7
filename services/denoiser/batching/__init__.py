"""The denoiser's pure batching scheduler: which requests share each denoising step."""

from ditserve.services.denoiser.batching.scheduler import (
    MODES,
    STOP_REASONS,
    BatchingConfig,
    BatchScheduler,
    Mode,
    QueueFull,
    ScheduledRequest,
    StepOutput,
    StepPlan,
    StopReason,
)

__all__ = [
    "MODES",
    "STOP_REASONS",
    "BatchScheduler",
    "BatchingConfig",
    "Mode",
    "QueueFull",
    "ScheduledRequest",
    "StepOutput",
    "StepPlan",
    "StopReason",
]

"""torch <-> Tensor messages, with the same validation as the numpy codec.

Decoding copies once, when it reads the message's bytes (protobuf's upb backend
copies a bytes field on every read); the returned tensor views that copy and is
read-only in spirit: callers that write in place must clone first.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ditserve.client.tensors import DEFAULT_LIMITS, TensorError, TensorLimits, validate
from ditserve.services.common.errors import InvalidArgument
from ditserve.v1 import tensor_pb2

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
DATATYPES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def encode(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """One copy into the message bytes; the tensor may live on any device."""
    if tensor.dtype not in DATATYPES:
        raise TensorError("tensor.datatype", f"torch dtype {tensor.dtype} has no wire datatype")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return tensor_pb2.Tensor(
        datatype=DATATYPES[tensor.dtype],
        shape=list(tensor.shape),
        raw_data=flat.view(torch.uint8).numpy().tobytes(),
    )


def decode(message: tensor_pb2.Tensor, field: str = "tensor", limits: TensorLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Validates, then views the message's bytes, read once, as a CPU tensor."""
    raw = message.raw_data
    count = validate(message, field, limits, raw)
    dtype = TORCH_DTYPES[message.datatype]
    shape = tuple(message.shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # protobuf bytes are immutable; torch warns that the view is not writable.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=dtype).reshape(shape)


def check_values(tensor: torch.Tensor, field: str, max_abs: float) -> None:
    """Refuses NaN, Inf and magnitudes no encoder or denoiser produces (they overflow inside the model).

    In numpy, one thread: requests are checked on gRPC handler threads, and a torch op large enough to
    run in parallel (a FLUX.1 prompt's 512x4096 embeddings) would give each handler thread an OpenMP team
    of its own; once a process holds more team threads than cores, every op of the model pays a wake-up.
    """
    values = _float_values(tensor)
    if not np.isfinite(values).all():
        raise InvalidArgument(field, "contains NaN or Inf")
    if values.size and np.abs(values).max() > max_abs:
        raise InvalidArgument(field, f"has values beyond +-{max_abs:g} (see --max-abs-value)")


def _float_values(tensor: torch.Tensor) -> np.ndarray:
    """A CPU float tensor's values in numpy (bfloat16, which numpy lacks, widened exactly to float32)."""
    if tensor.dtype != torch.bfloat16:
        return tensor.numpy()
    bits = tensor.view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
    return (bits << 16).view(np.float32)


FLOAT_DATATYPES = ("FP32", "FP16", "BF16")


def decode_float(message: tensor_pb2.Tensor, field: str, max_abs: float) -> torch.Tensor:
    """A float tensor from a request: datatype, byte length and values (finite, within max_abs) checked."""
    if message.datatype not in FLOAT_DATATYPES:
        raise InvalidArgument(f"{field}.datatype", f"{message.datatype!r} is not one of {', '.join(FLOAT_DATATYPES)}")
    tensor = decode(message, field)
    check_values(tensor, field, max_abs)
    return tensor

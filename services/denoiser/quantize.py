"""`--quantize`: the transformer's block Linears through torchao, checked against the hardware at start-up.

`int8-weight` stores int8 weights with per-channel scales and computes in the serving dtype: it runs on
any device, CPU included, and halves (bf16) or quarters (fp32) the weights' memory. `fp8` quantizes
weights and activations to float8 e4m3 per row at every call (torchao's dynamic FP8), which needs the fp8
tensor cores of compute capability 8.9+ (Ada, Hopper). Only the Linears inside the repeated transformer
blocks are quantized: they hold nearly all the weights and FLOPs, while the embedders and the output
projection stay in the serving dtype, where quantization error would reach every token unmixed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ditserve.client.config import QUANTIZE_CHOICES as MODES
from ditserve.services.common.errors import StartupError

if TYPE_CHECKING:
    import torch

FP8_MIN_CAPABILITY = (8, 9)


def check_quantize(mode: str, device: torch.device) -> None:
    """Raises StartupError naming `--quantize` when this machine cannot run `mode`."""
    import torch

    if mode not in MODES:
        raise StartupError(f"--quantize {mode}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise StartupError(
            f"--quantize {mode} needs torchao, which is not installed: pip install 'ditserve[quantize]'"
        ) from None
    if mode == "fp8":
        if device.type != "cuda":
            raise StartupError(
                f"--quantize fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); the denoiser"
                f" runs on {device}. Use --quantize int8-weight there"
            )
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            raise StartupError(
                f"--quantize fp8 needs compute capability 8.9 or newer (fp8 tensor cores); {name} is"
                f" sm{capability[0]}{capability[1]}. Use --quantize int8-weight there"
            )


def block_linears(transformer: torch.nn.Module) -> set[int]:
    """ids of the Linears inside the transformer's repeated blocks (diffusers' `_repeated_blocks`)."""
    import torch

    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    if not names:
        raise StartupError(f"--quantize: {type(transformer).__name__} names no repeated blocks (_repeated_blocks)")
    found: set[int] = set()
    for module in transformer.modules():
        if type(module).__name__ in names:
            found.update(id(m) for m in module.modules() if isinstance(m, torch.nn.Linear))
    return found


def quantize_transformer(transformer: torch.nn.Module, mode: str, device: torch.device) -> int:
    """Quantizes the block Linears in place; returns how many. `mode` "none" leaves the model as it is."""
    check_quantize(mode, device)
    if mode == "none":
        return 0
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    targets = block_linears(transformer)
    if mode == "int8-weight":
        config = Int8WeightOnlyConfig()
    else:
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(transformer, config, filter_fn=lambda module, fqn: id(module) in targets)
    return len(targets)

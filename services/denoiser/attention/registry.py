"""Attention backends: a name enum, a registry with constraint checks, and the one dispatch point.

Every backend is a kernel over [batch, seq, heads, head_dim] tensors plus constraint functions of
(device, dtype, head_dim) that return why it cannot run (or None). The constraints are checked once, when
the denoiser resolves its backend, never per call. For PyTorch's own SDPA kernels the last constraint asks
torch itself (a tiny probe call under `sdpa_kernel`), because which kernel runs on which GPU, dtype and
head size changes from one torch release to the next; the probe also captures torch's explanation.

flash-attn and sageattention are optional extras: they are imported lazily, the first time a
constraint or kernel needs them, so a machine without them (every CPU machine) loses nothing.

`auto` on a CUDA device measures (benchmark.py, choice.py): the exact backends that can run are timed on
the model's own attention shape and the fastest within tolerance of torch SDPA wins, cached per GPU,
torch version, backend set and shape. Off CUDA (unless --attention-benchmark on), with
--attention-benchmark off, or where the caller gives no shape, these rules decide, first match wins (the
reason string says which rule fired):
  1. Not a CUDA device -> `torch_sdpa`: PyTorch's dispatch already picks its fused flash kernel on CPU,
     and any kernel we force is one it could have picked itself, so `auto` is never slower than it.
  2. CUDA with FP32 -> `torch_sdpa`: only PyTorch's own kernels take FP32 inputs.
  3. CUDA FP16/BF16 on Hopper (sm90) with FA3 (`flash_attn_interface`) installed and head_dim <= 256
     -> `fa`: FA3 is written for Hopper (not measured here: our H200 box has no flash-attn).
  4. CUDA FP16/BF16 on Hopper where cuDNN attention runs (torch's probe) -> `sdpa_cudnn`: 2x PyTorch's
     flash kernel at FLUX.1-dev shapes (0.40 vs 0.80 ms on H100, 0.40 vs 0.84 ms on H200, torch 2.11).
     torch 2.11's own dispatch picks cuDNN there too (same time), but releases have differed on that
     (2.5.0 preferred it, 2.5.1 did not), so we pin it.
  5. Otherwise -> `torch_sdpa`: on Ampere/Ada its choice is the same FA2 kernel family that the
     `flash_attn` package ships, and on other GPUs nothing has been measured to beat it.
  `sage_attn` is never chosen by `auto`: it quantizes Q/K to INT8 (and P/V to FP8 on newer GPUs), so its
  output is not the model's exact attention; ask for it explicitly. `sdpa_math` and `sdpa_efficient`
  are never chosen: they were 27-30x and 4x slower than `torch_sdpa` on H100 and H200.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditserve.services.denoiser.attention.choice import AutoTune

ENV_VAR = "DITSERVE_ATTENTION_BACKEND"

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Constraint = Callable[[torch.device, torch.dtype, int], str | None]

HALF_DTYPES = (torch.float16, torch.bfloat16)


class BackendName(str, Enum):
    """What `--attention-backend` and DITSERVE_ATTENTION_BACKEND accept."""

    AUTO = "auto"
    TORCH_SDPA = "torch_sdpa"
    SDPA_FLASH = "sdpa_flash"
    SDPA_EFFICIENT = "sdpa_efficient"
    SDPA_CUDNN = "sdpa_cudnn"
    SDPA_MATH = "sdpa_math"
    FA = "fa"
    SAGE_ATTN = "sage_attn"


class AttentionBackendUnavailable(ValueError):
    """A backend was asked for that cannot run here; `availability` says what can and why not."""

    def __init__(self, message: str, availability: dict[BackendName, str | None]) -> None:
        super().__init__(f"{message}\n{format_availability(availability)}")
        self.availability = availability


@dataclass(frozen=True)
class _Backend:
    kernel: Kernel
    constraints: tuple[Constraint, ...]

    def unavailable(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """The first failing constraint's reason; later constraints may assume the earlier ones hold."""
        for check in self.constraints:
            if (reason := check(device, dtype, head_dim)) is not None:
                return reason
        return None


_REGISTRY: dict[BackendName, _Backend] = {}


def _register(name: BackendName, *constraints: Constraint) -> Callable[[Kernel], Kernel]:
    def decorator(kernel: Kernel) -> Kernel:
        _REGISTRY[name] = _Backend(kernel, constraints)
        return kernel

    return decorator


# ---- constraints: each returns why the backend cannot run on (device, dtype, head_dim), or None ----


def _cuda(min_capability: tuple[int, int]) -> Constraint:
    def check(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        if device.type != "cuda":
            return f"needs a CUDA device (got {device.type})"
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        capability = torch.cuda.get_device_capability(device)
        if capability < min_capability:
            return f"needs compute capability >= {_sm(min_capability)} (got {_sm(capability)})"
        return None

    return check


def _sm(capability: tuple[int, int]) -> str:
    return f"sm{capability[0]}{capability[1]}"


def _half_precision(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    return None if dtype in HALF_DTYPES else f"needs float16 or bfloat16 (got {dtype})"


def _head_dim_at_most(limit: int) -> Constraint:
    def check(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        if head_dim % 8 or head_dim > limit:
            return f"needs head_dim a multiple of 8 and <= {limit} (got {head_dim})"
        return None

    return check


def _installed(module: str) -> Constraint:
    def check(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        return _import(module)[1]

    return check


def _require(module: str) -> ModuleType:
    """The optional module for a kernel; resolve_backend has already said why when it is missing."""
    found, reason = _import(module)
    if found is None:
        raise RuntimeError(reason)
    return found


def _torch_accepts(sdp_backend: SDPBackend) -> Constraint:
    def check(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        return _probe_sdpa(sdp_backend, device, dtype, head_dim)

    return check


@functools.cache
def _import(module: str) -> tuple[ModuleType | None, str | None]:
    """The optional module, or why it cannot be used (not installed, or a broken build)."""
    try:
        return importlib.import_module(module), None
    except ModuleNotFoundError:
        return None, f"`{module}` is not installed"
    except (ImportError, OSError, RuntimeError) as error:  # a build for another torch/CUDA fails like this
        return None, f"`{module}` failed to import: {error}"


@functools.cache
def _probe_sdpa(sdp_backend: SDPBackend, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Run the forced kernel once on a tiny input; torch's warnings say why it refused."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            q = torch.zeros(1, 1, 64, head_dim, device=device, dtype=dtype)
            with sdpa_kernel(sdp_backend):
                F.scaled_dot_product_attention(q, q, q)
        except Exception as error:  # any failure at all means this kernel cannot run here
            details = "; ".join(str(warning.message) for warning in caught) or str(error)
            return f"torch {torch.__version__} refuses {sdp_backend.name} here: {details}"
    return None


# ---- kernels: [batch, seq, heads, head_dim] in and out ----


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's SDPA wants [batch, heads, seq, head_dim]; the same permutes as diffusers' native path."""
    q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3)


_register(BackendName.TORCH_SDPA)(_sdpa)

_FORCED_SDPA = {
    BackendName.SDPA_FLASH: (SDPBackend.FLASH_ATTENTION, ()),  # PyTorch also has a CPU flash kernel
    BackendName.SDPA_EFFICIENT: (SDPBackend.EFFICIENT_ATTENTION, (_cuda((5, 0)),)),
    BackendName.SDPA_CUDNN: (SDPBackend.CUDNN_ATTENTION, (_cuda((8, 0)),)),
    BackendName.SDPA_MATH: (SDPBackend.MATH, ()),
}


def _forced_sdpa(sdp_backend: SDPBackend) -> Kernel:
    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(sdp_backend):
            return _sdpa(q, k, v)

    return kernel


for _name, (_sdp_backend, _constraints) in _FORCED_SDPA.items():
    _register(_name, *_constraints, _torch_accepts(_sdp_backend))(_forced_sdpa(_sdp_backend))


@dataclass(frozen=True)
class _FlashAttn:
    version: int  # 3: FA3 (flash_attn_interface, Hopper build); 2: FA2 (flash_attn)
    func: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


def _flash_attn(device: torch.device) -> _FlashAttn | str:
    """FA3 on Hopper where its build is installed, else FA2; or why neither can run."""
    reasons = []
    if torch.cuda.get_device_capability(device)[0] == 9:
        module, reason = _import("flash_attn_interface")
        if module is not None:
            return _FlashAttn(3, module.flash_attn_func)
        reasons.append(f"FA3: {reason}")
    else:
        reasons.append("FA3: needs Hopper (sm90)")
    module, reason = _import("flash_attn")
    if module is not None:
        return _FlashAttn(2, module.flash_attn_func)
    reasons.append(f"FA2: {reason}")
    return "; ".join(reasons)


def _flash_attn_installed(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    found = _flash_attn(device)
    return found if isinstance(found, str) else None


@_register(BackendName.FA, _cuda((8, 0)), _half_precision, _head_dim_at_most(256), _flash_attn_installed)
def _fa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    flash = _flash_attn(q.device)
    if isinstance(flash, str):
        raise RuntimeError(flash)
    out = flash.func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # FA3 releases differ: out, or (out, softmax_lse)


@_register(BackendName.SAGE_ATTN, _cuda((8, 0)), _half_precision, _head_dim_at_most(128), _installed("sageattention"))
def _sage_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _require("sageattention").sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


# ---- public API ----


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: BackendName) -> torch.Tensor:
    """The one dispatch point: q, k, v and the result are [batch, seq, heads, head_dim], no mask, not causal.

    Every attention call of the model goes through here, so sequence-parallel attention (all-to-all over
    heads around a local kernel, or ring attention) plugs in here later without touching the processor.
    `backend` must be resolved already (see resolve_backend): constraints are not re-checked per call.
    """
    if backend is BackendName.AUTO:
        raise ValueError("resolve 'auto' with resolve_backend() before dispatching")
    return _REGISTRY[backend].kernel(q, k, v)


def available_backends(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict[BackendName, str | None]:
    """Every concrete backend (not `auto`) -> None if it can run here, else the first reason it cannot."""
    return {name: backend.unavailable(device, dtype, head_dim) for name, backend in _REGISTRY.items()}


def format_availability(availability: dict[BackendName, str | None]) -> str:
    width = max(len(name.value) for name in availability)
    return "\n".join(
        f"  {name.value:<{width}}  {'available' if reason is None else 'unavailable: ' + reason}"
        for name, reason in availability.items()
    )


def default_backend_name() -> str:
    """DITSERVE_ATTENTION_BACKEND, or `auto` when it is unset or empty."""
    return os.environ.get(ENV_VAR, "").strip() or BackendName.AUTO.value


def resolve_backend(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, autotune: AutoTune | None = None
) -> tuple[BackendName, str]:
    """The backend to run and why (for the log and Info); an explicit backend that cannot run raises.
    `auto` measures on `autotune.shape` where autotune.measures(device), else follows the rules."""
    availability = available_backends(device, dtype, head_dim)
    where = f"{device} {str(dtype).removeprefix('torch.')} head_dim={head_dim}"
    try:
        requested = BackendName(name)
    except ValueError:
        known = ", ".join(member.value for member in BackendName)
        raise AttentionBackendUnavailable(
            f"unknown attention backend {name!r} (known: {known}); on {where}:", availability
        ) from None
    if requested is BackendName.AUTO:
        if autotune is not None and autotune.measures(device.type):
            from ditserve.services.denoiser.attention.benchmark import measured_auto  # imports this module

            chosen, rule = measured_auto(device, dtype, availability, autotune)
        else:
            chosen, rule = _auto(device, dtype, availability)
        return chosen, f"auto chose {chosen.value} on {where}: {rule}"
    reason = availability[requested]
    if reason is not None:
        raise AttentionBackendUnavailable(
            f"attention backend {requested.value!r} cannot run on {where}: {reason}. All backends:",
            availability,
        )
    return requested, f"{requested.value} requested explicitly; it can run on {where}"


def _auto(
    device: torch.device, dtype: torch.dtype, availability: dict[BackendName, str | None]
) -> tuple[BackendName, str]:
    """The module docstring's rules, in order; the first one that matches and can run wins."""
    if device.type != "cuda":
        return BackendName.TORCH_SDPA, "PyTorch's own dispatch is the best kernel choice off CUDA"
    if dtype not in HALF_DTYPES:
        return BackendName.TORCH_SDPA, "only PyTorch's own kernels take this dtype"
    flash = None if availability[BackendName.FA] else _flash_attn(device)
    if isinstance(flash, _FlashAttn) and flash.version == 3:
        return BackendName.FA, "FA3 (flash_attn_interface) on Hopper is the fastest exact kernel there"
    if torch.cuda.get_device_capability(device)[0] == 9 and availability[BackendName.SDPA_CUDNN] is None:
        return BackendName.SDPA_CUDNN, "on Hopper cuDNN attention is 2x PyTorch's flash kernel; pinned"
    return BackendName.TORCH_SDPA, "no kernel here is known to beat PyTorch's own dispatch"

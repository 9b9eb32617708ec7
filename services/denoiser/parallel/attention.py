"""Sequence-parallel attention over [batch, seq, heads, head_dim] shards: Ulysses, ring, and both (USP).

Each rank holds a slice of the sequence for q, k and v with every head. The result is that slice of the
exact attention over the whole sequence (no mask, not causal: FLUX and Wan attend fully). Keys can be
visited in any order, so which tokens a rank holds does not matter, only that q, k, v and the rotary
embeddings were sliced alike.

- Ulysses: an all-to-all turns (seq / G, all heads) into (all seq, heads / G), any attention kernel runs
  locally on whole heads, and a second all-to-all turns the output back. q, k, v travel in one message.
- Ring: K/V blocks travel round the ring (send to the next rank while attending to the current block);
  each block gives a partial output and its log-sum-exp, merged exactly:
      lse = logaddexp(lse_a, lse_b),  out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.
  So ring needs a kernel that returns the LSE; see LSE_KERNELS.
- USP: Ulysses over the rows of the mesh with ring attention as its local kernel, across the columns.

Which registry backends could give the LSE on GPU (only the first two are wired, see lse_kernel):
  sdpa_math   math_attention_lse below: exact, any device, but 27-30x slower than flash on H100/H200.
  sdpa_flash  aten._scaled_dot_product_flash_attention (CUDA) / ..._for_cpu (CPU) return the LSE; wired.
              torch_sdpa maps here too: its dispatch picks this flash kernel on CPU and on Ampere+ GPUs.
  sdpa_cudnn  aten._scaled_dot_product_cudnn_attention(compute_log_sumexp=True) returns it
              (diffusers' `_native_cudnn` ring backend calls exactly that).
  sdpa_efficient  aten._scaled_dot_product_efficient_attention(compute_log_sumexp=True) returns it.
  fa          flash_attn_func(..., return_attn_probs=True) returns softmax_lse (FA2); FA3 returns it too.
  sage_attn   sageattention 2.x has return_lse=True, but its quantized output is not the exact attention,
              so merging partials compounds the error; not a ring candidate.
The last four need a GPU to validate and were not run here; add them to LSE_KERNELS with a test.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ditserve.services.denoiser.attention.registry import BackendName, Kernel, attention
from ditserve.services.denoiser.parallel.mesh import SPGroup, SPMesh

# q, k, v [batch, seq, heads, head_dim] -> (out, same shape, and lse [batch, seq, heads]), both FP32
LseKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def math_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention in FP32 that also returns the log-sum-exp of the scaled scores."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    lse = scores.logsumexp(dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", (scores - lse.unsqueeze(-1)).exp(), v.float())
    return out, lse.transpose(1, 2)


def flash_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's flash kernel, which computes the LSE anyway; the public SDPA call just drops it."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out.transpose(1, 2).float(), lse.transpose(1, 2).float()


LSE_KERNELS: dict[BackendName, LseKernel] = {
    BackendName.SDPA_MATH: math_attention_lse,
    BackendName.SDPA_FLASH: flash_attention_lse,
    BackendName.TORCH_SDPA: flash_attention_lse,
}


def lse_kernel(backend: BackendName) -> LseKernel:
    """The partial-attention kernel ring attention uses for `backend`; raises if it has none."""
    if backend not in LSE_KERNELS:
        wired = ", ".join(name.value for name in LSE_KERNELS)
        raise ValueError(
            f"ring attention needs a kernel that returns the log-sum-exp; {backend.value!r} has none wired "
            f"here (use one of: {wired}, or ring degree 1)"
        )
    return LSE_KERNELS[backend]


def merge_partials(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of two key blocks from the softmax over each: exact, in FP32."""
    merged = torch.logaddexp(lse, block_lse)
    return (
        out * (lse - merged).exp().unsqueeze(-1) + block_out * (block_lse - merged).exp().unsqueeze(-1),
        merged,
    )


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: SPGroup, partial: LseKernel = math_attention_lse
) -> torch.Tensor:
    """Local queries against every rank's K/V block, passed round the ring while the current one is used."""
    kv = torch.stack((k, v))  # one message per hop
    out = lse = None
    for hop in range(group.size):
        pending = group.shift(kv) if hop + 1 < group.size else None
        block_out, block_lse = partial(q, kv[0], kv[1])
        out, lse = (block_out, block_lse) if out is None else merge_partials(out, lse, block_out, block_lse)
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: SPGroup,
    inner: Kernel,
) -> torch.Tensor:
    """All-to-all to (whole sequence, heads / G), `inner` on whole heads, all-to-all back."""
    if group.size == 1:
        return inner(q, k, v)
    if q.shape[2] % group.size:
        raise ValueError(f"Ulysses over {group.size} ranks needs heads divisible by it, got {q.shape[2]}")
    batch = q.shape[0]
    gathered = _sequence_for_heads(torch.cat((q, k, v)), group)
    out = inner(*gathered.split(batch))
    return _heads_for_sequence(out, group)


def _sequence_for_heads(x: torch.Tensor, group: SPGroup) -> torch.Tensor:
    """[B, s, H, D] sequence shard -> [B, G s, H / G, D]: this rank's head chunk for the group's sequence."""
    b, s, h, d = x.shape
    chunks = x.reshape(b, s, group.size, h // group.size, d).permute(2, 0, 1, 3, 4)  # [dest, B, s, h, D]
    received = group.all_to_all(chunks)  # [source, B, s, h, D]
    return received.permute(1, 0, 2, 3, 4).reshape(b, group.size * s, h // group.size, d)


def _heads_for_sequence(x: torch.Tensor, group: SPGroup) -> torch.Tensor:
    """The inverse: [B, G s, H / G, D] -> [B, s, H, D] for this rank's own sequence shard."""
    b, n, h, d = x.shape
    chunks = x.reshape(b, group.size, n // group.size, h, d).permute(1, 0, 2, 3, 4)  # [dest, B, s, h, D]
    received = group.all_to_all(chunks)  # [source head chunk, B, s, h, D]
    return received.permute(1, 2, 0, 3, 4).reshape(b, n // group.size, group.size * h, d)


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ulysses: SPGroup,
    ring: SPGroup,
    partial: LseKernel = math_attention_lse,
) -> torch.Tensor:
    """Ulysses inside (all-to-all over the mesh row), ring attention across (the mesh column)."""
    return ulysses_attention(q, k, v, ulysses, lambda *qkv: ring_attention(*qkv, ring, partial))


class SequenceParallelAttention:
    """What `attention(q, k, v, backend)` becomes under sequence parallelism, for one mesh and backend.

    Without ring, the local kernel is the backend itself (any backend works under Ulysses); with ring,
    it is the backend's LSE kernel, so a backend without one fails here, when the model is set up.
    """

    def __init__(self, mesh: SPMesh, backend: BackendName) -> None:
        self.mesh = mesh
        self.backend = backend
        self.partial = lse_kernel(backend) if mesh.ring.size > 1 else None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.partial is None:
            return ulysses_attention(q, k, v, self.mesh.ulysses, self._local)
        return usp_attention(q, k, v, self.mesh.ulysses, self.mesh.ring, self.partial)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, self.backend)

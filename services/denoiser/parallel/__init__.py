"""Sequence parallelism for the denoiser: one image's tokens split across ranks (Ulysses, ring, both).

mesh.py: SPConfig, the (ring, ulysses) process groups, byte-counted collectives. attention.py: Ulysses,
ring and USP attention. sharding.py: how FLUX's text + image sequence is split. flux.py: the transformer
run sequence-parallel (and why not diffusers' context parallelism). launch.py: local CPU worlds for tests
and the bench. docs/sequence-parallel.md: when it pays off.
"""

from ditserve.services.denoiser.parallel.attention import (
    LSE_KERNELS,
    SequenceParallelAttention,
    lse_kernel,
    math_attention_lse,
    merge_partials,
    ring_attention,
    ulysses_attention,
    usp_attention,
)
from ditserve.services.denoiser.parallel.flux import (
    SequenceParallelFlux,
    SequenceParallelFluxAttnProcessor,
    SequenceParallelFluxExecutor,
)
from ditserve.services.denoiser.parallel.mesh import (
    ByteCounter,
    SPConfig,
    SPGroup,
    SPMesh,
    build_mesh,
    init_sequence_parallel,
)
from ditserve.services.denoiser.parallel.sharding import JointSequenceSharder

__all__ = [
    "LSE_KERNELS",
    "ByteCounter",
    "JointSequenceSharder",
    "SPConfig",
    "SPGroup",
    "SPMesh",
    "SequenceParallelAttention",
    "SequenceParallelFlux",
    "SequenceParallelFluxAttnProcessor",
    "SequenceParallelFluxExecutor",
    "build_mesh",
    "init_sequence_parallel",
    "lse_kernel",
    "math_attention_lse",
    "merge_partials",
    "ring_attention",
    "ulysses_attention",
    "usp_attention",
]

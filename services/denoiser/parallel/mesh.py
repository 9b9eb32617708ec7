"""Sequence-parallel process groups: the (ring, ulysses) mesh, and collectives that count their bytes.

A world of `ulysses * ring` ranks is laid out as a (ring, ulysses) mesh, row-major: global rank
`r * ulysses + u`. Ulysses groups are the rows (consecutive ranks, so on one host they are the GPUs that
share the fastest links: Ulysses' all-to-all is latency-bound and cannot overlap compute), ring groups the
columns. This is diffusers' ContextParallelConfig layout too (mesh dims "ring", "ulysses").

Every collective that sequence parallelism issues goes through SPGroup, so one ByteCounter per rank sees
them all. It records the bytes this rank sends to other ranks, which is what a link has to carry:
  all_to_all   input bytes * (G - 1) / G   (the rank's own chunk stays local)
  shift        input bytes                 (one point-to-point send to the next ring rank)
  all_gather   input bytes * (G - 1)       (NCCL's ring all-gather forwards G - 1 chunks)
  all_reduce   input bytes * 2 (G - 1) / G (NCCL's ring all-reduce: reduce-scatter + all-gather)
The first two are exact for any implementation; the last two are NCCL's ring algorithms (gloo's differ
but only the tiny output gather and the cache decision use them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


@dataclass(frozen=True)
class SPConfig:
    """Degrees of sequence parallelism: Ulysses (all-to-all over heads) times ring (K/V passed round)."""

    ulysses: int = 1
    ring: int = 1

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sequence parallel {name} degree must be an integer >= 1, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring

    def check_heads(self, heads: int) -> None:
        """Ulysses gives each rank heads / ulysses whole heads, so the split must be exact."""
        if heads % self.ulysses:
            raise ValueError(f"ulysses degree {self.ulysses} must divide the attention heads ({heads})")

    def __str__(self) -> str:
        return f"U{self.ulysses}xR{self.ring}"


@dataclass
class ByteCounter:
    """Bytes this rank sent to other ranks, and calls, per collective kind (see the module docstring)."""

    sent: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, nbytes: float) -> None:
        self.sent[kind] += round(nbytes)
        self.calls[kind] += 1

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {kind: {"bytes": self.sent[kind], "calls": self.calls[kind]} for kind in sorted(self.sent)}


class PendingShift:
    """A ring hop in flight: the send to the next rank and the receive from the previous one."""

    def __init__(self, requests: list[dist.Work], received: torch.Tensor) -> None:
        self._requests = requests
        self._received = received

    def wait(self) -> torch.Tensor:
        for request in self._requests:
            request.wait()
        return self._received


@dataclass(frozen=True)
class SPGroup:
    """One process group of the mesh, in ring order, with counted collectives; size 1 is the identity."""

    ranks: tuple[int, ...]  # global ranks, in the order the group's collectives use
    index: int  # this process's position in `ranks`
    group: dist.ProcessGroup | None
    counter: ByteCounter

    @property
    def size(self) -> int:
        return len(self.ranks)

    def all_to_all(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunks[j] goes to rank j; result[j] is what rank j sent here. Leading dim = group size."""
        if self.size == 1:
            return chunks
        chunks = chunks.contiguous()
        received = torch.empty_like(chunks)
        self.counter.add("all_to_all", _nbytes(chunks) * (self.size - 1) / self.size)
        dist.all_to_all_single(received, chunks, group=self.group)
        return received

    def shift(self, tensor: torch.Tensor) -> PendingShift:
        """Starts sending `tensor` to the next rank and receiving the previous rank's; wait() for it."""
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        following = self.ranks[(self.index + 1) % self.size]
        preceding = self.ranks[(self.index - 1) % self.size]
        self.counter.add("shift", _nbytes(tensor))
        requests = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, tensor, following, group=self.group),
                dist.P2POp(dist.irecv, received, preceding, group=self.group),
            ]
        )
        return PendingShift(requests, received)

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's tensor concatenated along `dim`, in group order."""
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self.counter.add("all_gather", _nbytes(tensor) * (self.size - 1))
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the group; every rank gets the same bits (the reduced result is broadcast)."""
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        self.counter.add("all_reduce", _nbytes(tensor) * 2 * (self.size - 1) / self.size)
        dist.all_reduce(tensor, group=self.group)
        return tensor


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class SPMesh:
    """This rank's view of the mesh: the whole world, its Ulysses row and its ring column."""

    config: SPConfig
    device: torch.device
    world: SPGroup
    ulysses: SPGroup
    ring: SPGroup
    counter: ByteCounter

    @property
    def rank(self) -> int:
        return self.world.index


def distributed_backend(device: torch.device) -> str:
    """NCCL between GPUs; gloo on CPU (NCCL has no CPU path)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_sequence_parallel(
    config: SPConfig,
    rank: int,
    device: torch.device,
    init_method: str = "env://",
    timeout: timedelta | None = None,
) -> SPMesh:
    """Joins the world of `config.world_size` ranks (gloo on CPU, NCCL on CUDA) and builds the mesh.

    `timeout` bounds every collective: a rank that stopped answering fails the others instead of hanging.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        distributed_backend(device),
        init_method=init_method,
        rank=rank,
        world_size=config.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    return build_mesh(config, device)


def build_mesh(config: SPConfig, device: torch.device) -> SPMesh:
    """The (ring, ulysses) mesh over an initialized world of exactly ulysses * ring ranks."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call init_sequence_parallel first")
    if dist.get_world_size() != config.world_size:
        raise ValueError(f"{config} needs a world of {config.world_size} ranks, got {dist.get_world_size()}")
    mesh = init_device_mesh(device.type, (config.ring, config.ulysses), mesh_dim_names=("ring", "ulysses"))
    counter = ByteCounter()
    rank = dist.get_rank()

    def group(process_group: dist.ProcessGroup | None) -> SPGroup:
        ranks = tuple(dist.get_process_group_ranks(process_group or dist.group.WORLD))
        return SPGroup(ranks, ranks.index(rank), process_group, counter)

    return SPMesh(
        config=config,
        device=device,
        world=group(None),
        ulysses=group(mesh["ulysses"].get_group()),
        ring=group(mesh["ring"].get_group()),
        counter=counter,
    )

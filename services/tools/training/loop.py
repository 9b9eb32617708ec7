"""The resumable training loop both default models share: one phase, checkpointed, deterministic.

A phase draws its batches from a numpy (data) and a torch (noise) generator and checkpoints both with
the weights, the optimizer and the losses every few minutes, atomically; a resumed run draws exactly
the batches the uninterrupted run would have, so the result depends on the seed alone (on a given
machine and thread count).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ditserve.services.tools.modelgen.tiny_flux import ensure_empty_dir

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Phase:
    """One phase's schedule: linear warm-up, then cosine decay to zero at the last step."""

    name: str
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    # bf16 autocast: pays only where the CPU has AMX (the VAE's convolutions); fp32 otherwise.
    bf16: bool

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class PhaseRunner:
    """What every phase of one training run shares: the seed, where and how often it checkpoints."""

    seed: int
    checkpoint_dir: Path
    every_s: float
    progress: bool
    device: torch.device

    def finished(self, phase: Phase) -> bool:
        """Whether phase's checkpoint is at its last step, so a resumed run can skip the phase's set-up
        (a transformer's latent pool takes minutes to encode)."""
        path = self.checkpoint_dir / f"{phase.name}.pt"
        return path.exists() and load_checkpoint(path)["step"] == phase.steps

    def run(
        self,
        phase: Phase,
        stream: int,
        model: torch.nn.Module,
        batch: Callable[[np.random.Generator, torch.Generator, int], Batch],
        loss: Callable[..., torch.Tensor],
    ) -> dict[str, Any]:
        """Trains model to phase.steps from its checkpoint (if any); returns the last checkpoint's state.

        The phase's generators are seeded with (seed, stream). batch draws step's data, without
        gradients and in fp32 (a curriculum may depend on the step); loss runs the model on it.
        The checkpoint is checkpoint_dir/<phase name>.pt.
        """
        path = self.checkpoint_dir / f"{phase.name}.pt"
        # fused: one kernel for all parameters instead of a dozen ops each; 1.1x a step for a transformer.
        optimizer = torch.optim.AdamW(model.parameters(), lr=phase.learning_rate, weight_decay=0.0, fused=True)
        data_rng = np.random.default_rng((self.seed, stream))
        noise_rng = torch.Generator().manual_seed(int(data_rng.integers(2**63)))
        state: dict[str, Any] = {"step": 0, "losses": []}
        if path.exists():
            state = load_checkpoint(path)
            if state["step"] > phase.steps:
                raise ValueError(
                    f"{path} is at step {state['step']}, past the {phase.steps} asked for; give a new checkpoint_dir"
                )
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            data_rng.bit_generator.state = state["data_rng"]
            noise_rng.set_state(state["noise_rng"])
        step, losses = state["step"], state["losses"]
        saved_at = time.monotonic()
        bar = tqdm(total=phase.steps, initial=step, desc=phase.name, unit="step", disable=not self.progress)
        with bar:
            while step < phase.steps:
                with torch.no_grad():
                    inputs = batch(data_rng, noise_rng, step)
                for group in optimizer.param_groups:
                    group["lr"] = phase.lr(step)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=phase.bf16):
                    value = loss(*inputs)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                step += 1
                losses.append(value.item())
                if step == phase.steps or time.monotonic() - saved_at >= self.every_s:
                    state = {
                        "step": step,
                        "seed": self.seed,  # export rebuilds the frozen text encoders from it
                        "losses": losses,
                        "config": dict(model.config),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "data_rng": data_rng.bit_generator.state,
                        "noise_rng": noise_rng.get_state(),
                    }
                    save_checkpoint(path, state)
                    saved_at = time.monotonic()
                    if self.progress:
                        bar.write(f"{phase.name}: step {step}, loss {np.mean(losses[-100:]):.4f}, saved {path}")
                bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", refresh=False)
                bar.update()
        return state


def start_run(
    out_dir: Path, checkpoint_dir: Path | None, seed: int, every_s: float, progress: bool, device: str, threads: int
) -> PhaseRunner:
    """Checks out_dir is absent or empty before any training, makes checkpoint_dir (default: out_dir's
    sibling "<name>.checkpoints", so rerunning the same command resumes) and sets the thread count the
    run is deterministic for."""
    ensure_empty_dir(Path(out_dir))
    checkpoint_dir = Path(checkpoint_dir or Path(out_dir).with_name(Path(out_dir).name + ".checkpoints"))
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    return PhaseRunner(seed, checkpoint_dir, every_s, progress, torch.device(device))


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a run killed mid-save leaves the previous checkpoint, never a torn one."""
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)

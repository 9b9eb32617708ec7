"""What a user would otherwise run: the model's own diffusers pipeline in one process, one runner per family.

The benches compare the services against this, so it does exactly a served request's work: the model
folder's defaults (size, frames, guidance, classic or true CFG with the empty negative prompt the gateway
sends), the same seed on a CPU generator, and the pixels the VAE service returns (uint8; raw frames for a
video family). A family's runner also says how to read the same array out of a served GenerateOutput, so a
bench can require the two to be identical before it compares their times.

`InProcessWorker` runs a runner in a child process with an environment of the bench's choosing: OpenMP
reads its wait policy once, when torch loads, so "diffusers at its defaults" and "diffusers under the
services' policy" need a process each. Tools import services here, never the reverse.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

# Variables that change how OpenMP threads wait or how many there are: a user running diffusers sets none.
THREADING_PREFIXES = ("OMP_", "GOMP_", "KMP_")


class Reference(Protocol):
    """One family's in-process pipeline at a model folder's defaults."""

    settings: dict[str, Any]  # PipelineClient.generate keywords asking the services for the same work

    def __call__(self, prompt: str, seed: int, num_images: int = 1) -> np.ndarray:
        """uint8 pixels: [n, height, width, 3] for images, [n, frames, height, width, 3] for video."""
        ...

    @staticmethod
    def served(output: Any) -> np.ndarray:
        """The same array out of a served GenerateOutput."""
        ...


class _PipelineReference:
    """The family's diffusers pipeline loaded as a user loads it, with the folder's request defaults."""

    pipeline_class: str  # in diffusers

    def __init__(self, model: Path, steps: int, pipe: Any = None) -> None:
        """`pipe`: an already built pipeline of the folder's components (bench real_scale builds random-weight
        ones on the device); by default the folder's own, loaded with from_pretrained."""
        import diffusers

        from ditserve.services.common.model import ModelFolder

        self.defaults = ModelFolder(model).defaults
        self.steps = steps
        if pipe is None:
            pipe = getattr(diffusers, self.pipeline_class).from_pretrained(model, local_files_only=True)
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.settings = self.served_settings(self.defaults, steps)

    @classmethod
    def served_settings(cls, defaults: Any, steps: int) -> dict[str, Any]:
        """PipelineClient.generate keywords asking the services for this reference's work."""
        return {"height": defaults.height, "width": defaults.width, "steps": steps}

    def call_settings(self, seed: int) -> dict[str, Any]:
        """The pipeline call's keywords both families take alike: the folder's defaults, the job's own noise."""
        import torch

        defaults = self.defaults
        return {
            "height": defaults.height,
            "width": defaults.width,
            "num_inference_steps": self.steps,
            "guidance_scale": defaults.guidance_scale,
            "max_sequence_length": defaults.max_sequence_length,
            "generator": torch.Generator("cpu").manual_seed(seed),
            "output_type": "np",
        }


class FluxReference(_PipelineReference):
    """FluxPipeline.from_pretrained as a user calls it, true CFG with negative prompt "" when the defaults use it."""

    pipeline_class = "FluxPipeline"

    def __call__(self, prompt: str, seed: int, num_images: int = 1) -> np.ndarray:
        true_cfg = self.defaults.true_cfg_scale
        images = self.pipe(
            prompt,
            negative_prompt="" if true_cfg > 1 else None,
            true_cfg_scale=true_cfg,
            num_images_per_prompt=num_images,
            **self.call_settings(seed),
        ).images
        return (images * 255).round().astype(np.uint8)

    @staticmethod
    def served(output: Any) -> np.ndarray:
        return np.stack([np.asarray(image) for image in output.images])


class WanReference(_PipelineReference):
    """WanPipeline.from_pretrained as a user calls it: classic CFG with negative prompt "", raw frames."""

    pipeline_class = "WanPipeline"

    @classmethod
    def served_settings(cls, defaults: Any, steps: int) -> dict[str, Any]:
        # the frames themselves: an MP4 is lossy and would differ from them
        return {**super().served_settings(defaults, steps), "num_frames": defaults.num_frames, "video_format": "raw"}

    def __call__(self, prompt: str, seed: int, num_images: int = 1) -> np.ndarray:
        frames = self.pipe(
            prompt,
            negative_prompt="",
            num_frames=self.defaults.num_frames,
            num_videos_per_prompt=num_images,
            **self.call_settings(seed),
        ).frames
        return (np.asarray(frames) * 255).round().astype(np.uint8)

    @staticmethod
    def served(output: Any) -> np.ndarray:
        return np.stack([np.stack([np.asarray(frame) for frame in video]) for video in output.videos])


REFERENCES: dict[str, type[FluxReference] | type[WanReference]] = {"flux": FluxReference, "wan": WanReference}


def family_of(model: Path) -> str:
    """The folder's family name (torch-free)."""
    from ditserve.services.common.model import ModelFolder
    from ditserve.services.families import family_name

    return family_name(ModelFolder(model))


def served_pixels(family: str, output: Any) -> np.ndarray:
    """A served GenerateOutput as the family's reference returns its pixels."""
    return REFERENCES[family].served(output)


def reference_for(model: Path, steps: int) -> Reference:
    """The in-process runner of the folder's family."""
    family = family_of(model)
    if family not in REFERENCES:
        raise SystemExit(f"no in-process reference for family {family!r} (known: {', '.join(REFERENCES)})")
    return REFERENCES[family](model, steps)


def user_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without the threading variables: diffusers at its defaults, as a user runs it."""
    base = dict(os.environ if base is None else base)
    return {key: value for key, value in base.items() if not key.startswith(THREADING_PREFIXES)}


def services_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `ditserve serve denoiser` runs in (client/config.py's services_openmp), where the heavy
    work is: an explicit policy wins."""
    from ditserve.client.config import services_openmp

    base = dict(os.environ if base is None else base)
    return {**base, **services_openmp(base)}


class InProcessWorker:
    """A Reference in a child process with its own environment; each call returns (seconds, pixels),
    the seconds being the pipeline call alone, timed in the child."""

    def __init__(self, model: Path, steps: int, env: dict[str, str]) -> None:
        command = [sys.executable, "-m", "ditserve.services.tools.bench.reference", "--model", str(model)]
        command += ["--steps", str(steps)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.settings: dict[str, Any] = self._receive()

    def __call__(self, prompt: str, seed: int, num_images: int = 1) -> tuple[float, np.ndarray]:
        assert self.process.stdin is not None
        pickle.dump((prompt, seed, num_images), self.process.stdin)
        self.process.stdin.flush()
        return self._receive()

    def _receive(self) -> Any:
        assert self.process.stdout is not None
        try:
            answer = pickle.load(self.process.stdout)
        except EOFError:
            raise RuntimeError(f"the in-process reference worker exited with {self.process.wait()}") from None
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> InProcessWorker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _serve(model: Path, steps: int, requests: BinaryIO, answers: BinaryIO) -> None:
    """The worker's loop: (prompt, seed, n) in, (seconds, pixels) out, until stdin closes."""
    try:
        reference = reference_for(model, steps)
    except Exception as error:  # the parent raises it
        pickle.dump(RuntimeError(f"{type(error).__name__}: {error}"), answers)
        answers.flush()
        return
    pickle.dump(reference.settings, answers)
    answers.flush()
    while True:
        try:
            prompt, seed, num_images = pickle.load(requests)
        except EOFError:
            return
        started = time.perf_counter()
        pixels = reference(prompt, seed, num_images)
        pickle.dump((time.perf_counter() - started, pixels), answers)
        answers.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever a library prints cannot corrupt the answers
    _serve(args.model, args.steps, sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()

"""The untimed quality pass of `ditserve bench cache`: every row over the quality prompts past the timed ones,
in worker processes, each cached row stopping at the first output that rules it out.

Where: a row's outputs are only ever compared with the uncached outputs of the same prompts, so they need
not be made where the timing was. With `workers` above 1 the pass runs in that many spawned processes, each
loading the model and its own harnesses once and taking rows one at a time, with the threads shared out
between them: on CPU the small models this bench runs on gain almost nothing from a second thread (0.67 s
an uncached shapes image with two, 0.70 s with one) and nearly 2x from a second process. With 1 it runs
here, on the harnesses the timing used.

Early stop: a cached row with an output below the rule's worst-output floor can never head the summary (its
worst over more prompts can only be lower), so it stops at the first one and reports its quality over the
outputs it made. The uncached rows (the baselines, the control, the fewer-steps rows) always make every
output, first: the others are measured against them, and the fewer-steps rows are the equal-compute
baseline. The cached rows then take the prompts most sensitive first, as the control row measured them
(the uncached image whose initial noise was nudged by 1%: the lower its PSNR, the nearer the prompt is to
flipping its image): on the shapes model the prompts that rule rows out are such prompts (the one that
ruled out 9 rows at its 130th place in the shuffled order is among the first 30 in this one), so those
rows stop after tens of outputs, not a hundred. A row that passes makes every output whatever the order.

Outputs come back decoded (pixels), so the VAE work is shared out too.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ditserve.services.tools.bench.cache_rows import BASELINES, UNCACHED, Row
from ditserve.services.tools.bench.image_metrics import psnr

if TYPE_CHECKING:
    from ditserve.services.tools.bench.cache_harness import OurHarness, PipelineHarness
    from ditserve.services.tools.local_model import LocalModel
    from ditserve.v1.encoder_pb2 import PromptEmbedding


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build what the main process built: the model and the harnesses' settings."""

    folder: str
    device: str
    dtype: str
    steps: int
    mag_ratios: list[float] | None
    threads: int


@dataclass
class Scored:
    """A row's outputs by prompt index (all of them, or up to the one that stopped it), in the order run."""

    pixels: dict[int, np.ndarray] = field(default_factory=dict)
    skipped: list[float] = field(default_factory=list)


def stop_floor(row: Row, floor: float) -> float | None:
    """The worst-output floor a row stops at, or None for the rows that always make every output."""
    return None if row.method in UNCACHED else floor


def rules_out(own: Sequence[np.ndarray], reference: Sequence[np.ndarray], floor: float | None) -> bool:
    """True when any output is below the floor against its uncached output: the row cannot pass."""
    return floor is not None and any(psnr(a, b) < floor for a, b in zip(own, reference, strict=True))


def most_sensitive_first(control: dict[int, np.ndarray], reference: dict[int, np.ndarray]) -> list[int]:
    """Prompt indices by the control's PSNR against uncached, lowest first (ties: in index order)."""
    return sorted(reference, key=lambda index: (psnr(control[index], reference[index]), index))


class Scorer:
    """Runs one row over prompts on a model and its harnesses, stopping as `rules_out` says."""

    def __init__(self, model: LocalModel, harnesses: dict[str, OurHarness | PipelineHarness]) -> None:
        self.model = model
        self.harnesses = harnesses
        self.encoded: dict[str, PromptEmbedding] = {}

    def _encode(self, prompt: str) -> PromptEmbedding:
        if prompt not in self.encoded:
            self.encoded[prompt] = self.model.encode(prompt)
        return self.encoded[prompt]

    def score(
        self,
        row: Row,
        prompts: Sequence[tuple[str, int]],
        order: Sequence[int],
        reference: dict[int, np.ndarray],
        floor: float | None,
    ) -> Scored:
        """The row's outputs for prompts[i], i in `order`, until one is under `floor` against `reference`."""
        harness = self.harnesses[row.harness]
        scored = Scored()
        harness.install(row)
        try:
            for index in order:
                prompt, seed = prompts[index]
                _, latents, skipped = harness.run(row, self._encode(prompt), seed)
                scored.pixels[index] = self.model.pixels(latents)
                scored.skipped.append(skipped)
                if floor is not None and rules_out([scored.pixels[index]], [reference[index]], floor):
                    break
        finally:
            harness.uninstall(row)
        return scored


_WORKER: dict[str, Scorer] = {}


def _start_worker(spec: ModelSpec) -> None:
    import torch

    from ditserve.services.common.model import ModelFolder
    from ditserve.services.tools.bench.cache_harness import OurHarness, PipelineHarness
    from ditserve.services.tools.local_model import LocalModel

    torch.set_num_threads(spec.threads)
    model = LocalModel.open(ModelFolder(spec.folder), spec.device, spec.dtype)
    pipelines = PipelineHarness(model, spec.steps)
    pipelines.mag_ratios = spec.mag_ratios
    ours = OurHarness(model, spec.steps, spec.mag_ratios)
    _WORKER["scorer"] = Scorer(model, {"ours": ours, "pipeline": pipelines})


def _score_in_worker(*arguments: Any) -> Scored:
    """Scorer.score, in a worker: its arguments as submitted."""
    return _WORKER["scorer"].score(*arguments)


def _lean(row: Row) -> Row:
    """The row's configuration without what the timing measured: all a worker needs."""
    return dataclasses.replace(row, seconds=[], latents=[], skipped=[])


def score_rows(
    rows: list[Row],
    prompts: Sequence[tuple[str, int]],
    timed: dict[str, list[np.ndarray]],
    floor: float,
    scorer: Scorer,
    spec: ModelSpec,
    workers: int,
) -> tuple[dict[str, Scored], dict[str, Exception]]:
    """Each row's outputs over `prompts` and the rows that failed: the baselines first, then the other
    uncached rows, then the cached ones, most sensitive prompt first. `timed`: each row's pixels on the timed
    prompts; a row already ruled out there makes nothing more."""
    baselines = [row for row in rows if row.name in BASELINES.values()]
    uncached = [row for row in rows if row.method in UNCACHED and row not in baselines]
    cached = [row for row in rows if row.method not in UNCACHED]
    done: dict[str, Scored] = {}
    failed: dict[str, Exception] = {}
    bar = tqdm(total=len(rows), desc="quality prompts", unit="row")

    def collect(futures: dict[Future[Scored], Row]) -> None:
        for future in as_completed(futures):
            bar.update()
            try:
                done[futures[future].name] = future.result()
            except Exception as error:
                failed[futures[future].name] = error

    def reference(row: Row) -> dict[int, np.ndarray]:
        name = BASELINES[row.harness]
        return done[name].pixels if name in done else {}

    def order() -> list[int]:
        control = next((row for row in uncached if row.method == "control" and row.name in done), None)
        if control is None:
            return list(range(len(prompts)))
        return most_sensitive_first(done[control.name].pixels, reference(control))

    def jobs(group: list[Row], submit: Any) -> dict[Any, Row]:
        futures = {}
        run_order = order()
        for row in group:
            floor_ = stop_floor(row, floor)
            if rules_out(timed[row.name], timed[BASELINES[row.harness]], floor_):
                done[row.name] = Scored()
                bar.update()
            else:
                futures[submit(row, prompts, run_order, reference(row), floor_)] = row
        return futures

    if workers <= 1:
        for group in (baselines, uncached, cached):
            collect(jobs(group, lambda row, *args: _done(scorer.score, row, *args)))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(spec,)) as pool:
            for group in (baselines, uncached, cached):
                collect(jobs(group, lambda row, *args: pool.submit(_score_in_worker, _lean(row), *args)))
    bar.close()
    return done, failed


def _done(score: Any, *args: Any) -> Future[Scored]:
    """Runs here, now, as a finished future: the in-process pass shares the pool's bookkeeping."""
    future: Future[Scored] = Future()
    try:
        future.set_result(score(*args))
    except Exception as error:
        future.set_exception(error)
    return future

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
output: the others are measured against them, and the fewer-steps rows are the equal-compute baseline.

Outputs come back decoded (pixels), so the VAE work is shared out too.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
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
    """A row's outputs over the prompts it ran (all of them, or up to the one that stopped it)."""

    pixels: list[np.ndarray]
    skipped: list[float]


def stop_floor(row: Row, floor: float) -> float | None:
    """The worst-output floor a row stops at, or None for the rows that always make every output."""
    return None if row.method in UNCACHED else floor


def rules_out(own: Sequence[np.ndarray], reference: Sequence[np.ndarray], floor: float | None) -> bool:
    """True when any output is below the floor against its uncached output: the row cannot pass."""
    return floor is not None and any(psnr(a, b) < floor for a, b in zip(own, reference, strict=False))


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
        self, row: Row, prompts: Sequence[tuple[str, int]], reference: Sequence[np.ndarray], floor: float | None
    ) -> Scored:
        harness = self.harnesses[row.harness]
        scored = Scored([], [])
        harness.install(row)
        try:
            for index, (prompt, seed) in enumerate(prompts):
                _, latents, skipped = harness.run(row, self._encode(prompt), seed)
                scored.pixels.append(self.model.pixels(latents))
                scored.skipped.append(skipped)
                if rules_out(scored.pixels[-1:], reference[index : index + 1], floor):
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
    _WORKER["scorer"] = Scorer(model, {"ours": OurHarness(model, spec.steps), "pipeline": pipelines})


def _score_in_worker(
    row: Row, prompts: Sequence[tuple[str, int]], reference: Sequence[np.ndarray], floor: float | None
) -> Scored:
    return _WORKER["scorer"].score(row, prompts, reference, floor)


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
    """Each row's outputs over `prompts` (the baselines' first: the others stop against them), and the rows
    that failed. `timed`: each row's pixels on the timed prompts; a row already ruled out there stops now."""
    baselines = [row for row in rows if row.name in BASELINES.values()]
    others = [row for row in rows if row.name not in BASELINES.values()]
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

    def reference(row: Row) -> list[np.ndarray]:
        name = BASELINES[row.harness]
        return done[name].pixels if name in done else []

    def ruled_out_when_timed(row: Row) -> bool:
        return rules_out(timed[row.name], timed[BASELINES[row.harness]], stop_floor(row, floor))

    def jobs(rows_: list[Row], submit: Any) -> dict[Any, Row]:
        futures = {}
        for row in rows_:
            if ruled_out_when_timed(row):
                done[row.name] = Scored([], [])
                bar.update()
            else:
                futures[submit(row, prompts, reference(row), stop_floor(row, floor))] = row
        return futures

    if workers <= 1:
        for group in (baselines, others):
            collect(jobs(group, lambda row, *args: _done(scorer.score, row, *args)))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(spec,)) as pool:
            for group in (baselines, others):
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

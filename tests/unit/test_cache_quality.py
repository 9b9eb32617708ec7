"""The cache bench's quality pass: which rows stop early, and a real in-process pass on the shipped model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ditserve.services.common.model import ModelFolder
from ditserve.services.denoiser.cache.policy import CacheConfig, TeaCacheConfig
from ditserve.services.tools.bench.cache_harness import OurHarness, PipelineHarness
from ditserve.services.tools.bench.cache_quality import (
    ModelSpec,
    Scorer,
    most_sensitive_first,
    rules_out,
    score_rows,
    stop_floor,
)
from ditserve.services.tools.bench.cache_rows import Row
from ditserve.services.tools.local_model import LocalModel

FLOOR = 20.0


def test_only_cached_rows_stop() -> None:
    assert stop_floor(Row("ours/none", "ours", "none"), FLOOR) is None
    assert stop_floor(Row("ours/none nudged", "ours", "control"), FLOOR) is None
    assert stop_floor(Row("ours/fewer-steps 9", "ours", "fewer-steps", steps=9), FLOOR) is None
    assert stop_floor(Row("ours/teacache t=0.4", "ours", "teacache"), FLOOR) == FLOOR


def test_one_output_under_the_floor_rules_a_row_out() -> None:
    rng = np.random.default_rng(0)
    reference = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    close = [image.copy() for image in reference]
    close[1][0, 0, 0] ^= 1  # one level in one pixel: far above any floor
    assert not rules_out(close, reference, FLOOR)
    ruined = [*close[:2], 255 - reference[2]]
    assert rules_out(ruined, reference, FLOOR)
    assert not rules_out(ruined, reference, None)  # an uncached row never stops


def test_the_prompts_the_control_moved_most_come_first() -> None:
    reference = {i: np.full((8, 8, 3), 100, dtype=np.uint8) for i in range(4)}
    control = {i: image.copy() for i, image in reference.items()}
    control[2][:4] = 110  # moved most
    control[0][:1] = 103
    control[3][:1] = 103  # as much as prompt 0: the earlier index first
    assert most_sensitive_first(control, reference) == [2, 0, 3, 1]


STEPS = 28
PROMPTS = [("a red circle on a blue background", 0), ("a green square on a white background", 1)]


@pytest.fixture(scope="module")
def scorer(model_dir: Path) -> Scorer:
    model = LocalModel.open(ModelFolder(model_dir), "cpu", "fp32")
    return Scorer(model, {"ours": OurHarness(model, STEPS), "pipeline": PipelineHarness(model, STEPS)})


def test_a_ruinous_cache_stops_at_its_first_output_and_a_baseline_never_does(scorer: Scorer) -> None:
    """In this process (1 worker), on the shipped model: TeaCache at 0.8 skips most steps, far under 20 dB."""
    rows = [
        Row("ours/none", "ours", "none"),
        Row("diffusers/none", "diffusers", "none"),
        Row("ours/teacache t=0.8", "ours", "teacache", CacheConfig(TeaCacheConfig(0.8))),
        Row("ours/fewer-steps 3", "ours", "fewer-steps", steps=3),
        Row("ours/none nudged", "ours", "control"),
    ]
    spec = ModelSpec("unused in this process", "cpu", "fp32", STEPS, None, threads=1)
    timed = {row.name: [] for row in rows}  # no timed prompts: the pass decides on its own outputs
    done, failed = score_rows(rows, PROMPTS, timed, FLOOR, scorer, spec, workers=1)
    assert not failed
    assert len(done["ours/none"].pixels) == len(done["diffusers/none"].pixels) == len(PROMPTS)
    assert np.array_equal(done["ours/none"].pixels[0], done["diffusers/none"].pixels[0])  # the same loop
    # the cached row ran the prompt the control moved most first, and stopped there
    first = most_sensitive_first(done["ours/none nudged"].pixels, done["ours/none"].pixels)[0]
    assert list(done["ours/teacache t=0.8"].pixels) == [first] and done["ours/teacache t=0.8"].skipped[0] > 0.5
    fewer = done["ours/fewer-steps 3"].pixels
    assert len(fewer) == len(PROMPTS)  # far under the floor, yet it never stops
    assert rules_out([fewer[i] for i in range(len(PROMPTS))], [done["ours/none"].pixels[i] for i in range(2)], FLOOR)


def test_a_row_ruled_out_on_the_timed_prompts_makes_nothing_more(scorer: Scorer) -> None:
    rows = [Row("ours/none", "ours", "none"), Row("ours/teacache t=0.8", "ours", "teacache")]
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    timed = {"ours/none": [image], "ours/teacache t=0.8": [255 - image]}
    spec = ModelSpec("unused in this process", "cpu", "fp32", STEPS, None, threads=1)
    done, _ = score_rows(rows, PROMPTS[:1], timed, FLOOR, scorer, spec, workers=1)
    assert done["ours/teacache t=0.8"].pixels == {} and len(done["ours/none"].pixels) == 1

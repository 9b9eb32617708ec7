"""Both CFG branches of a batch in one transformer call (runner.py): one call per step instead of two,
each sample as it would be alone within the batched tolerance, step caches deciding per branch as alone;
a sample alone keeps the pipeline's two calls unless --joint-cfg always. The shipped models, in process
(no services needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TOLERANCE_BATCHED

from ditserve.services.common.model import ModelFolder
from ditserve.services.denoiser.cache.policy import CacheConfig, DBCacheConfig, SCMConfig, TeaCacheConfig
from ditserve.services.denoiser.job import DenoiseJob
from ditserve.services.denoiser.runner import Trajectory, join_branches
from ditserve.services.tools.local_model import LocalModel

pytestmark = pytest.mark.integration

STEPS = 6
PROMPTS = ("a red circle on a blue background", "a green square on a white background moving left")


@pytest.fixture(scope="module", params=["image", "video"])
def model(request: pytest.FixtureRequest, model_dir: Path, video_model_dir: Path) -> LocalModel:
    folder = ModelFolder(model_dir if request.param == "image" else video_model_dir)
    return LocalModel(folder, torch.device("cpu"), torch.float32)


def start(model: LocalModel, samples: list[int], cache: CacheConfig | None) -> list[Trajectory]:
    """A trajectory per sample: prompt PROMPTS[i], seed i."""
    return [
        model.runner.start(DenoiseJob(f"s{i}", model.inputs(model.encode(PROMPTS[i]), i, STEPS, cache), STEPS))
        for i in samples
    ]


def denoise(model: LocalModel, samples: list[int], cache: CacheConfig | None) -> tuple[list[torch.Tensor], int, list]:
    """The samples' final latents stepped as one batch, the transformer calls it took, their step patterns."""
    calls: list[int] = []
    hook = model.runner.executor.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        trajectories = start(model, samples, cache)
        assert all(t.has_negative for t in trajectories), "the shipped models' defaults use CFG"
        for _ in range(STEPS):
            assert model.runner.step(trajectories) == [None] * len(trajectories)
    finally:
        hook.remove()
    return [t.result() for t in trajectories], len(calls), [t.computed_steps() for t in trajectories]


def test_a_batch_makes_one_call_per_step_for_both_branches(model: LocalModel) -> None:
    (alone_0,), solo_calls, _ = denoise(model, [0], None)
    (alone_1,), _, _ = denoise(model, [1], None)
    together, batch_calls, _ = denoise(model, [0, 1], None)
    assert solo_calls == 2 * STEPS  # alone: the pipeline's call per branch
    assert batch_calls == STEPS
    for alone, batched in zip((alone_0, alone_1), together, strict=True):
        assert (alone - batched).abs().max() <= TOLERANCE_BATCHED
    assert (together[0] - together[1]).abs().max() > 0.1  # two different samples, not one twice


@pytest.mark.parametrize(
    "cache",
    [
        CacheConfig(teacache=TeaCacheConfig(threshold=10.0)),
        CacheConfig(dbcache=DBCacheConfig(fn=1, residual_diff_threshold=1.0, max_warmup_steps=1)),
        CacheConfig(
            dbcache=DBCacheConfig.whole_step(SCMConfig(compute_bins=(2, 1, 1), cache_bins=(1, 1), policy="static"))
        ),
    ],
    ids=["teacache", "dbcache", "whole-step"],
)
def test_each_branch_caches_in_a_joint_call_as_it_would_alone(model: LocalModel, cache: CacheConfig) -> None:
    solo = [denoise(model, [i], cache) for i in (0, 1)]
    together, _, patterns = denoise(model, [0, 1], cache)
    assert patterns == [solo[0][2][0], solo[1][2][0]]
    assert any("0" in pattern for found in patterns for pattern in found.values()), "nothing was cached"
    for (alone,), batched in zip((s[0] for s in solo), together, strict=True):
        assert (alone - batched).abs().max() <= TOLERANCE_BATCHED


def test_join_branches_concatenates_rows_and_refuses_what_cannot_share_a_call() -> None:
    ids = torch.zeros(16, 3)
    cond = {"hidden_states": torch.ones(2, 4, 8), "txt_ids": ids, "guidance": None}
    uncond = {"hidden_states": torch.zeros(2, 4, 8), "txt_ids": ids.clone(), "guidance": None}
    joined = join_branches(cond, uncond, frozenset({"txt_ids"}))
    assert joined is not None and joined["guidance"] is None and joined["txt_ids"] is ids
    assert torch.equal(joined["hidden_states"], torch.cat([torch.ones(2, 4, 8), torch.zeros(2, 4, 8)]))
    longer = {**uncond, "hidden_states": torch.zeros(2, 5, 8)}  # e.g. a negative prompt of another length
    assert join_branches(cond, longer, frozenset({"txt_ids"})) is None
    moved = {**uncond, "txt_ids": ids + 1}
    assert join_branches(cond, moved, frozenset({"txt_ids"})) is None


def test_a_batch_retried_alone_after_its_call_failed_is_not_marked_batched(model: LocalModel) -> None:
    """`batched` (what lets the VAE join a decode) means a shared call moved the latents; a batch whose
    call raised is retried one trajectory at a time, so its first step stays a solo run's."""
    trajectories = start(model, [0, 1], None)
    failed: list[int] = []

    def fail_once_batched(_module: object, _args: object, kwargs: dict) -> None:
        if kwargs["hidden_states"].shape[0] > 1 and not failed:
            failed.append(1)
            raise RuntimeError("a batched call failed")

    hook = model.runner.executor.transformer.register_forward_pre_hook(fail_once_batched, with_kwargs=True)
    try:
        assert model.runner.step(trajectories) == [None, None]
    finally:
        hook.remove()
    assert failed and [t.batched for t in trajectories] == [False, False]
    assert model.runner.step(trajectories) == [None, None]
    assert [t.batched for t in trajectories] == [True, True]


def test_joint_cfg_always_gives_a_request_alone_one_call_per_step(model: LocalModel) -> None:
    """--joint-cfg always: a request alone takes the batch's one call for both branches, within the
    batched tolerance of its bit-exact two-call run. It shared no call with another request, so it is not
    marked batched: its decode does not wait for others to join it."""
    (split,), split_calls, _ = denoise(model, [0], None)
    model.runner.joint_cfg_alone = True
    try:
        (joint,), joint_calls, _ = denoise(model, [0], None)
        (trajectory,) = start(model, [0], None)
        assert model.runner.step([trajectory]) == [None]
    finally:
        model.runner.joint_cfg_alone = False
    assert (split_calls, joint_calls) == (2 * STEPS, STEPS)
    assert (split - joint).abs().max() <= TOLERANCE_BATCHED
    assert not trajectory.batched

"""Step caching through a real denoiser: per request, per CFG branch, exact when off."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from factories import cpu_denoiser
from google.protobuf import json_format
from helpers import TOLERANCE_BATCHED, embedding, latents_of, request, sample, wait_for

from ditserve.client.stub import StageClient
from ditserve.services.common import tensor_codec
from ditserve.services.common.errors import StartupError
from ditserve.services.common.model import SIDECAR, ModelFolder
from ditserve.services.common.server import ServerOptions, start_server
from ditserve.services.denoiser.cache.policy import COEFFICIENTS_KEY, mask_bins
from ditserve.services.denoiser.cache.step_masks import STEP_MASKS_KEY, mask_text, stored_masks
from ditserve.services.denoiser.cache.wire import cache_config
from ditserve.v1 import cache_pb2, denoiser_pb2

pytestmark = pytest.mark.integration
STEPS = 12


def policy(text: str) -> cache_pb2.CachePolicy:
    return json_format.Parse(text, cache_pb2.CachePolicy())


def _result(stage: object, message: denoiser_pb2.DenoiseRequest) -> denoiser_pb2.DenoiseResult:
    return list(stage.denoiser.Denoise(message, timeout=120))[-1].result


@pytest.mark.parametrize(
    "exact",
    [
        '{"none": {}}',
        '{"teacache": {"threshold": 0}}',
        '{"teacache": {"threshold": 0, "taylorseer": {"order": 2}}}',
        '{"dbcache": {"residual_diff_threshold": 0}}',
    ],
)
def test_policies_that_never_cache_are_bit_exact(denoisers: dict, exact: str) -> None:
    """The diffusers three-run check: off, on (but never skipping), off again."""
    _, stage = denoisers["off"]
    off = latents_of(stage, request(1, STEPS))
    on = _result(stage, request(1, STEPS, cache=policy(exact)))
    again = latents_of(stage, request(1, STEPS))
    assert np.array_equal(tensor_codec.decode(on.latents).numpy(), off)
    assert np.array_equal(again, off)
    assert set("".join(on.timing.computed_steps.values())) <= {"1"}


def test_caching_skips_steps_and_reports_them(denoisers: dict) -> None:
    server, stage = denoisers["off"]
    before = sample(wait_for(server.metrics_port, "ditserve_requests_total", 0), "ditserve_cache_steps_total")
    result = _result(stage, request(2, STEPS, cache=policy('{"teacache": {"threshold": 0.6}}')))
    pattern = result.timing.computed_steps["cond"]
    assert len(pattern) == STEPS and pattern[0] == pattern[-1] == "1" and "0" in pattern
    metrics = wait_for(server.metrics_port, "ditserve_cache_steps_total", before + STEPS)
    assert sample(metrics, "ditserve_cache_steps_total", policy="teacache", outcome="cached") >= pattern.count("0")


def test_cfg_branches_decide_on_their_own(denoisers: dict) -> None:
    _, stage = denoisers["off"]
    message = request(3, STEPS, cache=policy('{"dbcache": {"residual_diff_threshold": 0.3}}'))
    message.negative_prompt.CopyFrom(embedding(33))
    message.true_cfg_scale = 4.0
    steps = _result(stage, message).timing.computed_steps
    assert set(steps) == {"cond", "uncond"} and all(len(s) == STEPS for s in steps.values())


def test_a_batch_mixing_policies_gives_each_request_its_solo_image(denoisers: dict) -> None:
    _, solo = denoisers["off"]
    _, batched = denoisers["continuous"]
    messages = [
        request(10, STEPS),
        request(11, STEPS, cache=policy('{"teacache": {"threshold": 0.5}}')),
        request(
            12,
            STEPS,
            cache=policy('{"dbcache": {"residual_diff_threshold": 0.4, "taylorseer": {"order": 2}}}'),
        ),
        request(13, STEPS, cache=policy('{"dbcache": {"scm": {"preset": "fast", "policy": "static"}}}')),
        request(
            14,
            STEPS,
            cache=policy(
                '{"dbcache": {"fn": 0, "taylorseer": {"order": 1}, "scm": {"preset": "ultra", "policy": "static"}}}'
            ),
        ),
    ]
    alone = [latents_of(solo, message) for message in messages]
    with concurrent.futures.ThreadPoolExecutor(len(messages)) as pool:
        together = list(pool.map(lambda message: latents_of(batched, message), messages))
    for a, b in zip(alone, together, strict=True):
        assert np.abs(a - b).max() <= TOLERANCE_BATCHED


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"teacache": {"threshold": -1}}', "cache.teacache.threshold"),
        ('{"dbcache": {"fn": 0}}', "cache.dbcache.fn"),
        ('{"dbcache": {"fn": 5, "bn": 1}}', "cache.dbcache.fn"),
        ('{"dbcache": {"taylorseer": {"order": 3}}}', "cache.dbcache.taylorseer.order"),
        ('{"teacache": {"taylorseer": {"order": 0}}}', "cache.teacache.taylorseer.order"),
        ('{"dbcache": {"scm": {"preset": "warp"}}}', "cache.dbcache.scm.preset"),
        ('{"teacache": {"coefficients": [1, 2]}}', "cache.teacache.coefficients"),
    ],
)
def test_invalid_policies_name_the_field(denoisers: dict, text: str, field: str) -> None:
    _, stage = denoisers["off"]
    with pytest.raises(grpc.RpcError) as caught:
        _result(stage, request(4, STEPS, cache=policy(text)))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field)


def test_teacache_defaults_to_the_models_calibrated_coefficients(
    denoisers: dict, model_dir: Path, tmp_path: Path
) -> None:
    """Coefficients stored by `ditserve calibrate teacache` are what a request without its own gets."""
    folder = tmp_path / "calibrated"
    shutil.copytree(model_dir, folder)
    sidecar = json.loads((folder / SIDECAR).read_text())
    # A polynomial that is 0 everywhere: nothing accumulates, so only the forced steps compute.
    (folder / SIDECAR).write_text(json.dumps({**sidecar, COEFFICIENTS_KEY: [0.0] * 5}))
    server = start_server(cpu_denoiser(folder), ServerOptions(port=0, metrics_port=0))
    client = StageClient(f"127.0.0.1:{server.port}")
    teacache = policy('{"teacache": {"threshold": 0.5}}')
    try:
        calibrated = _result(client, request(5, STEPS, cache=teacache)).timing.computed_steps["cond"]
    finally:
        client.close()
        server.stop(grace=1)
    shipped = _result(denoisers["off"][1], request(5, STEPS, cache=teacache)).timing.computed_steps["cond"]
    assert calibrated == "1" + "0" * (STEPS - 2) + "1"
    assert shipped.count("1") > 2


def whole_step(scm: dict) -> cache_pb2.CachePolicy:
    return policy(json.dumps({"dbcache": {"fn": 0, "bn": 0, "taylorseer": {"order": 1}, "scm": scm}}))


def calibrated(computed: int) -> cache_pb2.CachePolicy:
    return whole_step({"preset": "calibrated", "computed_steps": computed, "policy": "static"})


def test_a_calibrated_mask_is_the_one_stored_with_the_model(denoisers: dict, model_dir: Path) -> None:
    """Preset "calibrated" serves the mask `ditserve calibrate step-mask` stored, as if sent as bins."""
    folder = ModelFolder(model_dir)
    steps = folder.defaults.steps
    mask = stored_masks(folder.sidecar)[steps][9]
    compute, cache = mask_bins(mask)
    _, stage = denoisers["off"]

    by_name = _result(stage, request(6, steps, cache=calibrated(9)))
    as_bins = _result(
        stage,
        request(6, steps, cache=whole_step({"compute_bins": compute, "cache_bins": cache, "policy": "static"})),
    )

    assert by_name.timing.computed_steps["cond"] == mask_text(mask)
    assert np.array_equal(tensor_codec.decode(by_name.latents).numpy(), tensor_codec.decode(as_bins.latents).numpy())


@pytest.mark.parametrize(
    ("steps", "computed", "field"),
    [(STEPS, 9, "cache.dbcache.scm.preset"), (None, 40, "cache.dbcache.scm.computed_steps")],
)
def test_a_calibrated_mask_the_model_lacks_is_refused(
    denoisers: dict, model_dir: Path, steps: int | None, computed: int, field: str
) -> None:
    _, stage = denoisers["off"]
    message = request(7, steps or ModelFolder(model_dir).defaults.steps, cache=calibrated(computed))
    with pytest.raises(grpc.RpcError) as caught:
        _result(stage, message)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field)


def test_a_calibrated_mask_asked_with_another_forecast_is_refused(denoisers: dict, model_dir: Path) -> None:
    """The shipped image model's masks were searched for TaylorSeer order 1; without it they lose quality."""
    _, stage = denoisers["off"]
    scm = {"preset": "calibrated", "computed_steps": 9, "policy": "static"}
    plain_reuse = policy(json.dumps({"dbcache": {"fn": 0, "bn": 0, "scm": scm}}))
    with pytest.raises(grpc.RpcError) as caught:
        _result(stage, request(8, ModelFolder(model_dir).defaults.steps, cache=plain_reuse))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("cache.dbcache.taylorseer: the model's calibrated masks for 28 steps")


def test_a_default_calibrated_policy_needs_the_models_masks(model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "uncalibrated"
    shutil.copytree(model_dir, folder)
    sidecar = json.loads((folder / SIDECAR).read_text())
    (folder / SIDECAR).write_text(json.dumps({k: v for k, v in sidecar.items() if k != STEP_MASKS_KEY}))
    default = cache_config(calibrated(9), "--cache-policy")
    with pytest.raises(StartupError, match=r"--cache-policy\.dbcache\.scm\.preset: the model has no calibrated masks"):
        cpu_denoiser(folder, cache=default)

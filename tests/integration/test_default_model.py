"""The shipped default model is a trained one: small safetensors, loads in FluxPipeline and the services,
and draws what it is told (the fidelity judge of eval/fidelity.py, on a quick seeded prompt set)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ditserve.client.config import DEFAULT_MODEL_NAME
from ditserve.client.stub import PipelineClient
from ditserve.services.common.model import ModelFolder
from ditserve.services.tools.eval.fidelity import score_batch
from ditserve.services.tools.training.evaluate import evaluation_prompts, generate_images, vae_quality

pytestmark = pytest.mark.integration

QUICK_PROMPTS = 30
QUICK_FLOOR = 0.80
MAX_MODEL_BYTES = 30 * 2**20


@pytest.fixture(scope="module")
def quick_prompts() -> list[str]:
    return evaluation_prompts(QUICK_PROMPTS)


def test_the_default_is_the_trained_model_in_safetensors(model_dir: Path) -> None:
    assert model_dir.name == DEFAULT_MODEL_NAME == "shapes-flux"
    files = [path for path in model_dir.rglob("*") if path.is_file()]
    weights = [path for path in files if path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(path.suffix == ".safetensors" for path in weights)
    assert sum(path.stat().st_size for path in files) <= MAX_MODEL_BYTES
    assert ModelFolder(model_dir).defaults.true_cfg_scale > 1  # trained with empty-prompt dropout for CFG


def test_flux_pipeline_draws_the_quick_prompts(model_dir: Path, quick_prompts: list[str]) -> None:
    images = generate_images(model_dir, quick_prompts, seed=100)
    assert score_batch(images, quick_prompts)["all"] >= QUICK_FLOOR


def test_the_services_draw_the_quick_prompts_with_the_models_defaults(stack: object, quick_prompts: list[str]) -> None:
    """No settings in the request: the gateway must find the model's true CFG default on its own."""
    with PipelineClient(stack.gateway) as client:
        images = [client.generate(prompt, seed=200 + i).images[0] for i, prompt in enumerate(quick_prompts)]
    assert {image.size for image in images} == {(64, 64)}
    assert score_batch(images, quick_prompts)["all"] >= QUICK_FLOOR


def test_the_vae_is_sharp_enough_for_the_judge(model_dir: Path) -> None:
    quality = vae_quality(model_dir, n=64)
    assert quality["vae_psnr_db"] >= 28.0
    assert quality["scorer_on_reconstructions"]["all"] >= 0.95

"""--compile and --quantize through the four services on the shipped model, against the same stack eager.

One stack; its denoiser restarts with each flag (encoder, VAE and the request stay the same), so every
difference in the image comes from the denoiser's transformer. Tolerances, on uint8 images at 6 steps:
- compile: at most 2/255 per pixel. Inductor fuses and reorders fp32 arithmetic; the latents of compiled
  and eager steps differ by about 1e-6, which flips a rounding at most by one level here and there.
- int8-weight: PSNR at least 30 dB against eager (bench/results/optimize.json measures it on the fidelity
  prompts at 28 steps); a wrong scale or a dequantization bug lands far below that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from factories import cpu_denoiser
from helpers import sample, scrape

from ditserve.client import PipelineClient
from ditserve.client.launcher import Ports, Stack
from ditserve.client.stub import StageClient
from ditserve.services.common.errors import StartupError
from ditserve.services.tools.bench.image_metrics import psnr
from ditserve.v1 import common_pb2

# A minute and more of set-up (CPU compilation of the denoiser): make test-slow, which CI runs.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = "a red circle on a blue background"
STEPS = 6
COMPILE_MAX_PIXEL_DIFF = 2
INT8_MIN_PSNR_DB = 30.0
VARIANTS = {"eager": [], "compile": ["--compile"], "int8-weight": ["--quantize", "int8-weight"]}


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """variant -> its image, its denoiser's Info details and /metrics text."""
    logs = tmp_path_factory.mktemp("compile-quantize-logs")
    stack = Stack(model=model_dir, ports=Ports.free(), log_dir=logs)
    stack.start(timeout=180)
    results: dict[str, dict] = {}
    try:
        for name, flags in VARIANTS.items():
            if flags:  # CPU compilation under a loaded CI machine can take minutes
                stack.restart_role("denoiser", flags, timeout=900)
                stack.restart_role("gateway")
            with PipelineClient(stack.gateway) as client:
                image = np.asarray(client.generate(PROMPT, steps=STEPS, seed=1).images[0])
            denoiser = StageClient(stack.ports.address("denoiser"))
            try:
                details = dict(denoiser.admin.Info(common_pb2.InfoRequest(), timeout=10).details)
            finally:
                denoiser.close()
            results[name] = {"image": image, "details": details, "metrics": scrape(stack.ports.metrics["denoiser"])}
    finally:
        codes = stack.stop()
    assert all(code == 0 for code in codes.values()), f"services did not exit cleanly: {codes}; logs in {logs}"
    return results


def test_compiled_denoiser_serves_the_eager_image_within_tolerance(served: dict[str, dict]) -> None:
    eager, compiled = served["eager"], served["compile"]
    assert eager["details"]["compile"] == "off"
    assert compiled["details"]["compile"] == "regional"
    assert float(compiled["details"]["compile_warmup_s"]) > 0
    diff = np.abs(compiled["image"].astype(int) - eager["image"].astype(int)).max()
    assert diff <= COMPILE_MAX_PIXEL_DIFF, f"compiled image differs from eager by {diff}/255"


def test_int8_weight_denoiser_serves_close_to_eager_and_says_so(served: dict[str, dict]) -> None:
    eager, quantized = served["eager"], served["int8-weight"]
    assert quantized["details"]["quantize"] == "int8-weight"
    assert int(quantized["details"]["quantized_linears"]) > 0
    assert sample(quantized["metrics"], "ditserve_model_info", service="denoiser", quantization="int8-weight") == 1
    assert sample(eager["metrics"], "ditserve_model_info", service="denoiser", quantization="none") == 1
    assert not np.array_equal(quantized["image"], eager["image"]), "int8 weights changed nothing: not applied?"
    quality = psnr(quantized["image"], eager["image"])
    assert quality >= INT8_MIN_PSNR_DB, f"int8-weight image at {quality:.1f} dB PSNR against eager"


def test_fp8_is_refused_at_start_up_without_sm89(model_dir: Path) -> None:
    with pytest.raises(StartupError, match=r"--quantize fp8 needs a CUDA GPU of compute capability 8\.9"):
        cpu_denoiser(model_dir, quantize="fp8")

"""`ditserve bench fidelity` on a moving-shapes video folder: the Wan path end to end through main().

The model is a random tiny Wan (its clips are noise, so the scores are near 0): what is checked is the
path (WanPipeline generation, the video judge, the VAE round trip, the grid and the clip folders) and
the summary's keys and ranges, not the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from ditserve.client.cli import main
from ditserve.services.tools.bench.report import headline
from ditserve.services.tools.eval.video_fidelity import VOCABULARY

FRACTIONS = ("fidelity_all", "fidelity_color", "fidelity_shape", "fidelity_background", "fidelity_direction")


@pytest.fixture(scope="module")
def video_model(wan_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny Wan folder that names the moving-shapes vocabulary."""
    folder = Path(shutil.copytree(wan_model, tmp_path_factory.mktemp("wan") / "moving-shapes"))
    sidecar = json.loads((folder / "ditserve.json").read_text())
    (folder / "ditserve.json").write_text(json.dumps({**sidecar, "prompt_vocabulary": VOCABULARY}))
    return folder


def test_a_video_model_gets_clip_fidelity_direction_and_its_vae(video_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "fidelity.json"
    argv = ["bench", "fidelity", "--model", str(video_model), "--subset", "1", "--steps", "2", "--vae-images", "1"]
    assert main([*argv, "--grid", "1", "--image-dir", str(tmp_path / "clips"), "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    summary, config = document["summary"], document["config"]
    assert all(0 <= summary[key] <= 1 for key in FRACTIONS), summary
    assert summary["seconds_per_video"] > 0 and summary["vae_psnr_db"] > 0
    assert len(summary["vae_psnr_db_by_frame"]) == 9 and min(summary["vae_psnr_db_by_frame"]) > 0
    assert set(summary["meets_targets"]) == {"fidelity_all", "fidelity_direction", "vae_psnr_db"}
    by_attribute = summary["scorer_on_vae_reconstructions_by_attribute"]
    assert set(by_attribute) == {"color", "shape", "background", "direction"}
    assert all(0 <= value <= 1 for value in by_attribute.values())
    assert config["num_frames"] == 9 and config["prompts"] == 1 and config["vae_clips"] == 1
    assert len(document["rows"]) == round(1 - summary["fidelity_all"])  # one row per failed clip
    assert "direction" in headline(document) and "s/video" in headline(document)
    assert sorted(path.name for path in (tmp_path / "clips" / "0000").iterdir()) == [f"{i:02d}.png" for i in range(9)]
    grid = Image.open(out.with_suffix(".png"))
    assert grid.size == (2 * (3 * 64 + 2 * 2) + 16, 2 * 64 + 12 + 3 * 13)  # first, middle, last frame 2x; a label


def test_validate_with_a_video_model_checks_the_clip_judge_on_its_vae(
    video_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A random VAE returns noise, so the judge's bar on its reconstructions is not met: exit 1."""
    assert main(["eval", "fidelity", "--validate", "--model", str(video_model), "-n", "1"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["renders"]["direction"] == 1.0 and report["vae_reconstructions"]["n"] == 1
    assert report["vae_psnr_db"] < 28 and report["passed"] is False

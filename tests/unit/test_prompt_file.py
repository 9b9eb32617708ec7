"""Prompt files: seeds given or counted, comments skipped, bad files refused; which models default to shapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ditserve.services.tools import prompt_file


def test_seeds_are_given_or_the_prompts_index() -> None:
    text = "# my prompts\n7\ta cat on a sofa\n\na red circle on a blue background\n-1\tsunset, 35mm\n"
    assert prompt_file.parse_prompts(text) == [
        ("a cat on a sofa", 7),
        ("a red circle on a blue background", 1),
        ("sunset, 35mm", -1),
    ]
    assert prompt_file.parse_prompts("take 2\tof a scene") == [("take 2\tof a scene", 0)]  # not a seed


def test_unusable_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="line 1"):
        prompt_file.parse_prompts("3\t\n")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(SystemExit, match=r"empty\.txt: no prompts"):
        prompt_file.read_prompts(tmp_path / "empty.txt")


def test_shapes_prompts_are_the_default_only_for_shapes_models(model_dir: Path) -> None:
    import json

    shipped = json.loads((model_dir / "ditserve.json").read_text())
    assert prompt_file.vocabulary_prompts(shipped, model_dir) == prompt_file.VOCABULARIES["shapes"]()
    with pytest.raises(SystemExit, match=r"no prompt_vocabulary.*--prompt-file"):
        prompt_file.vocabulary_prompts({"family": "flux"}, model_dir)
    assert prompt_file.shapes_vocabulary(["a red circle on a blue background", "a green ring on a black background"])
    assert not prompt_file.shapes_vocabulary(["a red circle on a blue background", "a cat on a sofa"])


def test_calibration_runs_a_files_prompts_at_their_seeds(model_dir: Path, tmp_path: Path) -> None:
    import json

    from ditserve.services.tools.calibrate import MASK_SEEDS, _seeded, calibrate_prompts, calibration_prompts

    assert _seeded(["a", ("b", 7)], MASK_SEEDS) == [("a", MASK_SEEDS[0]), ("a", MASK_SEEDS[1]), ("b", 7)]
    assert _seeded(["a", ("b", 7)], None) == [("a", 0), ("b", 7)]
    assert calibrate_prompts(model_dir, None, 2) == calibration_prompts(2)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (tmp_path / "ditserve.json").write_text(json.dumps({"family": "flux"}))
    with pytest.raises(SystemExit, match="--prompt-file"):
        calibrate_prompts(tmp_path, None, 2)
    (tmp_path / "mine.txt").write_text("5\ta cat\n")
    assert calibrate_prompts(tmp_path, str(tmp_path / "mine.txt"), 2) == [("a cat", 5)]


def test_a_moving_shapes_model_needs_no_prompt_file(tmp_path: Path) -> None:
    """The shipped video model's ditserve.json names "moving-shapes": calibration and the cache bench take
    the clip judge's prompts, each one a motion prompt, calibration's kept out of the bench's."""
    import json

    from ditserve.services.tools.bench.cache import prompt_sets
    from ditserve.services.tools.calibrate import calibrate_prompts
    from ditserve.services.tools.eval.video_fidelity import VOCABULARY
    from ditserve.services.tools.training.evaluate_video import motion_evaluation_prompts
    from ditserve.services.tools.training.motion import DIRECTIONS, parse_prompt

    assert prompt_file.MOVING_SHAPES == VOCABULARY
    sidecar = {"family": "wan", prompt_file.VOCABULARY_KEY: VOCABULARY}
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (tmp_path / "ditserve.json").write_text(json.dumps(sidecar))
    motion = motion_evaluation_prompts()
    assert prompt_file.vocabulary_prompts(sidecar, tmp_path) == motion and len(motion) == 560
    calibration = calibrate_prompts(tmp_path, None, 4)
    bench, calibration_of_bench = prompt_sets(None, 20, sidecar, tmp_path)
    assert calibration == calibration_of_bench and len(bench) == 20
    bench_texts = [prompt for prompt, _ in bench]
    assert not set(bench_texts) & set(calibration)
    assert {parse_prompt(prompt).direction for prompt in bench_texts + calibration} <= set(DIRECTIONS)
    assert not prompt_file.shapes_vocabulary(calibration)  # the image judge does not score clips

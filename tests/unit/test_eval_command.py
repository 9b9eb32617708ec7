"""`ditserve eval fidelity` end to end through main(): JSON per image or clip, the summary, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ditserve.client.cli import main
from ditserve.services.tools.training.motion import all_clip_combinations, render_clip
from ditserve.services.tools.training.shapes import Attributes, all_combinations, render


def _write(tmp_path: Path, count: int) -> tuple[list[Path], list[str]]:
    specs = all_combinations(0)[:count]
    paths = []
    for index, spec in enumerate(specs):
        paths.append(tmp_path / f"{index}.png")
        render(spec).save(paths[-1])
    return paths, [spec.prompt for spec in specs]


def test_scores_each_file_against_its_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths, prompts = _write(tmp_path, 3)
    wrong = Attributes("red" if prompts[2].split()[1] != "red" else "green", "circle", "white", None).prompt
    prompts[2] = wrong
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert main(["eval", "fidelity", "--prompts", str(tmp_path / "prompts.txt"), *map(str, paths)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["all"] for line in lines[:3]] == [True, True, False]
    assert lines[0]["image"] == str(paths[0]) and lines[0]["prompt"] == prompts[0]
    assert lines[3]["summary"]["all"] == pytest.approx(2 / 3) and lines[3]["summary"]["n"] == 3


def test_one_prompt_for_every_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths, prompts = _write(tmp_path, 1)
    assert main(["eval", "fidelity", "--prompt", prompts[0], str(paths[0]), str(paths[0])]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["summary"] == {
        "color": 1.0,
        "shape": 1.0,
        "background": 1.0,
        "all": 1.0,
        "n": 2,
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "a red circle on a blue background"], "no images given"),
        (["x.png"], "exactly one of --prompt and --prompts"),
        (["--prompt", "a dog", "IMAGE"], "is not of the form"),
        (["--prompt", "a red circle on a blue background", "missing.png"], "cannot read missing.png"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path: Path, argv: list[str], message: str, monkeypatch) -> None:
    paths, _ = _write(tmp_path, 1)
    monkeypatch.chdir(tmp_path)
    argv = [str(paths[0]) if arg == "IMAGE" else arg for arg in argv]
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "fidelity", *argv])
    assert message in str(exit_.value)


def test_validate_checks_the_scorer_on_fresh_renders(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "fidelity", "--validate", "-n", "60"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["renders"]["n"] == 60 and report["renders"]["all"] >= 0.99 and report["passed"] is True


def _write_clips(tmp_path: Path, count: int) -> tuple[list[Path], list[str]]:
    """Clips as bench fidelity --image-dir writes them: a folder of PNG frames each."""
    specs = all_clip_combinations(0)[:count]
    for index, spec in enumerate(specs):
        (tmp_path / f"clip{index}").mkdir()
        for frame_index, frame in enumerate(render_clip(spec)):
            frame.save(tmp_path / f"clip{index}" / f"{frame_index:02d}.png")
    return [tmp_path / f"clip{index}" for index in range(count)], [spec.prompt for spec in specs]


def test_a_folder_of_frames_is_a_clip_judged_with_its_direction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths, prompts = _write_clips(tmp_path, 2)
    assert " moving right " in prompts[1]
    prompts[1] = prompts[1].replace(" moving right ", " moving left ")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert main(["eval", "fidelity", "--prompts", str(tmp_path / "prompts.txt"), *map(str, paths)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["direction"], line["all"]) for line in lines[:2]] == [(True, True), (False, False)]
    assert lines[2]["summary"]["direction"] == 0.5 and lines[2]["summary"]["color"] == 1.0


def test_images_and_clips_do_not_mix(tmp_path: Path) -> None:
    (image,), _ = _write(tmp_path, 1)
    (clip,), _ = _write_clips(tmp_path, 1)
    with pytest.raises(SystemExit, match="not both"):
        main(["eval", "fidelity", "--prompt", "a red circle on a blue background", str(image), str(clip)])


def test_validate_checks_the_clip_judge_on_fresh_clips(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "fidelity", "--validate", "--video", "-n", "12"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["renders"]["n"] == 12 and report["renders"]["direction"] == 1.0 and report["passed"] is True

"""Prompt files for calibration and benches, so a user calibrates and measures on prompts like their own.

One prompt per line; a line may start with its seed and a tab (`42<TAB>a cat on a sofa`), else the seed
is the prompt's index in the file. Blank lines and lines starting with `#` are skipped. Torch-free.

A vocabulary's evaluation prompts are the default only for models trained on it: a folder whose
ditserve.json says `"prompt_vocabulary": "shapes"` (the image model) or `"moving-shapes"` (the video
model; VOCABULARIES lists the ones known here); any other model needs a prompt file. The fidelity
judge (eval/fidelity.py) reads the shapes vocabulary only, so a bench scores fidelity only when every
prompt is a shapes prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

VOCABULARY_KEY = "prompt_vocabulary"
SHAPES = "shapes"
MOVING_SHAPES = "moving-shapes"  # eval/video_fidelity.py's VOCABULARY: the clips of training/motion.py


def _shapes_prompts() -> list[str]:
    from ditserve.services.tools.training.shapes import all_combinations

    return [spec.prompt for spec in all_combinations()]


def _motion_prompts() -> list[str]:
    from ditserve.services.tools.training.motion import all_clip_combinations

    return [spec.prompt for spec in all_clip_combinations()]


# A model's prompt_vocabulary -> its evaluation prompts, in a fixed order (imported when asked for).
VOCABULARIES: dict[str, Callable[[], list[str]]] = {SHAPES: _shapes_prompts, MOVING_SHAPES: _motion_prompts}


def parse_prompts(text: str) -> list[tuple[str, int]]:
    """(prompt, seed) pairs from a prompt file's text."""
    pairs: list[tuple[str, int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        seed_text, tab, prompt = line.partition("\t")
        if tab and seed_text.strip().lstrip("-").isdigit():
            seed, prompt = int(seed_text), prompt.strip()
        else:
            seed, prompt = len(pairs), line.strip()
        if not prompt:
            raise ValueError(f"line {number}: a seed without a prompt")
        pairs.append((prompt, seed))
    if not pairs:
        raise ValueError("no prompts in the file")
    return pairs


def read_prompts(path: str | Path) -> list[tuple[str, int]]:
    """A prompt file's (prompt, seed) pairs; SystemExit naming the file when it cannot be used."""
    try:
        return parse_prompts(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"prompt file {path}: {error}") from None


def vocabulary_prompts(sidecar: Mapping[str, Any], model: str | Path) -> list[str]:
    """The evaluation prompts of the vocabulary the model was trained on (its ditserve.json says which);
    SystemExit asking for --prompt-file when it names none known here."""
    vocabulary = sidecar.get(VOCABULARY_KEY)
    if vocabulary not in VOCABULARIES:
        said = f"prompt_vocabulary {vocabulary!r}" if vocabulary else "no prompt_vocabulary"
        raise SystemExit(
            f"{model}: its ditserve.json names {said} (default prompts exist for: {', '.join(sorted(VOCABULARIES))}):"
            " give prompts like yours with --prompt-file"
        )
    return VOCABULARIES[vocabulary]()


def shapes_vocabulary(prompts: Sequence[str]) -> bool:
    """Whether every prompt is one the shapes fidelity judge can score (shapes.parse_prompt reads it)."""
    from ditserve.services.tools.training.shapes import parse_prompt

    try:
        for prompt in prompts:
            parse_prompt(prompt)
    except ValueError:
        return False
    return True

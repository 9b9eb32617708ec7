"""The shapes dataset: prompts parse back to their specs, and renders are reproducible and where specs say."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ditserve.services.tools.training.shapes import (
    BACKGROUNDS,
    COLORS,
    FOREGROUNDS,
    MARGIN,
    POSITION_JITTER,
    POSITIONS,
    SHAPES,
    SIZE_RANGE,
    Attributes,
    ShapeSpec,
    all_combinations,
    iter_samples,
    parse_prompt,
    render,
    sample_spec,
)


def test_prompt_wording() -> None:
    assert Attributes("red", "circle", "blue", None).prompt == "a red circle on a blue background"
    assert (
        Attributes("orange", "ring", "gray", "top left").prompt == "an orange ring on a gray background in the top left"
    )


def test_all_combinations_covers_each_triple_once() -> None:
    specs = all_combinations(0)
    triples = {(spec.color, spec.shape, spec.background) for spec in specs}
    expected = {(c, s, b) for c in FOREGROUNDS for s in SHAPES for b in BACKGROUNDS if b != c}
    assert len(specs) == len(triples)
    assert triples == expected
    assert all(spec.position is None for spec in specs)
    assert all(parse_prompt(spec.prompt) == spec.attributes for spec in specs)


def test_all_combinations_seed_changes_jitter_only() -> None:
    assert all_combinations(3) == all_combinations(3)
    assert all_combinations(3) != all_combinations(4)
    assert [s.attributes for s in all_combinations(3)] == [s.attributes for s in all_combinations(4)]


@given(st.integers(min_value=0, max_value=2**63))
def test_sampled_specs_are_valid_and_parse_back(seed: int) -> None:
    spec = sample_spec(np.random.default_rng(seed))
    assert parse_prompt(spec.prompt) == spec.attributes
    assert spec.color != spec.background
    assert SIZE_RANGE[0] <= spec.size <= SIZE_RANGE[1]
    radius = spec.size / 2
    for centre in (spec.cx, spec.cy):
        assert centre - radius >= MARGIN - 1e-9
        assert centre + radius <= 1 - MARGIN + 1e-9
    if spec.position is not None:
        anchor = np.array(POSITIONS[spec.position])
        # Off-centre anchors stay on their side of the image; the centre anchor stays near it.
        offset = np.array([spec.cx, spec.cy]) - 0.5
        assert np.all((np.sign(offset) == np.sign(anchor - 0.5)) | (np.abs(offset) <= POSITION_JITTER))


def test_parse_prompt_is_case_and_space_tolerant() -> None:
    assert parse_prompt("  A Red Circle on a Blue Background ") == Attributes("red", "circle", "blue", None)


@pytest.mark.parametrize(
    ("prompt", "named"),
    [
        ("a pink circle on a blue background", "'pink'"),
        ("a red blob on a blue background", "'blob'"),
        ("a red circle on a purple background", "background 'purple'"),
        ("a blue circle on a blue background", "both 'blue'"),
        ("a red circle on a blue background in the middle", "'middle'"),
        ("red circle", "not of the form"),
    ],
)
def test_parse_prompt_names_what_it_cannot_parse(prompt: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_prompt(prompt)


def _stream(seed: int, count: int = 5) -> list[tuple[ShapeSpec, bytes]]:
    return [(spec, image.tobytes()) for spec, image in itertools.islice(iter_samples(seed), count)]


def test_render_is_deterministic() -> None:
    spec = all_combinations(0)[7]
    assert render(spec).tobytes() == render(spec).tobytes()
    assert _stream(11) == _stream(11)
    assert _stream(11) != _stream(12)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_places_the_shape_where_the_spec_says(size: int) -> None:
    for spec in all_combinations(0):
        image = render(spec, size)
        assert image.mode == "RGB"
        assert image.size == (size, size)
        pixels = np.asarray(image).astype(int)
        background = np.array(COLORS[spec.background])
        # The margin keeps the border frame pure background, which the scorer relies on.
        border = int(MARGIN * size)
        assert np.all(pixels[:border] == background) and np.all(pixels[-border:] == background)
        assert np.all(pixels[:, :border] == background) and np.all(pixels[:, -border:] == background)
        # A ring's centre is its hole; every other shape covers its centre.
        centre = pixels[int(spec.cy * size), int(spec.cx * size)]
        expected = spec.background if spec.shape == "ring" else spec.color
        assert np.array_equal(centre, COLORS[expected]), spec
        columns = np.flatnonzero(np.any(pixels != background, axis=(0, 2)))
        assert abs(columns[-1] + 1 - columns[0] - spec.size * size) <= 2, spec

"""The family registry: which family a folder holds, its defaults, and a clear error for an unknown one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ditserve.services.common.errors import ModelLoadError
from ditserve.services.common.model import ModelFolder
from ditserve.services.families import FAMILIES, family_name


def folder(tmp_path: Path, pipeline: str, sidecar: dict | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    if sidecar is not None:
        (tmp_path / "ditserve.json").write_text(json.dumps(sidecar))
    return tmp_path


@pytest.mark.parametrize(("pipeline", "family"), [("FluxPipeline", "flux"), ("WanPipeline", "wan")])
def test_the_pipeline_class_names_the_family(tmp_path: Path, pipeline: str, family: str) -> None:
    assert family_name(ModelFolder(folder(tmp_path, pipeline))) == family


def test_ditserve_json_names_the_family_over_the_pipeline_class(tmp_path: Path) -> None:
    assert family_name(ModelFolder(folder(tmp_path, "SomePipeline", {"family": "wan"}))) == "wan"


def test_defaults_are_the_family_pipelines_own_unless_the_folder_overrides_them(tmp_path: Path) -> None:
    flux = ModelFolder(folder(tmp_path / "flux", "FluxPipeline")).defaults
    assert (flux.height, flux.width, flux.steps, flux.num_frames) == (1024, 1024, 28, 1)
    wan = ModelFolder(folder(tmp_path / "wan", "WanPipeline", {"default_steps": 7})).defaults
    assert (wan.height, wan.width, wan.num_frames, wan.fps, wan.guidance_scale) == (480, 832, 81, 16.0, 5.0)
    assert wan.steps == 7


@pytest.mark.parametrize("sidecar", [{"family": "chroma"}, None])
def test_an_unknown_family_names_the_folder_and_the_known_ones(tmp_path: Path, sidecar: dict | None) -> None:
    path = folder(tmp_path, "ChromaPipeline", sidecar)
    with pytest.raises(ModelLoadError) as raised:
        ModelFolder(path)
    message = str(raised.value)
    assert str(path) in message and all(name in message for name in FAMILIES)
    assert "chroma" in message.lower()

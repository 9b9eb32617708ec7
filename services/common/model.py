"""Local diffusers-format model folders: checked at start-up, loaded per component.

Each service loads only its own components, through the same `from_pretrained`
path for the shipped model and for a real FLUX.1 folder. Nothing is fetched
from a hub, and weights load from safetensors only (no pickle).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ditserve.services.common.errors import ModelLoadError

if TYPE_CHECKING:  # the folder's facts are read without torch; only load() needs the libraries
    import torch

SIDECAR = "ditserve.json"


@dataclass(frozen=True)
class ModelDefaults:
    """Request defaults: the family's (families/__init__.py FAMILY_DEFAULTS) unless the folder's
    ditserve.json says otherwise."""

    height: int = 1024
    width: int = 1024
    steps: int = 28
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0
    max_sequence_length: int = 512
    num_frames: int = 1  # 1: an image family
    fps: float = 0.0  # a video family's container rate


class ModelFolder:
    def __init__(self, path: str | Path, allow_pickle: bool = False) -> None:
        self.path = Path(path).expanduser().resolve()
        self.allow_pickle = allow_pickle
        index_path = self.path / "model_index.json"
        if not self.path.is_dir():
            raise ModelLoadError(f"model folder {self.path} does not exist")
        if not index_path.is_file():
            raise ModelLoadError(f"{self.path} is not a diffusers model folder: model_index.json is missing")
        try:
            self.index: dict[str, Any] = json.loads(index_path.read_text())
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"{index_path} is not valid JSON: {error}") from error
        self.sidecar: dict[str, Any] = self._read_sidecar()
        # make-model --random-weights: configs only; each service builds its components with random weights.
        self.random_weights = bool(self.sidecar.get("random_weights", False))
        self.defaults = self._defaults()

    @property
    def name(self) -> str:
        return self.path.name

    def _read_sidecar(self) -> dict[str, Any]:
        path = self.path / SIDECAR
        return json.loads(path.read_text()) if path.is_file() else {}

    def _defaults(self) -> ModelDefaults:
        from ditserve.services.families import FAMILY_DEFAULTS, family_name

        known = {f.name for f in fields(ModelDefaults)}
        values = {key.removeprefix("default_"): value for key, value in self.sidecar.items()}
        overrides = {key: value for key, value in values.items() if key in known}
        return ModelDefaults(**{**FAMILY_DEFAULTS[family_name(self)], **overrides})

    def component_dir(self, component: str) -> Path:
        entry = self.index.get(component)
        folder = self.path / component
        if not isinstance(entry, list) or entry[0] is None or not folder.is_dir():
            raise ModelLoadError(f"{self.path}: component {component!r} is missing from model_index.json or disk")
        return folder

    def config(self, component: str) -> dict[str, Any]:
        """A component's config.json, for facts a service needs without loading the weights."""
        return json.loads((self.component_dir(component) / "config.json").read_text())

    def load(self, component: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        """Loads one component with the class model_index.json names for it."""
        folder = self.component_dir(component)
        library, class_name = self.index[component]
        cls = getattr(importlib.import_module(library), class_name)
        if component.startswith("tokenizer") or component == "scheduler":
            return cls.from_pretrained(folder, local_files_only=True)
        if self.random_weights:
            return random_component(cls, folder, device, dtype)
        # use_safetensors=None lets the library fall back to pickle (.bin) files: only when allowed.
        safetensors_only = None if self.allow_pickle else True
        try:
            model = cls.from_pretrained(
                folder, local_files_only=True, use_safetensors=safetensors_only, torch_dtype=dtype
            )
        except (OSError, ValueError) as error:
            hint = "" if self.allow_pickle else " (pickle weights load only with --allow-pickle)"
            raise ModelLoadError(f"{folder}: cannot load {class_name}{hint}: {error}") from error
        return model.to(device).eval().requires_grad_(False)


def random_component(cls: Any, folder: Path, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """`cls` built from folder's config.json with random weights, created on `device` in `dtype` directly.

    Initialising on the target device in the target dtype is what makes a 12B transformer take seconds
    rather than the minutes (and 48 GB of host memory) of an fp32 CPU init followed by a copy. Seeded, so
    every replica holds the same weights. The weights mean nothing: timing and memory only.
    """
    import logging

    import torch

    logging.getLogger(__name__).warning(
        "%s: RANDOM weights for %s (a make-model --random-weights folder): timing and memory only", folder, cls.__name__
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            if hasattr(cls, "load_config"):  # diffusers
                model = cls.from_config(cls.load_config(folder))
            else:  # transformers
                model = cls._from_config(cls.config_class.from_pretrained(folder))
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{folder}: cannot build {cls.__name__} from its config.json: {error}") from error
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)  # already on its device, in its dtype

"""Model families: which one a folder holds, and its implementation of families/base.py's protocol.

The registry is torch-free: a family's package is imported only when a role loads a model of it. A
folder names its family in ditserve.json ("family"), else through model_index.json's pipeline class.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ditserve.services.common.errors import ModelLoadError

if TYPE_CHECKING:
    from ditserve.services.common.model import ModelFolder
    from ditserve.services.families.family import ModelFamily

# family name -> the package that implements it (its module-level FAMILY)
FAMILIES: dict[str, str] = {"flux": "ditserve.services.families.flux", "wan": "ditserve.services.families.wan"}
# model_index.json's _class_name -> family, for folders without a ditserve.json family
PIPELINE_CLASSES: dict[str, str] = {"FluxPipeline": "flux", "WanPipeline": "wan"}
# Request defaults per family (common/model.py ModelDefaults' fields), the published pipelines' own;
# a folder's ditserve.json overrides any of them.
FAMILY_DEFAULTS: dict[str, dict[str, float | int]] = {
    "flux": {"height": 1024, "width": 1024, "steps": 28, "guidance_scale": 3.5, "max_sequence_length": 512},
    # WanPipeline: 480x832, 81 frames at 16 fps, 50 steps, CFG 5 with a negative prompt, 512 text tokens.
    "wan": {
        "height": 480,
        "width": 832,
        "num_frames": 81,
        "fps": 16.0,
        "steps": 50,
        "guidance_scale": 5.0,
        "max_sequence_length": 512,
    },
}


def family_name(folder: ModelFolder) -> str:
    """The folder's family; an unknown one is an error naming the folder and the known families."""
    name = folder.sidecar.get("family") or PIPELINE_CLASSES.get(str(folder.index.get("_class_name")))
    if name not in FAMILIES:
        what = f"family {name!r}" if name else f"pipeline class {folder.index.get('_class_name')!r}"
        raise ModelLoadError(
            f"{folder.path}: {what} is not a model family ditserve serves (known: {', '.join(sorted(FAMILIES))})"
        )
    return str(name)


def load_family(folder: ModelFolder) -> ModelFamily:
    """The implementation of the folder's family (imports its package, and with it torch)."""
    return importlib.import_module(FAMILIES[family_name(folder)]).FAMILY

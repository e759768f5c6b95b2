"""Writing adapter files: both layouts, with their metadata, atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import atomic_write
from .diffusers import to_diffusers
from .kohya import to_kohya

if TYPE_CHECKING:
    from ..adapters import LoraState

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


@dataclass
class AdapterInfo:
    """What the metadata of an exported adapter says about it and how it was trained."""

    family: str
    base_model: str
    prediction_type: str
    rank: int
    alpha: float
    targets: str
    output_name: str
    training: dict[str, str] = field(default_factory=dict)  # extra ss_* / lorakit_* keys, already strings


def kohya_metadata(info: AdapterInfo) -> dict[str, str]:
    """The safetensors header metadata: kohya's minimum `ss_*` keys plus lorakit's own."""
    from .. import __version__

    base_version = BASE_MODEL_VERSION[info.family]
    if info.family == "sd2" and info.prediction_type == "v_prediction":
        base_version = "sd_v2_v"
    metadata = {
        "ss_v2": str(info.family == "sd2"),
        "ss_base_model_version": base_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(info.rank),
        "ss_network_alpha": f"{info.alpha:g}",
        "ss_network_args": json.dumps({}),
        "ss_output_name": info.output_name,
        "ss_sd_model_name": info.base_model,
        "lorakit_version": __version__,
        "lorakit_base_model": info.base_model,
        "lorakit_rank": str(info.rank),
        "lorakit_alpha": f"{info.alpha:g}",
        "lorakit_targets": info.targets,
    }
    metadata.update(info.training)
    return metadata


def save_adapter_files(
    state: LoraState, run_dir: Path, name: str, save_dtype: str, info: AdapterInfo
) -> tuple[Path, Path]:
    """Write `<name>.safetensors` (kohya) and `<name>.diffusers.safetensors` into `run_dir`."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, DTYPES[save_dtype])
    metadata = kohya_metadata(info)
    kohya_path = Path(run_dir) / f"{name}.safetensors"
    diffusers_path = Path(run_dir) / f"{name}.diffusers.safetensors"
    kohya_tensors = to_kohya(state, dtype, sdxl=info.family == "sdxl")
    atomic_write(kohya_path, lambda tmp: save_file(kohya_tensors, str(tmp), metadata=metadata))
    diffusers_tensors, diffusers_header = to_diffusers(state, dtype)
    atomic_write(
        diffusers_path, lambda tmp: save_file(diffusers_tensors, str(tmp), metadata={**metadata, **diffusers_header})
    )
    return kohya_path, diffusers_path

"""Writing adapter files: both layouts, with their metadata, atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters import is_dora
from ..checkpoint import atomic_write
from .diffusers import to_diffusers
from .kohya import to_kohya

if TYPE_CHECKING:
    from ..adapters import LoraState

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


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
    resolution: int = 512
    trigger: str = ""
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # dataset folder name -> tag -> count
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # folder name -> n_repeats, img_count


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
    if info.tag_frequency:
        metadata["ss_tag_frequency"] = json.dumps(info.tag_frequency)
    if info.dataset_dirs:
        metadata["ss_dataset_dirs"] = json.dumps(info.dataset_dirs)
    metadata.update(modelspec(info))
    metadata.update(info.training)
    return metadata


MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
}


def modelspec(info: AdapterInfo) -> dict[str, str]:
    """The Stability AI ModelSpec keys (`modelspec.*`) that model sites and UIs read."""
    from datetime import datetime

    architecture = MODELSPEC_ARCHITECTURE[info.family]
    if info.family == "sd2" and info.prediction_type == "v_prediction":
        architecture = "stable-diffusion-v2-768-v"
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": info.output_name,
        "modelspec.resolution": f"{info.resolution}x{info.resolution}",
        "modelspec.date": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if info.prediction_type == "v_prediction" else "epsilon",
    }
    if info.trigger:
        spec["modelspec.trigger_phrase"] = info.trigger
    return spec


def sshs_hashes(tensors: dict, metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as kohya computes them: on a serialisation holding the tensors
    and only the `ss_*` metadata, the sha256 of the bytes after the header, and of the 64 KiB at 1 MiB."""
    import hashlib

    from safetensors.torch import save

    blob = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[header:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
    }


def save_adapter_files(
    state: LoraState, run_dir: Path, name: str, save_dtype: str, info: AdapterInfo
) -> tuple[Path | None, Path]:
    """Write `<name>.safetensors` (kohya) and `<name>.diffusers.safetensors` into `run_dir`; a DoRA adapter only
    in the diffusers layout (kohya path None)."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, save_dtype)
    metadata = kohya_metadata(info)
    kohya_path = None
    diffusers_path = Path(run_dir) / f"{name}.diffusers.safetensors"
    if is_dora(state):
        metadata["lorakit_dora"] = "true"
    else:
        kohya_path = Path(run_dir) / f"{name}.safetensors"
        kohya_tensors = to_kohya(state, dtype, sdxl=info.family == "sdxl")
        metadata.update(sshs_hashes(kohya_tensors, metadata))
        atomic_write(kohya_path, lambda tmp: save_file(kohya_tensors, str(tmp), metadata=metadata))
    diffusers_tensors, diffusers_header = to_diffusers(state, dtype)
    atomic_write(
        diffusers_path, lambda tmp: save_file(diffusers_tensors, str(tmp), metadata={**metadata, **diffusers_header})
    )
    return kohya_path, diffusers_path


def write_adapter(
    state: LoraState, path: Path, layout: str, dtype_name: str, metadata: dict[str, str], family: str = "sd1"
) -> Path:
    """Write `state` to `path` (atomically) in the `kohya` or `diffusers` layout, with `metadata` in the header."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    if layout == "kohya":
        tensors = to_kohya(state, dtype, sdxl=family == "sdxl")
        header = {k: v for k, v in metadata.items() if k != "lora_adapter_metadata"}
    else:
        tensors, adapter_header = to_diffusers(state, dtype)
        header = {**metadata, **adapter_header}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return Path(path)

"""Writing adapter files: both layouts, with their metadata, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ..adapters import is_dora, lycoris_kind
from ..files import atomic_write
from .diffusers import to_diffusers
from .kohya import to_kohya
from .metadata import AdapterInfo, kohya_metadata, sshs_hashes

if TYPE_CHECKING:
    from ..adapters import LoraState


def save_adapter_files(
    state: LoraState, run_dir: Path, name: str, save_dtype: str, info: AdapterInfo, diffusers_copy: bool = True
) -> tuple[Path | None, Path | None]:
    """Write `<name>.safetensors` (kohya) and `<name>.diffusers.safetensors` into `run_dir`; a DoRA adapter only
    in the diffusers layout (kohya path None), a LoKr/LoHa adapter only in the kohya layout (diffusers path None).
    Without `diffusers_copy`, a LoRA gets only its kohya file (diffusers path None)."""

    dtype = getattr(torch, save_dtype)
    metadata = kohya_metadata(info)
    kohya_path = None
    diffusers_path = Path(run_dir) / f"{name}.diffusers.safetensors"
    if lycoris_kind(state) is not None:  # LoKr/LoHa: the LyCORIS kohya layout only
        kohya_tensors = to_kohya(state, dtype, sdxl=info.family == "sdxl")
        metadata.update(sshs_hashes(kohya_tensors, metadata))
        kohya_path = Path(run_dir) / f"{name}.safetensors"
        atomic_write(kohya_path, lambda tmp: save_file(kohya_tensors, str(tmp), metadata=metadata))
        return kohya_path, None
    if is_dora(state):
        metadata["lorakit_dora"] = "true"
    else:
        kohya_path = Path(run_dir) / f"{name}.safetensors"
        kohya_tensors = to_kohya(state, dtype, sdxl=info.family == "sdxl")
        metadata.update(sshs_hashes(kohya_tensors, metadata))
        atomic_write(kohya_path, lambda tmp: save_file(kohya_tensors, str(tmp), metadata=metadata))
        if not diffusers_copy:
            return kohya_path, None
    diffusers_tensors, diffusers_header = to_diffusers(state, dtype)
    atomic_write(
        diffusers_path, lambda tmp: save_file(diffusers_tensors, str(tmp), metadata={**metadata, **diffusers_header})
    )
    return kohya_path, diffusers_path


def write_adapter(
    state: LoraState, path: Path, layout: str, dtype_name: str, metadata: dict[str, str], family: str = "sd1"
) -> Path:
    """Write `state` to `path` (atomically) in the `kohya` or `diffusers` layout, with `metadata` in the header."""

    dtype = getattr(torch, dtype_name)
    # sshs hashes describe a file's tensors: a re-expressed adapter gets its own (kohya), or none (diffusers).
    kept = {k: v for k, v in metadata.items() if k != "lora_adapter_metadata" and not k.startswith("sshs_")}
    if layout == "kohya":
        tensors = to_kohya(state, dtype, sdxl=family == "sdxl")
        header = {**kept, **sshs_hashes(tensors, kept)}
    else:
        tensors, adapter_header = to_diffusers(state, dtype)
        header = {**kept, **adapter_header}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return Path(path)

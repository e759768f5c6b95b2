"""The kohya layout (sd-scripts `networks.lora`): the one A1111/Forge, ComfyUI and diffusers all load.

Key = `<prefix>_<module path with "." -> "_">` + `.lora_down.weight` / `.lora_up.weight` / `.alpha`,
with delta W = up @ down * (alpha / rank).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import exported_path

if TYPE_CHECKING:
    import torch

    from ..adapters import LoraState

# SD 1.x / 2.x prefixes; SDXL's two encoders are lora_te1 / lora_te2.
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def kohya_name(component: str, path: str, *, sdxl: bool = False) -> str:
    """The kohya key stem of one module, e.g. `lora_te_text_model_encoder_layers_0_mlp_fc1`."""
    prefix = (SDXL_PREFIXES if sdxl else PREFIXES)[component]
    return f"{prefix}_{exported_path(component, path).replace('.', '_')}"


def to_kohya(state: LoraState, dtype: torch.dtype, *, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of the kohya file for `state`, cast to `dtype` (alphas included, as 0-d tensors)."""
    import torch

    tensors = {}
    for component, modules in state.items():
        for path, lora in modules.items():
            stem = kohya_name(component, path, sdxl=sdxl)
            tensors[f"{stem}.lora_down.weight"] = lora.down.to(dtype).contiguous()
            tensors[f"{stem}.lora_up.weight"] = lora.up.to(dtype).contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(lora.alpha, dtype=dtype)
    return tensors

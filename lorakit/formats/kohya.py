"""The kohya layout (sd-scripts `networks.lora`): the one A1111/Forge, ComfyUI and diffusers all load.

Key = `<prefix>_<module path with "." -> "_">` + `.lora_down.weight` / `.lora_up.weight` / `.alpha`,
with delta W = up @ down * (alpha / rank).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..adapters import is_dora
from ..errors import AdapterError
from . import exported_path

if TYPE_CHECKING:
    from ..adapters import LoraState

# SD 1.x / 2.x prefixes; SDXL's two encoders are lora_te1 / lora_te2.
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


DORA_KOHYA_MESSAGE = (
    "a DoRA adapter has no kohya layout: A1111/Forge and ComfyUI apply a kohya file's dora_scale per input "
    "column (newer ComfyUI per output row, but against the original weight's norm), peft and diffusers per "
    "output row of the adapted weight, so it would draw differently; use the diffusers layout"
)


def kohya_name(component: str, path: str, *, sdxl: bool = False) -> str:
    """The kohya key stem of one module, e.g. `lora_te_text_model_encoder_layers_0_mlp_fc1`."""
    prefix = (SDXL_PREFIXES if sdxl else PREFIXES)[component]
    return f"{prefix}_{exported_path(component, path).replace('.', '_')}"


def to_kohya(state: LoraState, dtype: torch.dtype, *, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of the kohya file for `state`, cast to `dtype` (alphas included, as 0-d tensors).

    When modules differ in scale (alpha / rank), e.g. LoCon's conv rank, each module's scale is
    folded into its up weights and its alpha written as its rank: diffusers' kohya loader drops
    per-module alphas on attention projections, and folding is exact for every loader.
    """

    if is_dora(state):
        raise AdapterError(DORA_KOHYA_MESSAGE)
    fold = len({lora.alpha / lora.rank for modules in state.values() for lora in modules.values()}) > 1
    tensors = {}
    for component, modules in state.items():
        for path, lora in modules.items():
            stem = kohya_name(component, path, sdxl=sdxl)
            up, alpha = (lora.up * (lora.alpha / lora.rank), float(lora.rank)) if fold else (lora.up, lora.alpha)
            tensors[f"{stem}.lora_down.weight"] = lora.down.to(dtype).contiguous()
            tensors[f"{stem}.lora_up.weight"] = up.to(dtype).contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors

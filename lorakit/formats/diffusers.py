"""The diffusers layout (what `save_lora_weights` writes); loads in diffusers only.

Keys use peft's spelling, `<component>.<module path>.lora_A.weight` / `.lora_B.weight`. Alpha
travels in the `lora_adapter_metadata` header that diffusers turns into the `LoraConfig`:
kept minimal (`r`, `lora_alpha`, `target_modules`, and `use_dora` for DoRA), as any field the
reader's peft does not know would make loading fail. A DoRA module adds its magnitude as
`<component>.<module path>.lora_magnitude_vector.weight` (peft's shapes: [out], convs [1, out, 1, 1]).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..adapters import lycoris_kind
from ..errors import AdapterError
from ..lycoris import KIND_NAMES
from . import exported_path

if TYPE_CHECKING:
    import torch

    from ..adapters import LoraState

METADATA_KEY = "lora_adapter_metadata"
# diffusers' U-Net loader also takes peft's bare `lora_magnitude_vector`; the text encoder (transformers 5) needs
# the `.weight`, so both components get it.
MAGNITUDE = "lora_magnitude_vector.weight"
DOWN, UP = "lora_A.weight", "lora_B.weight"


def diffusers_key(component: str, path: str, part: str) -> str:
    """The key of one tensor in the diffusers layout: `<component>.<module path as files spell it>.<part>`,
    `part` one of DOWN, UP and MAGNITUDE."""
    return f"{component}.{exported_path(component, path)}.{part}"


def to_diffusers(state: LoraState, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors header metadata of the diffusers-layout file for `state`.

    Modules whose rank differs from the component's first module are listed in `rank_pattern`;
    modules whose alpha differs get the ratio folded into their up weights (exact), so the
    header never needs an `alpha_pattern`. LoKr/LoHa have no diffusers layout (diffusers cannot load them).
    """
    kind = lycoris_kind(state)
    if kind is not None:
        raise AdapterError(
            f"a {KIND_NAMES[kind]} adapter has no diffusers layout (diffusers cannot load LoKr/LoHa); write the kohya "
            "layout, which A1111/Forge, ComfyUI and lorakit load"
        )
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, object] = {}
    for component, modules in state.items():
        if not modules:
            continue
        first = next(iter(modules.values()))
        rank, alpha = first.rank, first.alpha
        rank_pattern = {}
        for path, lora in modules.items():
            up = lora.up if lora.alpha == alpha else lora.up * (lora.alpha / alpha)
            if lora.rank != rank:
                rank_pattern[path] = lora.rank
            tensors[diffusers_key(component, path, DOWN)] = lora.down.to(dtype).contiguous()
            tensors[diffusers_key(component, path, UP)] = up.to(dtype).contiguous()
            if lora.magnitude is not None:
                tensors[diffusers_key(component, path, MAGNITUDE)] = lora.peft_magnitude().to(dtype).contiguous()
        config[f"{component}.r"] = rank
        config[f"{component}.lora_alpha"] = alpha
        config[f"{component}.target_modules"] = sorted(modules)
        if rank_pattern:
            config[f"{component}.rank_pattern"] = rank_pattern
        if any(lora.magnitude is not None for lora in modules.values()):
            config[f"{component}.use_dora"] = True
    return tensors, {METADATA_KEY: json.dumps(config, sort_keys=True)}

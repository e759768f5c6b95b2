"""The kohya layout (sd-scripts `networks.lora`): the one A1111/Forge, ComfyUI and diffusers all load.

Key = `<prefix>_<module path with "." -> "_">` + `.lora_down.weight` / `.lora_up.weight` / `.alpha`,
with delta W = up @ down * (alpha / rank).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

import torch

from ..adapters import LoraModule, is_dora
from ..errors import AdapterError
from ..lycoris import LycorisModule
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


# SDXL's U-Net keeps the original Stability block names in kohya files (FORMATS.md section 2): diffusers'
# down_blocks.i (two resnets and attentions each, then a downsampler) are input_blocks 3i+1 .. 3i+3, the
# up_blocks.i (three each, then an upsampler) output_blocks 3i .. 3i+2, the mid block middle_block 0..2.
_SDXL_BLOCKS = (
    (re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\."), lambda i, j: f"input_blocks.{3 * i + j + 1}.1."),
    (re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\."), lambda i, j: f"input_blocks.{3 * i + j + 1}.0."),
    (re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv"), lambda i: f"input_blocks.{3 * (i + 1)}.0.op"),
    (re.compile(r"mid_block\.attentions\.0\."), lambda: "middle_block.1."),
    (re.compile(r"mid_block\.resnets\.(\d+)\."), lambda j: f"middle_block.{2 * j}."),
    (re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\."), lambda i, j: f"output_blocks.{3 * i + j}.1."),
    (re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\."), lambda i, j: f"output_blocks.{3 * i + j}.0."),
    (re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\."), lambda i: f"output_blocks.{3 * i + 2}.2."),
)
# Inside a ResNet (LoCon): diffusers' names -> the original ones.
_SDXL_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def sdxl_unet_path(path: str) -> str:
    """An SDXL U-Net module path in the original block names, e.g. `down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in`."""
    for pattern, replacement in _SDXL_BLOCKS:
        match = pattern.match(path)
        if match:
            rest = path[match.end() :]
            if ".resnets." in match.group(0):
                rest = _SDXL_RESNET.get(rest, rest)
            numbers = [int(g) for g in match.groups()]
            return replacement(*numbers) + rest
    return path


_SDXL_RESNET_BACK = {v: k for k, v in _SDXL_RESNET.items()}
_SDXL_BACK = (
    (re.compile(r"input_blocks\.(\d+)\.0\.op"), lambda n: f"down_blocks.{n // 3 - 1}.downsamplers.0.conv"),
    (re.compile(r"input_blocks\.(\d+)\.1\."), lambda n: f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}."),
    (re.compile(r"input_blocks\.(\d+)\.0\."), lambda n: f"down_blocks.{(n - 1) // 3}.resnets.{(n - 1) % 3}."),
    (re.compile(r"middle_block\.1\."), lambda: "mid_block.attentions.0."),
    (re.compile(r"middle_block\.(\d+)\."), lambda n: f"mid_block.resnets.{n // 2}."),
    (re.compile(r"output_blocks\.(\d+)\.2\."), lambda n: f"up_blocks.{n // 3}.upsamplers.0."),
    (re.compile(r"output_blocks\.(\d+)\.1\."), lambda n: f"up_blocks.{n // 3}.attentions.{n % 3}."),
    (re.compile(r"output_blocks\.(\d+)\.0\."), lambda n: f"up_blocks.{n // 3}.resnets.{n % 3}."),
)


def sdxl_diffusers_path(path: str) -> str:
    """The inverse of `sdxl_unet_path`: an SDXL U-Net path in the original block names back to diffusers' names."""
    for pattern, replacement in _SDXL_BACK:
        match = pattern.match(path)
        if match:
            head, rest = replacement(*[int(g) for g in match.groups()]), path[match.end() :]
            if ".resnets." in head:
                rest = _SDXL_RESNET_BACK.get(rest, rest)
            return head + rest
    return path


def kohya_name(component: str, path: str, *, sdxl: bool = False) -> str:
    """The kohya key stem of one module, e.g. `lora_te_text_model_encoder_layers_0_mlp_fc1`."""
    prefix = (SDXL_PREFIXES if sdxl else PREFIXES)[component]
    if sdxl and component == "unet":
        path = sdxl_unet_path(path)
    return f"{prefix}_{exported_path(component, path).replace('.', '_')}"


def to_kohya(state: LoraState, dtype: torch.dtype, *, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of the kohya file for `state`, cast to `dtype` (alphas included, as 0-d tensors).

    The file gets one alpha: diffusers' kohya loader drops per-module alphas on attention projections (it applies
    the most common one), so when modules differ in alpha (LoCon's conv alpha, per-module ranks with alpha = rank
    after a dynamic resize or extract, third-party files), each module's alpha / common alpha is folded into its up
    weights and the common alpha (the most common one) written. The scale alpha / rank then stays each module's
    own in every loader, exactly.
    """

    if is_dora(state):
        raise AdapterError(DORA_KOHYA_MESSAGE)
    loras = [m for modules in state.values() for m in modules.values() if isinstance(m, LoraModule)]
    alphas = Counter(lora.alpha for lora in loras)
    common = max(alphas, key=lambda alpha: (alphas[alpha], alpha)) if alphas else 1.0
    tensors = {}
    for component, modules in state.items():
        for path, lora in modules.items():
            stem = kohya_name(component, path, sdxl=sdxl)
            if isinstance(lora, LycorisModule):  # LyCORIS names, its own alpha / dim convention
                tensors.update({f"{stem}.{name}": t.to(dtype).contiguous() for name, t in lora.tensors.items()})
                if lora.alpha is not None:
                    tensors[f"{stem}.alpha"] = torch.tensor(lora.alpha, dtype=dtype)
                continue
            up = lora.up if lora.alpha == common else lora.up * (lora.alpha / common)
            tensors[f"{stem}.lora_down.weight"] = lora.down.to(dtype).contiguous()
            tensors[f"{stem}.lora_up.weight"] = up.to(dtype).contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(common, dtype=dtype)
    return tensors

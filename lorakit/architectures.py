"""The real component configs of SD 1.5, SD 2.1 and SDXL, shipped in the package as runtime data.

One place reads them: meta-device builds of the full-size modules (module counts, key names, parameter
counts for the memory planner and the GPU check), and single-file checkpoints that carry no config of their own.
Sources: the `config.json` of each component of the published diffusers repositories (see ../shared/configs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).parent / "configs"
ARCHITECTURES = ("sd15", "sd21", "sdxl")


def component_config(architecture: str, component: str) -> dict[str, Any]:
    """The config of one component (`unet`, `vae`, `text_encoder`, `text_encoder_2`), private `_` keys dropped."""
    path = CONFIGS / architecture / f"{component}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS / architecture).glob("*.json"))
        raise KeyError(f"{architecture}/{component}: no such config; {architecture} has {known}")
    return {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if not k.startswith("_")}


def build_on_meta(architecture: str, component: str) -> Any:
    """The full-size module on the meta device: every parameter's shape, no memory and no weights."""

    config = component_config(architecture, component)
    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**config)
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**config)
        import transformers

        model_class = getattr(transformers, config["architectures"][0])
        return model_class(transformers.CLIPTextConfig(**config))

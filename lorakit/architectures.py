"""The real component configs of SD 1.5, SD 2.1 and SDXL, shipped in the package as runtime data.

One place reads them: meta-device builds of the full-size modules (module counts, key names, parameter
counts for the memory planner and the GPU check), and single-file checkpoints that carry no config of their own.
Sources: the `config.json` of each component of the published diffusers repositories (see ../shared/configs);
`sdxl/scheduler.json` is the scheduler config of stabilityai/stable-diffusion-xl-base-1.0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError, first_line

CONFIGS = Path(__file__).parent / "configs"
ARCHITECTURES = ("sd15", "sd21", "sdxl")


def component_config(architecture: str, component: str) -> dict[str, Any]:
    """The config of one component (`unet`, `vae`, `text_encoder`, `text_encoder_2`), private `_` keys dropped."""
    path = CONFIGS / architecture / f"{component}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS / architecture).glob("*.json"))
        raise KeyError(f"{architecture}/{component}: no such config; {architecture} has {known}")
    return _public_keys(json.loads(path.read_text(encoding="utf-8")))


def _public_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A config without its private `_` keys (class name, library versions): what the model's constructor takes."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_on_meta(architecture: str, component: str, folder: str | None = None) -> Any:
    """The full-size module on the meta device: every parameter's shape, no memory and no weights. With `folder` (a
    local diffusers model), its own `<component>/config.json` is built instead of the shipped one."""

    if folder is None:
        config = component_config(architecture, component)
    else:
        path = Path(folder) / component / "config.json"
        try:
            config = _public_keys(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise ModelError(f"model.base: {path} is not a readable config ({first_line(err)})") from None
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


# model_index.json of a diffusers SDXL folder: which class each component folder holds.
_SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_sdxl_config_folder(folder: Path) -> Path:
    """A diffusers SDXL folder holding configs only (no weights, no tokenizers): what `from_single_file` needs to
    read an SDXL checkpoint without the network."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(_SDXL_INDEX, indent=1), encoding="utf-8")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (folder / component).mkdir(exist_ok=True)
        (folder / component / "config.json").write_bytes((CONFIGS / "sdxl" / f"{component}.json").read_bytes())
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_bytes((CONFIGS / "sdxl" / "scheduler.json").read_bytes())
    return folder

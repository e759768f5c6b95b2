"""Rendering with diffusers pipelines: txt2img, img2img, grids, PNG parameters, adapters applied by name.

Every image is drawn with its own seed (seed + index), so any single image can be reproduced alone, and the
same functions render `lorakit generate`, training samples and prior-preservation class images.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .adapters import adapted_weight, lycoris_kind, module_at
from .block_weight import Strengths
from .emphasis import needs_encoding, prompt_embeddings
from .errors import AdapterError, LorakitError
from .files import atomic_write
from .formats.diffusers import DOWN, MAGNITUDE, UP, diffusers_key
from .formats.read import check_against
from .timestep_rank import TimestepRanks

SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
}
SAMPLER_LABELS = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M", "ddim": "DDIM"}


@dataclass(frozen=True)
class RenderSettings:
    """How each image is denoised."""

    steps: int = 30
    guidance: float = 7.0
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    sampler: str = "euler"
    clip_skip: int = 1
    guidance_rescale: float = 0.0


def set_sampler(pipe: Any, sampler: str) -> None:

    name, extra = SAMPLERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)


def sample_pipeline(unet: Any, vae: Any, text_encoders: list[Any], tokenizers: list[Any], noise_scheduler: Any) -> Any:
    """A StableDiffusionPipeline (SDXL's with two text encoders) over already-loaded components (adapters
    active), with an Euler sampler."""
    if len(text_encoders) == 2:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=unet,
            scheduler=noise_scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            tokenizer=tokenizers[0],
            unet=unet,
            scheduler=noise_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    set_sampler(pipe, "euler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def pipeline_models(pipe: Any) -> dict[str, Any]:
    """The modules an adapter can touch, by component name (the names adapter files use)."""
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if _is_sdxl(pipe):
        models["text_encoder_2"] = pipe.text_encoder_2
    return models


def _common(pipe: Any, prompt: str, settings: RenderSettings, seed: int) -> dict[str, Any]:
    """The pipeline's arguments for one image: the prompts as text, or encoded here when they use the webui's
    weights or `BREAK`, hold more than one context of tokens, or clip skip is asked for (`emphasis`)."""
    if needs_encoding(pipe, prompt, settings.negative_prompt, settings.clip_skip):
        text = prompt_embeddings(pipe, prompt, settings.negative_prompt, settings.clip_skip)
    else:
        text = {"prompt": prompt, "negative_prompt": settings.negative_prompt or None}
    return {
        **text,
        "num_inference_steps": settings.steps,
        "guidance_scale": settings.guidance,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "pil",
    }


class StepRanges:
    """Adapters drawn over some denoising steps only (the webuis' `start=` / `stop=`): their U-Net part is at 0
    outside the range, set between steps. The text encoders' part is applied as usual: the prompt is encoded once,
    before the first step. LoRA adapters only (LoKr/LoHa are written into the weights)."""

    def __init__(self, ranges: dict[str, tuple[int, int | None]]):
        self.ranges = ranges  # adapter name -> (first step on, step off from)

    def _on(self, name: str, step: int) -> bool:
        start, stop = self.ranges.get(name, (0, None))
        return start <= step and (stop is None or step < stop)

    def apply(self, unet: Any, scales: dict[str, float], step: int) -> None:
        """The U-Net's adapters at their strengths (`scales`, by name) for denoising step `step` (from 0)."""
        present = set(getattr(unet, "peft_config", {}))  # an adapter of the text encoders alone is not in it
        names = [n for n in scales if n in present]
        unet.set_adapters(names, [scales[n] if self._on(n, step) else 0.0 for n in names])

    def keywords(self, pipe: Any) -> dict[str, Any]:
        """A pipeline call's step callback (img2img's pipeline shares `pipe`'s U-Net), the adapters set for step 0
        first, at the strengths `set_scales` last gave them."""
        scales = dict(getattr(pipe, "lorakit_scales", {}))
        self.apply(pipe.unet, scales, 0)

        def after_step(called: Any, index: int, timestep: Any, tensors: dict) -> dict:
            self.apply(called.unet, scales, index + 1)
            return tensors

        return {"callback_on_step_end": after_step}


def _step_keywords(pipe: Any) -> dict[str, Any]:
    ranges = getattr(pipe, "lorakit_steps", None)
    return ranges.keywords(pipe) if ranges is not None else {}


def render(pipe: Any, prompts: list[str], seeds: list[int], settings: RenderSettings, advance=None) -> list[Any]:
    """txt2img: one image per (prompt, seed) pair."""

    images = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        with torch.no_grad():
            result = pipe(
                width=settings.width,
                height=settings.height,
                guidance_rescale=settings.guidance_rescale,
                **_common(pipe, prompt, settings, seed),
                **_step_keywords(pipe),
            )
        images.append(result.images[0])
        if advance:
            advance()
    return images


def steps_run(steps: int, strength: float) -> int:
    """How many denoising steps img2img runs at `strength` (diffusers' rule)."""
    return min(int(steps * strength), steps)


def img2img(
    pipe: Any,
    inits: list[Any],
    prompts: list[str],
    seeds: list[int],
    settings: RenderSettings,
    strength: float,
    advance=None,
) -> list[Any]:
    """Re-noise each init image to `strength` and denoise it with its prompt."""

    if steps_run(settings.steps, strength) < 1:
        raise LorakitError(
            f"--strength {strength:g} with --steps {settings.steps} runs no denoising step; use a "
            f"strength of at least {1 / settings.steps:.3f} or more steps"
        )
    img2img_class = StableDiffusionXLImg2ImgPipeline if _is_sdxl(pipe) else StableDiffusionImg2ImgPipeline
    img_pipe = img2img_class(**pipe.components)
    img_pipe.set_progress_bar_config(disable=True)
    images = []
    for init, prompt, seed in zip(inits, prompts, seeds, strict=True):
        with torch.no_grad():
            result = img_pipe(
                image=init, strength=strength, **_common(img_pipe, prompt, settings, seed), **_step_keywords(pipe)
            )
        images.append(result.images[0])
        if advance:
            advance()
    return images


def make_grid(
    images: list[Any], columns: int, *, column_labels: list[str] | None = None, row_labels: list[str] | None = None
) -> Any:
    """Paste equally sized images into a grid, row by row, with optional labels above and to the left."""

    zoom = max(1, 64 // images[0].size[0])  # tiny pictures (the toy world) are shown enlarged, pixels kept
    if zoom > 1:
        images = [
            image.resize((image.size[0] * zoom, image.size[1] * zoom), Image.Resampling.NEAREST) for image in images
        ]
    width, height = images[0].size
    rows = -(-len(images) // columns)
    font = ImageFont.load_default()
    top = 24 if column_labels else 0
    left = 160 if row_labels else 0
    grid = Image.new("RGB", (left + columns * width, top + rows * height), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        grid.paste(image, (left + (index % columns) * width, top + (index // columns) * height))
    for column, label in enumerate(column_labels or []):
        draw.text((left + column * width + 4, 6), label, fill="black", font=font)
    for row, label in enumerate(row_labels or []):
        draw.multiline_text((4, top + row * height + 4), _wrap(label, 24), fill="black", font=font)
    return grid


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def a1111_parameters(
    prompt: str,
    *,
    negative_prompt: str,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    width: int,
    height: int,
    extra: dict[str, Any] | None = None,
) -> str:
    """Generation parameters in AUTOMATIC1111's PNG `parameters` text convention."""
    fields = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": guidance,
        "Seed": seed,
        "Size": f"{width}x{height}",
        **(extra or {}),
    }
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """The prompt, negative prompt and fields of an A1111 `parameters` text (values as strings)."""
    lines = text.split("\n")
    result = {"prompt": lines[0], "negative_prompt": ""}
    for line in lines[1:-1]:
        if line.startswith("Negative prompt: "):
            result["negative_prompt"] = line[len("Negative prompt: ") :]
    for match in re.finditer(r'([A-Za-z][A-Za-z ]*): ("[^"]*"|[^,]*)(?:, |$)', lines[-1]):
        result[match.group(1)] = match.group(2).strip('"')
    return result


def save_png(image: Any, path: Path, parameters: str, extra: dict[str, str] | None = None) -> None:

    info = PngInfo()
    info.add_text("parameters", parameters)
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


# ---------------------------------------------------------------------------------------------------------------
# Adapters on a pipeline, and the `generate` command.


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    scale: float
    state: Any  # LoraState
    sha256: str
    short_hash: str = ""  # what A1111 writes in `Lora hashes` (formats.metadata.a1111_short_hash)
    # T-LoRA: (min_rank, exponent, num_train_timesteps) the file's metadata records (timestep_rank)
    timestep_ranks: tuple[int, float, int] | None = None
    steps: int = 0  # the optimizer steps its metadata records (`ss_steps`; 0 when it does not say)
    strengths: Strengths = Strengths()  # te= / unet= / lbw= it is drawn with (baked in by `generate` once loaded)
    family: str = "unknown"  # the architecture its file says it is for (formats.read.guess_family)


def _diffusers_state_dict(state: Any) -> dict[str, Any]:
    """Diffusers-layout keys with alpha / rank folded into the up weights, so loading needs no alpha at all."""

    tensors = {}
    for component, modules in state.items():
        for path, lora in modules.items():
            tensors[diffusers_key(component, path, DOWN)] = lora.down.float()
            tensors[diffusers_key(component, path, UP)] = lora.up.float() * (lora.alpha / lora.rank)
            if lora.magnitude is not None:  # diffusers turns on peft's use_dora when it sees these keys
                tensors[diffusers_key(component, path, MAGNITUDE)] = lora.peft_magnitude().float()
    return tensors


class WeightPatches:
    """LoKr/LoHa adapters on a pipeline: diffusers cannot load them, so their updates are written into the weights
    they change, from a copy of each original weight, at whatever scale `set` is given."""

    def __init__(self, pipe: Any, adapters: list[LoadedAdapter]):
        models = pipeline_models(pipe)
        self.targets: dict[tuple[str, str], tuple[Any, torch.Tensor, list[tuple[Any, float]]]] = {}
        for adapter in adapters:
            for component, modules in adapter.state.items():
                named = dict(models[component].named_modules())
                for path, module in modules.items():
                    layer = module_at(named, path)
                    layer = getattr(layer, "base_layer", layer)
                    _, _, parts = self.targets.setdefault(
                        (component, path), (layer, layer.weight.detach().clone(), [])
                    )
                    parts.append((module, adapter.name))

    def set(self, scales: dict[str, float]) -> None:
        """Write every patched weight with each adapter (by name) at the scale given."""
        with torch.no_grad():
            for (component, path), (layer, original, parts) in self.targets.items():
                weight = adapted_weight(original, [(m, scales[name]) for m, name in parts])
                if not torch.isfinite(weight).all():
                    raise AdapterError(f"{component} module {path}: the adapted weight is not finite; check the scale")
                layer.weight.copy_(weight.to(original.dtype))


def apply_adapters(pipe: Any, adapters: list[LoadedAdapter], timestep_ranks: bool = True) -> None:
    """Load each adapter into the pipeline under its own name, checked against the base first: LoRA through
    diffusers, LoKr/LoHa as `WeightPatches` (applied at their scales). A T-LoRA adapter is drawn under the
    timestep schedule it was trained with unless `timestep_ranks` is false (then at full rank, as other loaders
    draw it)."""

    lycoris = []
    for adapter in adapters:
        check_against(adapter.state, pipeline_models(pipe), str(adapter.path))
        if lycoris_kind(adapter.state) is None:
            with warnings.catch_warnings():  # several adapters in one model is what is asked for here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(_diffusers_state_dict(adapter.state), adapter_name=adapter.name)
        else:
            lycoris.append(adapter)
    pipe.lorakit_patches = WeightPatches(pipe, lycoris) if lycoris else None
    for adapter in adapters:
        if timestep_ranks and adapter.timestep_ranks is not None and "unet" in adapter.state:
            min_rank, exponent, steps = adapter.timestep_ranks
            TimestepRanks(
                pipe.unet,
                min_rank=min_rank,
                exponent=exponent,
                num_train_timesteps=steps,
                adapter_names=(adapter.name,),
            )
    if lycoris:
        pipe.lorakit_patches.set({a.name: a.scale for a in lycoris})


def set_scales(
    pipe: Any, adapters: list[LoadedAdapter], multiplier: float, factors: dict[str, float] | None = None
) -> None:
    """Every adapter at its own scale times `multiplier`, times its factor in `factors` (by name; default 1)."""
    scales = {a.name: a.scale * multiplier * (factors or {}).get(a.name, 1.0) for a in adapters}
    loras = [a for a in adapters if lycoris_kind(a.state) is None]
    if loras:
        pipe.set_adapters([a.name for a in loras], adapter_weights=[scales[a.name] for a in loras])
        pipe.lorakit_scales = {a.name: scales[a.name] for a in loras}  # what a step range turns the U-Net's on to
    if getattr(pipe, "lorakit_patches", None) is not None:
        pipe.lorakit_patches.set({a.name: scales[a.name] for a in adapters if lycoris_kind(a.state) is not None})

"""Rendering images with a base model and its adapters: used for samples during training."""

from __future__ import annotations

from typing import Any


def sample_pipeline(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, noise_scheduler: Any) -> Any:
    """A StableDiffusionPipeline over already-loaded components (adapters active), with an Euler sampler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler.from_config(noise_scheduler.config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(
    pipe: Any,
    prompts: list[str],
    *,
    seed: int,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    negative_prompt: str = "",
    clip_skip: int = 1,
) -> list[Any]:
    """One image per prompt; image i is drawn with seed `seed + i`, so every image is reproducible alone."""
    import torch

    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + index)
        with torch.no_grad():
            result = pipe(
                prompt,
                negative_prompt=negative_prompt or None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=generator,
                clip_skip=clip_skip - 1 if clip_skip > 1 else None,
                output_type="pil",
            )
        images.append(result.images[0])
    return images


def make_grid(images: list[Any], columns: int) -> Any:
    """Paste equally sized images into a grid, row by row."""
    from PIL import Image

    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


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
    extra: dict[str, str] | None = None,
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

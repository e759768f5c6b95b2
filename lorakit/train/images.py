"""Pictures made during training: sample grids of the adapter so far, and prior-preservation class images."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import adapters_scaled
from ..embedding import expand
from ..files import IMAGE_SUFFIXES
from ..models import BaseModel
from ..progress import progress_bar
from ..recipe import Recipe
from ..recipe.prompts import parse_sample_prompt
from ..render import (
    SAMPLER_LABELS,
    RenderSettings,
    a1111_parameters,
    make_grid,
    render,
    sample_pipeline,
    save_png,
    set_sampler,
)

if TYPE_CHECKING:
    from .loop import Log, Run


def _sample_settings(recipe: Recipe) -> Any:

    sample, size = recipe.sample, recipe.data.resolution
    return RenderSettings(
        steps=sample.steps,
        guidance=sample.guidance,
        width=size,
        height=size,
        negative_prompt=sample.negative_prompt,
        sampler=recipe.sample.sampler,
        clip_skip=recipe.model.clip_skip,
        # v-prediction (zero terminal SNR above all) over-exposes without it (Lin et al. 2024, section 3.4)
        guidance_rescale=0.7 if recipe.model.prediction_type == "v_prediction" else 0.0,
    )


def render_samples(run: Run) -> None:
    """One grid of the `[sample]` prompts with the adapter as it is now, into `samples/step-NNNNNN.png`."""

    sample, base = run.recipe.sample, run.base
    models = run.unwrapped()
    encoders = [models.get(n, te) for n, te in zip(base.text_encoder_names, base.text_encoders, strict=True)]
    if run.text_cache is not None:  # the frozen encoders wait on the CPU beside their cache
        for te in encoders:
            te.to(run.device)
    base.vae.to(run.device)
    pipe = sample_pipeline(models["unet"], base.vae, encoders, base.tokenizers, base.noise_scheduler)
    settings = _sample_settings(run.recipe)
    set_sampler(pipe, settings.sampler)
    prompts = [parse_sample_prompt(text) for text in sample.prompts]
    for module in models.values():
        module.eval()
    images = []
    with run.accelerator.autocast():
        for index, prompt in enumerate(prompts):  # each with kohya's inline options over the [sample] section's
            own = dataclasses.replace(
                settings,
                **{
                    key: value
                    for key in ("negative_prompt", "width", "height", "steps", "guidance")
                    if (value := getattr(prompt, key)) is not None
                },
            )
            seed = prompt.seed if prompt.seed is not None else sample.seed + index
            own = dataclasses.replace(own, negative_prompt=expand(own.negative_prompt, base.placeholders))
            strength = 1.0 if prompt.strength is None else prompt.strength  # --m: the adapter at this strength
            with adapters_scaled(models.values(), strength):
                images += render(pipe, [expand(prompt.prompt, base.placeholders)], [seed], own)  # [embedding]'s
    for module in models.values():
        module.train()
    if run.cache is not None or run.recipe.slider is not None:  # the VAE waits on the CPU between samples
        base.vae.to("cpu")
    if run.text_cache is not None:
        for te in encoders:
            te.to("cpu")
    parameters = a1111_parameters(
        " | ".join(sample.prompts),
        negative_prompt=sample.negative_prompt,
        steps=sample.steps,
        sampler=SAMPLER_LABELS[settings.sampler],
        guidance=sample.guidance,
        seed=sample.seed,
        width=settings.width,
        height=settings.height,
        extra={"Lora": run.recipe.output.name, "Training step": run.step},
    )
    folder = run.paths.folder / "samples"
    folder.mkdir(exist_ok=True)
    grid = make_grid(_same_size(images), columns=len(images))
    save_png(grid, folder / f"step-{run.step:06d}.png", parameters)
    _log_grid(run, grid)


def _log_grid(run: Run, grid: Any) -> None:
    """The sample grid to the run's trackers, at its step: TensorBoard's images tab, a Weights & Biases image."""
    import numpy as np

    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": np.asarray(grid)[None]}, step=run.step, dataformats="NHWC")
        else:
            tracker.log_images({"samples": [grid]}, step=run.step)


def _same_size(images: list[Any]) -> list[Any]:
    """Images of several sizes (prompts with their own --w / --h) centred on white cells of the largest size."""
    from PIL import Image

    width, height = max(i.size[0] for i in images), max(i.size[1] for i in images)
    if all(i.size == (width, height) for i in images):
        return images
    cells = []
    for image in images:
        cell = Image.new("RGB", (width, height), "white")
        cell.paste(image, ((width - image.size[0]) // 2, (height - image.size[1]) // 2))
        cells.append(cell)
    return cells


def render_class_images(recipe: Recipe, base: BaseModel, accelerator: Any, log: Log, quiet: bool) -> None:
    """Prior preservation: render the class images `[prior] class_dir` lacks with the base model, and keep them."""
    prior = recipe.prior
    folder = Path(prior.class_dir)
    have = len([p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]) if folder.is_dir() else 0
    missing = prior.num_class_images - have
    if missing <= 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    log(f"prior: {folder} holds {have} of {prior.num_class_images} class images; rendering {missing} with the base")
    device = accelerator.device
    base.vae.to(device)
    base.unet.to(device)
    for te in base.text_encoders:
        te.to(device)
    pipe = sample_pipeline(base.unet, base.vae, base.text_encoders, base.tokenizers, base.noise_scheduler)
    settings = _sample_settings(recipe)
    set_sampler(pipe, settings.sampler)
    with progress_bar("Class images", missing, quiet=quiet) as bar:
        for index in range(have, prior.num_class_images):
            prompts = [prior.class_prompt] if isinstance(prior.class_prompt, str) else prior.class_prompt
            prompt = prompts[index % len(prompts)]
            with accelerator.autocast():  # half-precision frozen weights need the run's autocast
                (image,) = render(pipe, [prompt], [index], settings)
            (folder / f"class-{index:05d}.txt").write_text(prompt + "\n", encoding="utf-8")
            parameters = a1111_parameters(
                prompt,
                negative_prompt=settings.negative_prompt,
                steps=settings.steps,
                sampler=SAMPLER_LABELS[settings.sampler],
                guidance=settings.guidance,
                seed=index,
                width=settings.width,
                height=settings.height,
            )
            save_png(image, folder / f"class-{index:05d}.png", parameters)
            bar.advance()

"""`lorakit generate` and the sample grids of training: txt2img, img2img and hires with adapters.

Every image is drawn with its own seed (seed + index), so any single image can be reproduced alone,
and the same function renders training samples, prior-preservation class images and `generate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import AdapterError, LorakitError

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
    import diffusers

    name, extra = SAMPLERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)


def sample_pipeline(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, noise_scheduler: Any) -> Any:
    """A StableDiffusionPipeline over already-loaded components (adapters active), with an Euler sampler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    set_sampler(pipe, "euler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _common(settings: RenderSettings, seed: int) -> dict[str, Any]:
    import torch

    return {
        "negative_prompt": settings.negative_prompt or None,
        "num_inference_steps": settings.steps,
        "guidance_scale": settings.guidance,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "clip_skip": settings.clip_skip - 1 if settings.clip_skip > 1 else None,
        "output_type": "pil",
    }


def render(pipe: Any, prompts: list[str], seeds: list[int], settings: RenderSettings, advance=None) -> list[Any]:
    """txt2img: one image per (prompt, seed) pair."""
    import torch

    images = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        with torch.no_grad():
            result = pipe(
                prompt,
                width=settings.width,
                height=settings.height,
                guidance_rescale=settings.guidance_rescale,
                **_common(settings, seed),
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
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    if steps_run(settings.steps, strength) < 1:
        raise LorakitError(
            f"--strength {strength:g} with --steps {settings.steps} runs no denoising step; use a "
            f"strength of at least {1 / settings.steps:.3f} or more steps"
        )
    img_pipe = StableDiffusionImg2ImgPipeline(**pipe.components)
    img_pipe.set_progress_bar_config(disable=True)
    images = []
    for init, prompt, seed in zip(inits, prompts, seeds, strict=True):
        with torch.no_grad():
            result = img_pipe(prompt, image=init, strength=strength, **_common(settings, seed))
        images.append(result.images[0])
        if advance:
            advance()
    return images


def make_grid(
    images: list[Any], columns: int, *, column_labels: list[str] | None = None, row_labels: list[str] | None = None
) -> Any:
    """Paste equally sized images into a grid, row by row, with optional labels above and to the left."""
    from PIL import Image, ImageDraw, ImageFont

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
    from PIL.PngImagePlugin import PngInfo

    from .checkpoint import atomic_write

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


@dataclass
class RunDefaults:
    """What a run folder passed as --lora contributes: its base, trigger word and clip skip."""

    base: str | None = None
    config: str | None = None
    trigger: str = ""
    clip_skip: int = 1


def resolve_adapters(
    loras: list[tuple[str, float]], allow_pickle: bool = False
) -> tuple[list[LoadedAdapter], RunDefaults]:
    """Read every `--lora` (a file, or a run folder whose adapter and recipe are used)."""
    from .data import file_sha256
    from .formats.read import read_adapter_file
    from .formats.tools import require_supported
    from .recipe import load_recipe

    adapters, defaults = [], RunDefaults()
    for text, scale in loras:
        path = Path(text).expanduser()
        if path.is_dir():
            recipe_path = path / "recipe.resolved.toml"
            if not recipe_path.is_file():
                raise AdapterError(f"--lora {text}: a folder but not a run folder (no recipe.resolved.toml)")
            recipe = load_recipe(recipe_path)
            path = run_adapter_path(path, recipe.output.name)
            if defaults.base is None:
                defaults = RunDefaults(
                    recipe.model.base, recipe.model.config, recipe.data.trigger, recipe.model.clip_skip
                )
        adapter = read_adapter_file(path, allow_pickle=allow_pickle)
        require_supported(adapter)
        sha = file_sha256(path)
        name = re.sub(r"[^A-Za-z0-9_-]", "_", path.name.split(".")[0])
        adapters.append(LoadedAdapter(f"{name}_{len(adapters)}", path, scale, adapter.state, sha))
    return adapters, defaults


def _diffusers_state_dict(state: Any) -> dict[str, Any]:
    """peft-spelled keys with alpha / rank folded into the up weights, so loading needs no alpha at all."""
    from .formats import exported_path
    from .formats.diffusers import MAGNITUDE

    tensors = {}
    for component, modules in state.items():
        for path, lora in modules.items():
            stem = f"{component}.{exported_path(component, path)}"
            tensors[f"{stem}.lora_A.weight"] = lora.down.float()
            tensors[f"{stem}.lora_B.weight"] = lora.up.float() * (lora.alpha / lora.rank)
            if lora.magnitude is not None:  # diffusers turns on peft's use_dora when it sees these keys
                tensors[f"{stem}.{MAGNITUDE}"] = lora.peft_magnitude().float()
    return tensors


def run_adapter_path(run_dir: Path, name: str) -> Path:
    """The adapter of a run folder: the kohya file, or the diffusers one for DoRA runs (which have no kohya file)."""
    kohya = run_dir / f"{name}.safetensors"
    diffusers = run_dir / f"{name}.diffusers.safetensors"
    return diffusers if diffusers.is_file() and not kohya.is_file() else kohya


def apply_adapters(pipe: Any, adapters: list[LoadedAdapter]) -> None:
    """Load each adapter into the pipeline under its own name, checked against the base first."""
    from .formats.read import check_against

    for adapter in adapters:
        check_against(adapter.state, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, str(adapter.path))
        pipe.load_lora_weights(_diffusers_state_dict(adapter.state), adapter_name=adapter.name)


def set_scales(pipe: Any, adapters: list[LoadedAdapter], multiplier: float) -> None:
    if adapters:
        pipe.set_adapters([a.name for a in adapters], adapter_weights=[a.scale * multiplier for a in adapters])


@dataclass(frozen=True)
class GenerateOptions:
    base: str | None = None
    config: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    count: int = 1
    seed: int = 0
    settings: RenderSettings = RenderSettings()
    compare_scales: tuple[float, ...] = ()
    init: str | None = None
    strength: float = 0.5
    upscale: float = 1.0
    hires_strength: float = 0.35
    guidance_rescale: float | None = None
    dtype: str = "auto"
    allow_pickle: bool = False


@dataclass
class GenerateResult:
    images: list[Path] = field(default_factory=list)
    grid: Path | None = None


def _device_and_dtype(requested: str, log) -> tuple[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    if requested == "auto":
        return ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    if requested == "float16" and not cuda:
        log("--dtype float16 does not run on a CPU; generating in bfloat16 instead")
        requested = "bfloat16"
    return ("cuda" if cuda else "cpu"), getattr(torch, requested)


def _with_trigger(prompt: str, trigger: str) -> str:
    if not trigger or trigger.lower() in prompt.lower():
        return prompt
    return f"{trigger}, {prompt}"


def check_size(width: int, height: int) -> None:
    if width % 8 or height % 8 or width < 8 or height < 8:
        raise LorakitError(f"--size {width}x{height}: width and height must be positive multiples of 8, e.g. 512x512")


def generate(
    prompts: list[str], out: str | Path, options: GenerateOptions, *, quiet: bool = False, log=print
) -> GenerateResult:
    """Render `count` images per prompt (and per scale in compare mode) into `out`, with a grid."""
    from .models import load_pipeline
    from .progress import progress_bar

    settings = options.settings
    check_size(settings.width, settings.height)
    if settings.sampler not in SAMPLERS:
        raise LorakitError(f"--sampler {settings.sampler!r}: use one of {', '.join(SAMPLERS)}")
    for name, value in (("--strength", options.strength), ("--hires-strength", options.hires_strength)):
        if not 0 < value <= 1:
            raise LorakitError(f"{name} {value:g}: must be in (0, 1]")
    for used, name, value in (
        (options.init, "--strength", options.strength),
        (options.upscale > 1, "--hires-strength", options.hires_strength),
    ):
        if used and steps_run(settings.steps, value) < 1:
            raise LorakitError(
                f"{name} {value:g} with --steps {settings.steps} runs no denoising step; use at least "
                f"{1 / settings.steps:.3f} or more steps"
            )
    init_image = _open_init(options.init, settings) if options.init else None
    adapters, defaults = resolve_adapters(list(options.loras), options.allow_pickle)
    base = options.base or defaults.base
    if base is None:
        raise LorakitError(
            "--base: give the base model (a diffusers folder, hub id or .safetensors), or a run folder as --lora"
        )
    pipe = load_pipeline(base, config=options.config or (defaults.config if not options.base else None))
    device, dtype = _device_and_dtype(options.dtype, log)
    apply_adapters(pipe, adapters)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    set_sampler(pipe, settings.sampler)
    rescale = options.guidance_rescale
    if rescale is None:
        rescale = 0.7 if pipe.scheduler.config.prediction_type == "v_prediction" else 0.0
    clip_skip = defaults.clip_skip if settings.clip_skip == 1 else settings.clip_skip
    settings = replace(settings, guidance_rescale=rescale, clip_skip=clip_skip)
    prompts = [_with_trigger(p, defaults.trigger) for p in prompts]
    rows = [(p, options.seed + i) for p in prompts for i in range(options.count)]
    scales = options.compare_scales or (1.0,)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    result, images = GenerateResult(), []
    total = len(rows) * len(scales) * (2 if options.upscale > 1 else 1)
    with progress_bar("Generating", total, quiet=quiet) as bar:
        for scale in scales:
            set_scales(pipe, adapters, scale)
            column = _render_rows(pipe, rows, settings, options, init_image, bar.advance)
            for (prompt, seed), image in zip(rows, column, strict=True):
                path = out / (
                    f"{len(images):03d}-seed{seed}" + (f"-x{scale:g}" if options.compare_scales else "") + ".png"
                )
                save_png(image, path, _parameters(prompt, seed, image.size, settings, options, adapters, scale))
                result.images.append(path)
                images.append((scale, prompt, seed, image))
    result.grid = _write_grid(out, images, scales, rows, options)
    log(f"Wrote {len(result.images)} images and {result.grid}")
    return result


def _open_init(path: str, settings: RenderSettings) -> Any:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(Path(path).expanduser()) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise LorakitError(f"--init {path}: file not found") from None
    except (OSError, UnidentifiedImageError) as err:
        raise LorakitError(f"--init {path}: not a readable image ({err})") from None
    return image.resize((settings.width, settings.height), Image.Resampling.LANCZOS)


def _render_rows(pipe, rows, settings: RenderSettings, options: GenerateOptions, init_image, advance) -> list[Any]:
    from PIL import Image

    prompts, seeds = [p for p, _ in rows], [s for _, s in rows]
    if init_image is not None:
        images = img2img(pipe, [init_image] * len(rows), prompts, seeds, settings, options.strength, advance)
    else:
        images = render(pipe, prompts, seeds, settings, advance)
    if options.upscale > 1:
        width = round(settings.width * options.upscale / 8) * 8
        height = round(settings.height * options.upscale / 8) * 8
        enlarged = [image.resize((width, height), Image.Resampling.LANCZOS) for image in images]
        images = img2img(
            pipe,
            enlarged,
            prompts,
            seeds,
            replace(settings, width=width, height=height),
            options.hires_strength,
            advance,
        )
    return images


def _parameters(prompt, seed, size, settings: RenderSettings, options: GenerateOptions, adapters, scale) -> str:
    lora_tags = "".join(f" <lora:{a.path.name.split('.')[0]}:{a.scale * scale:g}>" for a in adapters)
    extra: dict[str, Any] = {}
    if adapters:
        extra["Lora hashes"] = '"' + ", ".join(f"{a.path.name.split('.')[0]}: {a.sha256[:12]}" for a in adapters) + '"'
    if options.init:
        extra["Denoising strength"] = options.strength
    if options.upscale > 1:
        extra.update({"Hires upscale": options.upscale, "Hires strength": options.hires_strength})
    if settings.guidance_rescale:
        extra["CFG rescale"] = settings.guidance_rescale
    if settings.clip_skip > 1:
        extra["Clip skip"] = settings.clip_skip
    return a1111_parameters(
        prompt + lora_tags,
        negative_prompt=settings.negative_prompt,
        steps=settings.steps,
        sampler=SAMPLER_LABELS[settings.sampler],
        guidance=settings.guidance,
        seed=seed,
        width=size[0],
        height=size[1],
        extra=extra,
    )


def _write_grid(out: Path, images: list, scales, rows, options: GenerateOptions) -> Path:
    import json

    if options.compare_scales:
        ordered = [
            image for row in rows for scale in scales for s, p, sd, image in images if (p, sd) == row and s == scale
        ]
        column_labels = [f"scale {s:g}" for s in scales]
        row_labels = [f"{p} (seed {s})" for p, s in rows]
        grid = make_grid(ordered, len(scales), column_labels=column_labels, row_labels=row_labels)
    else:
        column_labels, row_labels = [], []
        grid = make_grid([image for *_, image in images], min(len(images), 4))
    path = out / "grid.png"
    labels = json.dumps({"columns": column_labels, "rows": row_labels})
    save_png(grid, path, f"lorakit grid of {len(images)} images", {"lorakit_grid": labels})
    return path

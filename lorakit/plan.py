"""`lorakit plan`: before a run, its peak GPU memory by phase and part, a verdict for a card, the disk it writes
and a rough time, without loading any weights (the estimate is `lorakit.memory`'s)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .memory import (
    GPUS,
    HEADROOM,
    MemoryEstimate,
    architecture_of,
    dataset_rows,
    disk_bytes,
    epoch_copies,
    estimate,
    find_gpu,
    largest_bucket,
)
from .recipe import DEFAULT_MAX_STEPS, Recipe

NAMES = {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL"}

# Seconds per step measured on one H200 (README "On a GPU", 2026-11-29): (architecture family, pixels x batch).
MEASURED_STEP = {"sd": (512 * 512 * 1, 0.51), "sdxl": (1024 * 1024 * 1, 1.56)}
# Speed of other GPU classes against the H200 at these small batches: rough guesses, not measurements.
GPU_SPEED = {
    "H100/H200 (measured)": 1.0,
    "A100": 0.6,
    "RTX 4090": 0.55,
    "RTX 3090 / 4080": 0.35,
    "RTX 3060 / 4060 Ti / 4070": 0.2,
    "T4": 0.08,
}


def _with(recipe: Recipe, section: str, **values: Any) -> Recipe:
    return dataclasses.replace(recipe, **{section: dataclasses.replace(getattr(recipe, section), **values)})


def _half_weights(recipe: Recipe) -> Recipe:
    """Frozen weights in float16 (bfloat16 under bf16 autocast), with the autocast they need (train refuses half
    weights without it)."""
    bf16 = recipe.train.mixed_precision == "bf16"
    halved = _with(recipe, "model", weight_dtype="bfloat16" if bf16 else "float16")
    return halved if bf16 else _with(halved, "train", mixed_precision="fp16")


def _smaller_resolution(recipe: Recipe) -> Recipe:
    """data.resolution 128 px lower, without the extra resolutions that are no longer below it."""
    side = recipe.data.resolution - 128
    return _with(recipe, "data", resolution=side, extra_resolutions=_extra_below(recipe, side))


def _extra_below(recipe: Recipe, side: int) -> list[int]:
    """The recipe's extra resolutions below `side`, the ones a run at that data.resolution may keep."""
    return [s for s in recipe.data.extra_resolutions if s < side]


def _embedding_only(recipe: Recipe) -> bool:
    """An `[embedding] only` run trains no LoRA, so `--fit` leaves the LoRA's settings alone."""
    return recipe.embedding is not None and recipe.embedding.only


# The changes `--fit` tries, cheapest in quality or speed first: (key, applies to, change, why).
FIT_CHANGES: list[tuple[str, Any, Any, str]] = [
    (
        "train.cache_latents",
        lambda r: not r.train.cache_latents,
        lambda r: _with(r, "train", cache_latents=True),
        "latents encoded once: the VAE leaves the GPU",
    ),
    (
        "data.shuffle_tags",
        lambda r: r.data.shuffle_tags and not r.lora.train_text_encoder,
        lambda r: _with(r, "data", shuffle_tags=False),
        "fixed captions: the text encoders' outputs are cached and they leave the GPU",
    ),
    (
        "data.caption_dropout_tags",
        lambda r: r.data.caption_dropout_tags and not r.lora.train_text_encoder,
        lambda r: _with(r, "data", caption_dropout_tags=0.0),
        "every tag kept: with fixed captions the text encoders' outputs are cached and they leave the GPU",
    ),
    (
        "train.gradient_checkpointing",
        lambda r: not r.train.gradient_checkpointing,
        lambda r: _with(r, "train", gradient_checkpointing=True),
        "activations recomputed: about 30 % slower steps",
    ),
    (
        "train.optimizer",
        lambda r: r.train.optimizer not in ("adamw8bit", "lion8bit", "ademamix8bit"),
        lambda r: _with(r, "train", optimizer="lion8bit" if r.train.optimizer == "lion" else "adamw8bit"),
        "8-bit optimizer state",
    ),
    (
        "model.weight_dtype",
        lambda r: r.model.weight_dtype == "float32",
        lambda r: _half_weights(r),
        "frozen weights in half precision, with fp16 autocast where the recipe has none; the LoRA still trains in "
        "float32",
    ),
    (
        "model.weight_dtype",
        lambda r: r.model.weight_dtype in ("float16", "bfloat16") and not r.lora.use_dora,
        lambda r: _with(r, "model", weight_dtype="float8"),
        "frozen Linear and Conv2d weights in float8 with a scale per channel: half the memory again, for a base that "
        "computes slightly less precisely (kohya's fp8_base)",
    ),
    (
        "train.full_bf16",
        lambda r: r.train.mixed_precision == "bf16" and not r.train.full_bf16,
        lambda r: _with(r, "train", full_bf16=True),
        "the LoRA and its gradients in bfloat16 (kohya's full_bf16): 4 bytes less per trained value; each step is "
        "rounded stochastically, so small updates still add up on average",
    ),
    (
        "preservation.weight",
        lambda r: r.preserving,
        lambda r: _with(r, "preservation", weight=0.0),
        "no output preservation: half the activations, and the class word may drift with the trigger",
    ),
    (
        "lora.train_text_encoder",
        lambda r: r.lora.train_text_encoder and not _embedding_only(r),
        lambda r: _with(r, "lora", train_text_encoder=False),
        "U-Net only: less prompt fidelity for some concepts",
    ),
    (
        "lora.rank",
        lambda r: r.lora.rank > 4 and not _embedding_only(r),
        lambda r: _with(r, "lora", rank=r.lora.rank // 2, lora_alpha=r.lora.lora_alpha / 2),
        "half the rank",
    ),
    (
        "data.extra_resolutions",
        lambda r: any(side > r.data.resolution for side in r.data.extra_resolutions),
        lambda r: _with(r, "data", extra_resolutions=_extra_below(r, r.data.resolution)),
        "no extra resolution above data.resolution: its buckets are the largest",
    ),
    (
        "data.resolution",
        lambda r: r.data.resolution > 512,
        lambda r: _smaller_resolution(r),
        "smaller largest bucket: less detail",
    ),
    (
        "train.batch_size",
        lambda r: r.train.batch_size > 1,
        lambda r: _with(
            r,
            "train",
            batch_size=1,
            gradient_accumulation_steps=r.train.gradient_accumulation_steps * r.train.batch_size,
        ),
        "batch of 1 with accumulation: the same effective batch, slower",
    ),
]


def parse_size(text: str) -> float:
    """`8GB`, `8 GiB`, `12`: a card size in GiB (a card's "GB" are GiB)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gb|gib|g)?\s*", text.lower())
    if not match or not 1 <= float(match.group(1)) <= 1024:
        raise RecipeError(f"--fit {text!r}: give a card size such as 8GB or 12")
    return float(match.group(1))


@dataclass
class Fit:
    """The cheapest recipe changes that make a run fit a card, in order."""

    target_gib: float
    recipe: Recipe
    changes: list[tuple[str, Any, Any, str]]  # (key, before, after, why)
    memory: MemoryEstimate
    fits: bool

    def overrides(self, original: Recipe) -> list[str]:
        """`--set` options that turn `original` into the fitted recipe: every key a change touched, including the
        ones a change sets along with its own (alpha with the rank, the autocast with half-precision weights)."""
        from .recipe import recipe_to_dict
        from .recipe.toml import toml_value

        before, after = recipe_to_dict(original), recipe_to_dict(self.recipe)
        return [
            f"--set {section}.{key}={toml_value(value)}"
            for section, values in after.items()
            for key, value in values.items()
            if before.get(section, {}).get(key) != value
        ]


def fit(result: Plan, target_gib: float) -> Fit:
    """Apply FIT_CHANGES in order (each as often as it helps) until the run fits `target_gib` on the plan's OS."""
    recipe, memory = result.recipe, result.memory
    changes = []
    for key, applies, change, why in FIT_CHANGES:
        while not memory.verdict(target_gib, result.system)[0] and applies(recipe):
            section, name = key.split(".")
            before = getattr(getattr(recipe, section), name)
            recipe = change(recipe)
            changes.append((key, before, getattr(getattr(recipe, section), name), why))
            memory = estimate(recipe, result.architecture)
    return Fit(target_gib, recipe, changes, memory, memory.verdict(target_gib, result.system)[0])


def fit_lines(result: Plan, found: Fit) -> list[str]:
    import difflib

    from .recipe import dump_recipe

    memory = found.memory
    if not found.changes and found.fits:
        return [f"--fit {found.target_gib:g} GiB: the recipe fits as it is ({memory.process_gib:.1f} GiB)"]
    if not found.fits:
        smallest = min((g for g in sorted(set(GPUS.values())) if memory.verdict(g, result.system)[0]), default=None)
        raise RecipeError(
            f"--fit {found.target_gib:g} GiB: even with every change ({len(found.changes)}) the run needs "
            f"{memory.process_gib:.1f} GiB on {result.system}; the smallest common card it fits is "
            f"{smallest:g} GiB"
            if smallest
            else "more than any common card"
        )
    count = f"{len(found.changes)} change{'s' if len(found.changes) > 1 else ''}"
    lines = [
        f"--fit {found.target_gib:g} GiB: {count}, cheapest first, give "
        f"{memory.process_gib:.1f} GiB at the peak ({memory.peak_phase}):"
    ]
    lines += [f"  {key}: {before!r} -> {after!r} ({why})" for key, before, after, why in found.changes]
    lines.append("  lorakit train " + " ".join([str(result.recipe.source), *found.overrides(result.recipe)]))
    before, after = dump_recipe(result.recipe).splitlines(), dump_recipe(found.recipe).splitlines()
    lines += [line for line in difflib.unified_diff(before, after, "recipe", "fitted", lineterm="", n=0)]
    return lines


@dataclass
class Plan:
    recipe: Recipe
    architecture: str
    architecture_source: str
    memory: MemoryEstimate
    card_gib: float | None
    card_name: str
    system: str
    disk: Any
    steps: int  # the run's optimizer steps (train works out the same from max_epochs)
    steps_source: str  # where `steps` came from

    @property
    def fits(self) -> bool | None:
        return None if self.card_gib is None else self.memory.verdict(self.card_gib, self.system)[0]

    def seconds_per_step(self) -> float:
        """On an H200, from the measured step time, scaled by pixels x batch above the measured size."""
        reference, seconds = MEASURED_STEP["sdxl" if self.architecture == "sdxl" else "sd"]
        work = self.memory.bucket[0] * self.memory.bucket[1] * self.recipe.train.batch_size
        # [preservation]: a forward and backward pass (about three forwards' work) on twice the batch, and one
        # forward without the adapter: 7/3 of a plain step
        preserving = 7 / 3 if self.recipe.preserving else 1.0
        return (
            seconds
            * max(1.0, work / reference)
            * self.recipe.train.gradient_accumulation_steps
            * preserving
            * slider_work(self.recipe)
        )

    def minutes(self) -> dict[str, float]:
        """Rough minutes for the whole run per GPU class (only the H200 figure is measured)."""
        return {name: round(self.seconds_per_step() * self.steps / speed / 60, 1) for name, speed in GPU_SPEED.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.source,
            "architecture": self.architecture,
            "architecture_source": self.architecture_source,
            "memory": self.memory.to_dict(),
            "card": {"name": self.card_name, "gib": self.card_gib, "system": self.system, "fits": self.fits},
            "disk_bytes": dataclasses.asdict(self.disk),
            "steps": self.steps,
            "steps_source": self.steps_source,
            "minutes": self.minutes(),
        }


def plan(
    recipe: Recipe,
    *,
    vram: float | None = None,
    gpu: str | None = None,
    system: str = "linux",
    arch: str | None = None,
) -> Plan:
    """The plan of `recipe` for a card given by `vram` (GiB), `gpu` (a name in GPUS) or, failing both, the CUDA
    device of this machine (none on a CPU-only machine: no verdict)."""
    if system not in HEADROOM:
        raise RecipeError(f"--os {system!r}: use linux or windows")
    if vram is not None and gpu is not None:
        raise RecipeError("--vram and --gpu: give one")
    architecture, source = (arch, "--arch") if arch else architecture_of(recipe.model.base)
    trains = recipe.trains_text_encoder(architecture == "sdxl")
    recipe = dataclasses.replace(recipe, lora=dataclasses.replace(recipe.lora, train_text_encoder=trains))
    memory = estimate(recipe, architecture)
    card_gib, card_name = _card(vram, gpu)
    bucket, _ = largest_bucket(recipe)
    steps, steps_source = planned_steps(recipe)
    rows = (dataset_rows(recipe) or ASSUMED_IMAGES) * (1 + len(recipe.data.extra_resolutions))  # latents each
    if recipe.slider is not None:  # nothing to cache
        rows = 0
    disk = disk_bytes(_with(recipe, "train", max_steps=steps), memory.trainable, [bucket] * rows)
    return Plan(recipe, architecture, source, memory, card_gib, card_name, system, disk, steps, steps_source)


ASSUMED_IMAGES = 20  # the dataset's size while it is not prepared yet


def slider_work(recipe: Recipe) -> float:
    """A [slider] step's work in plain steps. A plain step is a forward and a backward pass, about three forward
    passes' work per latent (four with gradient checkpointing, which runs the forward pass again): call that c. A
    slider step is a forward and backward pass on twice the batch (2), the frozen base's three predictions (3 / c),
    and the denoising that made the latent: on average (denoise_steps - 1) / 2 forward passes on twice the batch,
    guidance's two halves ((denoise_steps - 1) / c); 2 + (denoise_steps + 2) / c in all. 1 for other runs."""
    if recipe.slider is None:
        return 1.0
    forwards = 4 if recipe.train.gradient_checkpointing else 3
    return 2 + (recipe.slider.denoise_steps + 2) / forwards


def planned_steps(recipe: Recipe) -> tuple[int, str]:
    """The run's optimizer steps and where the number comes from: `train.max_steps`, or `train.max_epochs` over the
    prepared dataset's buckets (one process; [prior] about doubles an epoch), as train works them out."""
    from .data import batches_per_epoch, steps_for_epochs

    cfg = recipe.train
    if cfg.max_epochs is None:
        return cfg.max_steps or DEFAULT_MAX_STEPS, "train.max_steps" if cfg.max_steps else "the default"
    copies = epoch_copies(recipe)
    batches = batches_per_epoch(copies.values(), batch_size=cfg.batch_size)
    how = f"train.max_epochs = {cfg.max_epochs}, {batches} batches per epoch"
    if not copies:
        batches = -(-ASSUMED_IMAGES // cfg.batch_size)
        how = f"train.max_epochs = {cfg.max_epochs}, {ASSUMED_IMAGES} images per epoch assumed (no prepared dataset)"
    if recipe.validation and recipe.validation.split:
        batches = max(1, round(batches * (1 - recipe.validation.split)))
        how += f", less validation.split's {recipe.validation.split:g}, about"
    if recipe.prior:
        batches *= 2
        how += ", doubled for the class images of [prior], about"
    return steps_for_epochs(cfg.max_epochs, batches, cfg.gradient_accumulation_steps), how


def _card(vram: float | None, gpu: str | None) -> tuple[float | None, str]:
    if vram is not None:
        return vram, f"{vram:g} GiB (--vram)"
    if gpu is not None:
        return find_gpu(gpu), gpu
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        return total, f"{torch.cuda.get_device_name(0)} (this machine)"
    return None, "none given and no CUDA device here"


def plan_lines(result: Plan) -> list[str]:
    memory, recipe = result.memory, result.recipe
    lines = [
        f"Plan for {recipe.source}: {NAMES[result.architecture]} (from {result.architecture_source}), largest bucket "
        f"{memory.bucket[0]}x{memory.bucket[1]} ({memory.bucket_source}), batch {memory.batch_size}; parts counted "
        f"on {memory.configs}",
        f"  {'phase':<15} {'part':<62} {'GiB':>6}",
    ]
    for part in memory.parts:
        mark = "" if part.how == "counted" else " *"
        lines.append(f"  {part.phase:<15} {part.name[:62]:<62} {part.gib:>6.2f}{mark}")
    for phase in memory.phases:
        lines.append(f"  {phase:<15} {'total':<62} {memory.phase_gib(phase):>6.2f}")
    lines.append(
        "  * modelled, not counted: "
        + "; ".join(sorted({p.how.removeprefix("modelled: ") for p in memory.parts if p.how != "counted"}))
    )
    lines.append(
        f"Load: {memory.loaded_gib:.2f} GiB of system memory holds the frozen weights from load on ("
        + ", ".join(f"{name} {gib:.2f}" for name, gib in memory.loaded.items())
        + "); each goes to the GPU for the phases above that list it"
    )
    lines.append(
        f"Peak: {memory.peak_phase}, {memory.allocated_gib:.2f} GiB allocated by PyTorch; about "
        f"{memory.process_gib:.2f} GiB for the process (nvidia-smi, Task Manager: adds the CUDA context and "
        "allocator slack)"
    )
    if result.card_gib is None:
        lines.append(f"Card: {result.card_name}; give --vram GiB or --gpu NAME for a verdict")
    else:
        lines.append(f"Card {result.card_name}: {memory.verdict(result.card_gib, result.system)[1]}")
        if not result.fits:
            smallest = min(
                (gib for gib in sorted(set(GPUS.values())) if memory.verdict(gib, result.system)[0]), default=None
            )
            lines.append(f"  the smallest common card it fits: {smallest:g} GiB" if smallest else "")
    lines.append(result.disk.line())
    minutes = result.minutes()
    lines.append(
        f"Time for {result.steps} steps ({result.steps_source}): "
        + ", ".join(f"{name} ~{m:g} min" for name, m in minutes.items())
        + " (all but the H200 figure are rough guesses)"
        + (
            f"; a [slider] step is about {slider_work(recipe):.1f} plain steps' work (slider.denoise_steps "
            f"{recipe.slider.denoise_steps} of denoising makes each latent)"
            if recipe.slider is not None
            else ""
        )
    )
    return [line for line in lines if line]


CARDS = (8, 12, 16, 24)  # the README's columns, GiB


def recipes_table(paths: list[str]) -> str:
    """The README's "Will it fit?" table: each recipe at its own settings, SD 1.x/2.x first, on Linux."""
    from .recipe import load_recipe

    plans = [plan(load_recipe(path)) for path in paths]
    plans.sort(key=lambda p: (p.architecture == "sdxl", Path(p.recipe.source).name))
    rows = [
        "| recipe | peak phase | allocated GiB | process GiB | "
        + " | ".join(f"{gib} GB" for gib in CARDS)
        + " | system memory at load, GiB |",
        "|---|---|---|---|" + "---|" * (len(CARDS) + 1),
    ]
    for result in plans:
        memory = result.memory
        verdicts = ["fits" if memory.verdict(gib)[0] else "no" for gib in CARDS]
        rows.append(
            f"| `{Path(result.recipe.source).name}` ({NAMES[result.architecture]}) | {memory.peak_phase} | "
            f"{memory.allocated_gib:.2f} | {memory.process_gib:.2f} | "
            + " | ".join(verdicts)
            + f" | {memory.loaded_gib:.2f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":  # python -m lorakit.plan recipes/*.toml: the README's table
    import sys

    print(recipes_table(sys.argv[1:]))

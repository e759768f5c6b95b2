"""Setting a run up: precision, the accelerator, LoRA injection, the items, and the latent and text caches."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import is_tensorboard_available
from diffusers.training_utils import cast_training_params
from torch.nn.parallel import DistributedDataParallel

from .. import adapters
from ..bake import merge_files, path_and_scale
from ..checkpoint import (
    RunPaths,
    check_run_folder,
    clean_interrupted_writes,
    create_run_folder,
    find_checkpoint,
    run_lock,
)
from ..data import (
    BatchStream,
    Item,
    LatentCache,
    at_resolutions,
    bucket_list,
    has_wildcards,
    load_class_items,
    load_items,
    margin,
    pair_items,
    split_held_out,
    steady_caption,
    steps_for_epochs,
    vae_fingerprint,
)
from ..devices import cpu_has_native_bf16
from ..dropout import AdapterDropout
from ..ema import AdapterEMA
from ..embedding import add_new_tokens, placeholder_names
from ..errors import AdapterError, DatasetError, LorakitError, OutputError, RecipeError, first_line
from ..files import atomic_write_text
from ..float8 import KEPT_IN_UNET, float8_names, store_in_float8
from ..formats.read import FAMILY_NAMES, check_against, read_adapter_file
from ..lycoris import KIND_NAMES
from ..memory import STATE_IN_PARAMETER_DTYPE, disk_bytes, mib
from ..memory import estimate as estimate_memory
from ..models import (
    BaseModel,
    apply_token_weights,
    encode_prompts,
    is_local,
    load_base,
    resolve_base,
    token_count,
    tokenize,
    tokenize_weighted,
)
from ..optim import build_lr_scheduler, build_optimizer
from ..progress import progress_bar
from ..prompt_syntax import plain_text
from ..recipe import AUTOCAST_DTYPES, DEFAULT_MAX_STEPS, Recipe, dump_recipe, recipe_to_dict
from ..slider import NoImages, SampleStrengths
from ..timestep_rank import TimestepRanks, active_ranks
from ..trigger import contains_trigger, replace_trigger
from .images import render_class_images
from .loop import (
    Log,
    Run,
    embedding_steps,
    encoder,
    held_out_items,
    restore,
    text_encoder_steps,
    timestep_weights,
)


def run_paths(recipe: Recipe) -> RunPaths:
    """The run folder the recipe names: `<output.folder>/<output.name>/`."""
    return RunPaths(Path(recipe.output.folder).expanduser() / recipe.output.name, recipe.output.name)


def resolve_recipe(recipe: Recipe, base: BaseModel) -> Recipe:
    """The recipe with every default that depends on the base filled in and every path absolute."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    model = dataclasses.replace(recipe.model, base=base.source, prediction_type=base.prediction_type)
    lora = dataclasses.replace(recipe.lora, train_text_encoder=recipe.trains_text_encoder(base.family == "sdxl"))
    folder = recipe.data.folder
    data = dataclasses.replace(
        recipe.data, folder=absolute(folder) if isinstance(folder, str) else [absolute(f) for f in folder]
    )
    if recipe.slider is not None:  # it reads no dataset (and the resolved recipe must still be one)
        data = recipe.data
    output = dataclasses.replace(recipe.output, folder=absolute(recipe.output.folder))
    merged = [f"{absolute(path)}:{scale:g}" for path, scale in map(path_and_scale, recipe.model.merged_adapters)]
    model = dataclasses.replace(model, merged_adapters=merged)
    prior = recipe.prior and dataclasses.replace(recipe.prior, class_dir=absolute(recipe.prior.class_dir))
    validation = recipe.validation and dataclasses.replace(
        recipe.validation, folder=recipe.validation.folder and absolute(recipe.validation.folder)
    )
    count = base.noise_scheduler.config.num_train_timesteps
    _check_schedule(recipe, base, count)
    if recipe.train.text_encoder_2_lr is not None and not (base.family == "sdxl" and lora.train_text_encoder):
        why = (
            f"{base.source} has one text encoder"
            if base.family != "sdxl"
            else "the text encoders are not trained (lora.train_text_encoder is false, SDXL's default)"
        )
        raise RecipeError(
            f"train.text_encoder_2_lr: {why}, so it would do nothing; it is the rate of an SDXL base's second text "
            "encoder with lora.train_text_encoder = true"
        )
    if recipe.train.text_encoder_until < 1 and not lora.train_text_encoder:
        raise RecipeError(
            f"train.text_encoder_until: {recipe.train.text_encoder_until:g} stops the text encoders' adapters, but "
            "lora.train_text_encoder is false (SDXL's default), so there are none; set it true, or remove this key"
        )
    train = recipe.train
    if recipe.slider is None:  # a slider's timestep is where the base's denoising stopped
        train = dataclasses.replace(train, max_timestep=train.max_timestep or count)
    return dataclasses.replace(
        recipe, model=model, lora=lora, data=data, output=output, prior=prior, validation=validation, train=train
    )


def _resolve_length(recipe: Recipe, batches: int, log: Log) -> Recipe:
    """The recipe with `train.max_steps` set: as given, from `train.max_epochs` and the `batches` each process
    takes per epoch, or 1000."""
    cfg = recipe.train
    steps = cfg.max_steps or DEFAULT_MAX_STEPS
    if cfg.max_epochs is not None:
        steps = steps_for_epochs(cfg.max_epochs, batches, cfg.gradient_accumulation_steps)
        worked = (
            f"{cfg.max_epochs} epochs of {batches} batches"
            + (f" in steps of {cfg.gradient_accumulation_steps}" if cfg.gradient_accumulation_steps > 1 else "")
            + f" are {steps} steps"
        )
        if cfg.max_steps is not None and cfg.max_steps != steps:
            raise RecipeError(
                f"{recipe.source}: train.max_steps = {cfg.max_steps} disagrees with train.max_epochs = "
                f"{cfg.max_epochs} ({worked} for this dataset); remove one of them"
            )
        log(f"train.max_epochs: {worked}")
    return dataclasses.replace(recipe, train=dataclasses.replace(cfg, max_steps=steps))


def _check_schedule(recipe: Recipe, base: BaseModel, count: int) -> None:
    """Timesteps and prediction type that the base's scheduler can serve (else a one-line RecipeError)."""
    if base.prediction_type not in ("epsilon", "v_prediction"):
        raise RecipeError(
            f"model.base: {base.source}'s scheduler has prediction_type {base.prediction_type!r}; lorakit trains "
            "'epsilon' and 'v_prediction' models (set model.prediction_type if the scheduler config is wrong)"
        )
    if base.family == "sdxl" and recipe.model.clip_skip != 1:
        raise RecipeError(
            f"model.clip_skip: {recipe.model.clip_skip} is not defined for SDXL, which already conditions on the "
            "penultimate layer of both text encoders; leave model.clip_skip = 1"
        )
    if recipe.train.scale_v_pred_loss_like_noise_pred and base.prediction_type != "v_prediction":
        raise RecipeError(
            f"train.scale_v_pred_loss_like_noise_pred: {base.source} predicts {base.prediction_type!r}, and the "
            "weight only applies to v-prediction; remove it (or set model.prediction_type if the scheduler is wrong)"
        )
    if recipe.train.v_pred_like_loss and base.prediction_type == "v_prediction":
        raise RecipeError(
            f"train.v_pred_like_loss: {base.source} already predicts v (its loss is the v loss); remove it, or use "
            "train.scale_v_pred_loss_like_noise_pred to weigh it like a noise-prediction loss"
        )
    if recipe.model.zero_terminal_snr and base.prediction_type != "v_prediction":
        raise RecipeError(
            "model.zero_terminal_snr: the last timestep is pure noise, which an epsilon-prediction model cannot "
            'denoise; use it with model.prediction_type = "v_prediction" (a v-prediction base)'
        )
    cfg = recipe.train
    if cfg.max_timestep is not None and cfg.max_timestep > count:
        raise RecipeError(f"train.max_timestep: {cfg.max_timestep} is above the scheduler's {count} timesteps")
    if cfg.min_timestep >= count:
        raise RecipeError(f"train.min_timestep: {cfg.min_timestep} must be below the scheduler's {count} timesteps")
    try:
        timestep_weights(dataclasses.replace(cfg, max_timestep=cfg.max_timestep or count), count)
    except ValueError as err:
        raise RecipeError(
            f"train.timestep_bias: {err} (timestep_bias_multiplier 0 never draws the biased ones); raise the "
            "multiplier or widen train.min_timestep / max_timestep"
        ) from None
    for timestep in recipe.validation.timesteps if recipe.validation else ():
        if not 0 <= timestep < count:
            raise RecipeError(f"validation.timesteps: {timestep} is outside the scheduler's range [0, {count})")


def _check_prepared_resolution(recipe: Recipe, log: Log) -> None:
    """State it when a dataset was prepared at another resolution than the one trained at (its images are
    re-bucketed to data.resolution, which upscales or downscales them)."""
    folders = recipe.data.folder if isinstance(recipe.data.folder, list) else [recipe.data.folder]
    for folder in folders:
        info_path = Path(folder) / "dataset.json"
        try:
            prepared = json.loads(info_path.read_text(encoding="utf-8")).get("resolution")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(prepared, int) and prepared != recipe.data.resolution:
            log(
                f"data.resolution: {info_path} says its images were prepared at {prepared} px; training at "
                f"{recipe.data.resolution} px re-buckets them (set data.resolution = {prepared} to train as prepared)"
            )


def set_up(
    recipe: Recipe,
    *,
    overwrite: bool,
    resume: str | None,
    quiet: bool,
    log: Log,
    hold: Callable[[contextlib.AbstractContextManager], Any] = lambda manager: manager.__enter__(),
    strict_memory: bool = False,
) -> Run:
    """Everything before the first step: base, items, adapters, optimizer, caches, run folder, resumed state.

    `hold` keeps a context (the run folder's lock) entered until the caller's run ends (`train` passes its
    ExitStack's `enter_context`).
    """

    phases = Phases()
    paths = run_paths(recipe)
    checkpoint = find_checkpoint(paths.folder, resume, log) if resume else None
    if checkpoint is None:
        check_run_folder(paths.folder, overwrite)
    check_trackers(recipe.output.log_with)
    precision, weight_dtype = _precision(recipe, log)
    base = _load_base(recipe, _load_dtype(precision, weight_dtype), log)
    phases.done("load base model")
    recipe = resolve_recipe(recipe, base)
    cfg = recipe.train
    wandb_id = wandb_run_id(paths.folder, resuming=checkpoint is not None)
    accelerator = _accelerator(precision, paths.folder, _trackers(recipe, paths.folder, wandb_id))
    phases.done("accelerate set-up")
    say = log if accelerator.is_main_process else (lambda _: None)
    quiet = quiet or not accelerator.is_main_process
    if recipe.model.merged_adapters:  # before anything sees the base: class images, samples, text caching
        said = merge_files(recipe.model.merged_adapters, base.adaptable, base.family, "model.merged_adapters")
        say(f"model.merged_adapters: {said}; the adapter trains on top")
    if recipe.prior and accelerator.is_main_process:
        render_class_images(recipe, base, accelerator, say, quiet)
    accelerator.wait_for_everyone()
    rank, world = accelerator.process_index, accelerator.num_processes
    if recipe.slider is not None:  # prompts alone: no dataset to read
        items, split_off, stream = [], [], NoImages()
        _state_slider(recipe, base, say)
    else:
        _check_prepared_resolution(recipe, say)
        items, split_off = _load_all_items(recipe, base, say)
        phases.done("read dataset")
        if base.family == "sdxl":
            _state_sdxl_choices(recipe, items, say)
        _state_masks(recipe, items, say)
        if recipe.data.random_crop:
            _state_margins(items, say)
        if recipe.data.color_aug:
            say(
                "data.color_aug: at each step about a third of the images change colour (a hue rotation of up to 16 "
                "degrees, or a gamma of 0.95 to 1.05) before the VAE encodes them"
            )
        if recipe.preserving:
            _state_preservation(recipe, items, say)
        elif recipe.preservation is not None:
            say("preservation.weight = 0: output preservation is off")
        partners = _pairs(recipe, items, say) if recipe.data.pairs else None
        stream = BatchStream(
            items, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world=world, partners=partners
        )
    recipe = _resolve_length(recipe, stream.batches_per_epoch, say)
    cfg = recipe.train
    if cfg.text_encoder_until < 1:
        say(
            f"train.text_encoder_until: the text encoders' adapters learn for the first {text_encoder_steps(recipe)} "
            f"of {cfg.max_steps} steps, then the U-Net's goes on alone"
        )
    torch.manual_seed(cfg.seed)
    trained = _inject(recipe, base, say)
    embeddings = _add_embedding(recipe, base, items, say) if recipe.embedding else {}
    if cfg.full_bf16:
        _train_in_bfloat16(recipe, trained, embeddings, say)
    if weight_dtype == "float8":  # after the adapters and new tokens exist: their own weights stay float32
        _store_in_float8(base, _load_dtype(precision, weight_dtype), recipe.model.float8_text_encoders, say)
    if recipe.lora.tlora_min_rank is not None:
        _mask_ranks_by_timestep(recipe, base, say)
    dropout = None
    if recipe.lora.neuron_dropout or recipe.lora.rank_dropout or recipe.lora.module_dropout:
        dropout = _drop_inside_adapters(recipe, trained, say)
    strengths = SampleStrengths(trained.values()) if recipe.strengths_vary else None
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(base, trained)
    _speed_settings(recipe, base, trained, accelerator.device, say)
    optimizer = build_optimizer(cfg, _parameter_groups(recipe, trained, embeddings))
    if getattr(optimizer, "defaults", {}).get("fused"):
        say("train.optimizer: AdamW with PyTorch's fused CUDA kernel (one kernel for every parameter)")
    lr_scheduler = build_lr_scheduler(cfg, optimizer)
    planned = None
    if accelerator.is_main_process:
        _preflight_disk(recipe, base, items, trained, paths.folder, say)
        if accelerator.device.type == "cuda":
            planned = _preflight_memory(recipe, base, items, trained, accelerator.device, strict_memory, say)
    phases.done("adapters and optimizer")
    if accelerator.is_main_process:
        hold(run_lock(paths.folder))  # before anything in the run folder is removed or written
        if checkpoint is None:
            create_run_folder(paths.folder, overwrite)
        else:
            cleaned = clean_interrupted_writes(paths.folder)
            if cleaned:
                say(f"--resume: removed {cleaned} half-written files the interrupted run left in {paths.folder}")
    accelerator.wait_for_everyone()
    held_out = split_off or held_out_items(recipe, base)
    cache, text_cache = _fill_caches(recipe, base, items, held_out, accelerator.device, say, quiet, trained)
    phases.done("latent and text caches")
    models, optimizer = _prepare(accelerator, trained, optimizer)
    for module in models.values():
        module.train()
    run = Run(
        recipe,
        base,
        items,
        accelerator,
        models,
        optimizer,
        lr_scheduler,
        stream,
        cache,
        text_cache,
        None,
        paths,
        say,
        quiet,
        held_out=held_out,
        embeddings=embeddings,
        dropout=dropout,
        strengths=strengths,
        timestep_weights=timestep_weights(cfg, base.noise_scheduler.config.num_train_timesteps),
    )
    run.planned_gib = planned
    if cfg.ema_decay:
        run.ema = AdapterEMA(run.named_trainable(), cfg.ema_decay)
    if checkpoint is not None:
        restore(run, checkpoint, say)
    if accelerator.is_main_process:
        atomic_write_text(paths.recipe, dump_recipe(recipe))
    if accelerator.log_with:
        _start_trackers(accelerator, recipe, paths.folder, wandb_id)
    phases.done("prepare, resume and trackers")
    run.phases = phases
    return run


def _prepare(accelerator: Any, trained: dict[str, Any], optimizer: Any) -> tuple[dict[str, Any], Any]:
    """The trained modules on the device, DDP-wrapped by accelerate when several processes run, and the optimizer
    prepared. A module with nothing to train (the U-Net of an `[embedding] only` run) is only moved: DDP refuses a
    module without gradients on CPU processes, and accelerate leaves it unwrapped on GPUs."""
    learning = {name: m for name, m in trained.items() if any(p.requires_grad for p in m.parameters())}
    for module in learning.values():  # every process stored the same float8 weights: DDP need not broadcast them
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, float8_names(module))
    prepared = accelerator.prepare(*learning.values(), optimizer)
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    wrapped = dict(zip(learning, prepared[:-1], strict=True))
    models = {
        name: wrapped[name] if name in wrapped else module.to(accelerator.device) for name, module in trained.items()
    }
    return models, prepared[-1]


class Phases:
    """Wall time of each phase before the first step (`lorakit train --verbose` prints them)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now

    def lines(self) -> list[str]:
        total = sum(self.seconds.values())
        return [f"  {seconds:7.3f} s  {name}" for name, seconds in self.seconds.items()] + [
            f"  {total:7.3f} s  in all"
        ]


def _state_sdxl_choices(recipe: Recipe, items: list[Item], log: Log) -> None:
    """Say what SDXL training does on its own: the VAE's precision, and what size conditioning assumes."""
    vae = f"model.vae {recipe.model.vae}" if recipe.model.vae else "the base's VAE"
    log(f"SDXL: latents are encoded in float32 with {vae} (the SDXL VAE overflows in float16)")
    assumed = sum(item.original_size is None for item in items)
    if assumed:
        log(
            f"data: {assumed} of {len(items)} images have no original size and crop in metadata.jsonl; SDXL's "
            "size conditioning takes each as stored, centre-cropped to its bucket (`lorakit prepare` records both)"
        )


def _load_base(recipe: Recipe, weight_dtype: str, log: Log) -> BaseModel:
    resolve_base(recipe.model.base)
    if not is_local(recipe.model.base):
        log(f"Loading base model {recipe.model.base} from the Hugging Face hub or its cache")
    return load_base(
        recipe.model.base,
        prediction_type=recipe.model.prediction_type,
        revision=recipe.model.revision,
        vae=recipe.model.vae,
        weight_dtype=weight_dtype,
        config=recipe.model.config,
        zero_terminal_snr=recipe.model.zero_terminal_snr,
        log=log,
    )


def _enable_gradient_checkpointing(base: BaseModel, trained: dict[str, Any]) -> None:
    base.unet.enable_gradient_checkpointing()
    for name, module in trained.items():
        if name != "unet":
            # transformers 5.2x renamed the switch; the old name still works but warns on every run.
            enable = getattr(module, "activation_checkpointing_enable", None)
            (enable or module.gradient_checkpointing_enable)({"use_reentrant": False})


def _parameter_groups(
    recipe: Recipe, trained: dict[str, Any], embeddings: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One group per trained component at its learning rate. With block-wise rates the U-Net's adapters are grouped
    by their block's factor (`unet@0.5` at half `unet_lr`; factor 1 stays `unet`); with LoRA+ each group's
    up-projections go in a group of their own (`<name>.up`) at the LoRA+ ratio times its rate (the U-Net's or the
    text encoders' own ratio where given, else `loraplus_lr_ratio`). New token
    vectors ([embedding]) are the last group, `embedding`."""
    cfg = recipe.train
    weights, layers = _block_weights(recipe, trained["unet"])
    groups = []
    for name, module in trained.items():
        lr = cfg.unet_lr if name == "unet" else cfg.text_encoder_lr
        if name == "text_encoder_2" and cfg.text_encoder_2_lr is not None:
            lr = cfg.text_encoder_2_lr
        by_factor: dict[float, dict[str, Any]] = {}
        for path, parameter in adapters.named_lora_parameters(module).items():
            factor = adapters.block_lr_weight(path, weights, layers) if name == "unet" else 1.0
            by_factor.setdefault(factor, {})[path] = parameter
        for factor, named in sorted(by_factor.items(), key=lambda kv: -kv[0]):
            label = name if factor == 1.0 else f"{name}@{factor:g}"
            part = cfg.loraplus_unet_lr_ratio if name == "unet" else cfg.loraplus_text_encoder_lr_ratio
            ratio = part if part is not None else cfg.loraplus_lr_ratio
            if ratio is None:
                groups.append({"params": list(named.values()), "name": label, "lr": lr * factor})
                continue
            up = [p for n, p in named.items() if adapters.is_up_projection(n)]
            rest = [p for n, p in named.items() if not adapters.is_up_projection(n)]
            groups.append({"params": rest, "name": label, "lr": lr * factor})
            groups.append({"params": up, "name": f"{label}.up", "lr": lr * factor * ratio})
    if embeddings:
        vectors = [m.vectors for m in embeddings.values()]
        groups.append({"params": vectors, "name": "embedding", "lr": recipe.embedding.lr})
    return groups


def _preflight_disk(
    recipe: Recipe, base: BaseModel, items: list[Item], trained: dict, run_dir: Path, log: Log
) -> None:
    """Before the caches and the first step: what the run will write (latent cache, checkpoints, adapter files),
    said in the log, and refused in one line when the disk holding it has less free space."""
    numels = [p.numel() for m in trained.values() for p in m.parameters() if p.requires_grad]
    disk = disk_bytes(recipe, numels, [item.bucket for item in items], base.vae_scale_factor)
    log(disk.line())
    latents, outputs = disk.latents, disk.checkpoints + disk.adapters
    places = [(outputs, _existing(run_dir), "checkpoints and adapter files")]
    cache = _existing(_cache_root(recipe))
    if cache.stat().st_dev == places[0][1].stat().st_dev:  # one disk holds both
        places = [(outputs + latents, places[0][1], "the latent cache, checkpoints and adapter files")]
    else:
        places.append((latents, cache, "the latent cache"))
    for need, folder, what in places:
        free = shutil.disk_usage(folder).free
        if need > free:
            raise OutputError(
                f"output: {what} need about {mib(need)} under {folder} but only {mib(free)} is free there; free "
                "space, or lower train.keep_checkpoints (or set train.cache_latents = false)"
            )


def _state_margins(items: list[Item], log: Log) -> None:
    """data.random_crop: how many images have a margin to move the crop in; none is refused, never a silent no-op."""
    margins = [margin(item) for item in items]
    moving = [m for m in margins if max(m) > 0]
    if not moving:
        folders = sorted({item.folder for item in items})
        raise DatasetError(
            f"data.random_crop: no image of {', '.join(folders)} is larger than its bucket, so a crop has nowhere to "
            "move (lorakit prepare crops each photo to its bucket); prepare the photos again with --keep-margin, or "
            "set data.random_crop = false"
        )
    widest = max(max(m) for m in moving)
    log(
        f"data.random_crop: {len(moving)} of {len(items)} images have a margin around their bucket (up to {widest} "
        "px) and are cropped at a random place of it at each step; the others at their centre"
    )


def _state_masks(recipe: Recipe, items: list[Item], log: Log) -> None:
    """Masked loss: how many images have a mask (never a silent mix); masks that would go unused are said too."""
    masked = sum(item.mask is not None for item in items)
    data = recipe.data
    if data.masked_loss and not masked:
        raise DatasetError(
            "data.masked_loss: no image of the dataset has a mask; give rows a mask_file_name in metadata.jsonl "
            "(a greyscale image of the photo's size, white where the subject is) or set data.masked_loss = false"
        )
    if data.masked_loss:
        log(
            f"data.masked_loss: {masked} of {len(items)} images weighted by their masks (background weight "
            f"{data.mask_background_weight:g}{', ignored entirely' if data.mask_background_weight == 0 else ''}); "
            f"{len(items) - masked} without a mask train unmasked"
        )
    elif masked:
        log(f"{masked} images name a mask; set data.masked_loss = true to weight the loss by them")


def _preflight_memory(
    recipe: Recipe, base: BaseModel, items: list[Item], trained: dict, device: Any, strict: bool, log: Log
) -> float:
    """`lorakit plan`'s estimate for this run on this GPU, from the loaded models: a warning when it will not
    fit (a refusal with --strict-memory). Returns the estimated allocator peak of the training steps, GiB."""
    modules = {**base.adaptable, "vae": base.vae}
    counts, stored = {}, {}
    for name, module in modules.items():
        trainable, total = adapters.count_parameters(module)
        counts[name] = total - trainable  # frozen weights only
        frozen = [p for p in module.parameters() if not p.requires_grad] + list(module.buffers())
        stored[name] = sum(t.numel() * t.element_size() for t in frozen)
    numels = [p.numel() for m in trained.values() for p in m.parameters() if p.requires_grad]
    side = max(recipe.data.resolution, *recipe.data.extra_resolutions)
    bucket = max((item.bucket for item in items), key=lambda b: b[0] * b[1]) if items else (side, side)
    architecture = "sdxl" if base.family == "sdxl" else "sd15"
    planned = estimate_memory(recipe, architecture, counts=counts, trainable=numels, bucket=bucket, stored=stored)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    system = "windows" if sys.platform == "win32" else "linux"
    fits, verdict = planned.verdict(total, system)
    if not fits:
        message = (
            f"memory: this run needs about {planned.process_gib:.1f} GiB at its peak ({planned.peak_phase}) and "
            f"this GPU has {total:.1f} GiB; `lorakit plan {recipe.source} --fit {int(total)}GB` lists the cheapest "
            "changes that make it fit"
        )
        if strict:
            raise LorakitError(message + " (--strict-memory)")
        log("warning: " + message)
    else:
        log(f"memory: {verdict}")
    return planned.phase_gib("training step")


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing parent (what a not yet created folder will be on)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _fill_caches(
    recipe: Recipe,
    base: BaseModel,
    items: list[Item],
    held_out: list[Item],
    device: Any,
    log: Log,
    quiet: bool,
    trained: dict[str, Any] | None = None,
) -> tuple[LatentCache | None, dict[str, Any] | None]:
    """Encode latents (when cached) and the text of every caption (when the text encoder is frozen), then move
    the encoders that are no longer needed back to the CPU.

    On a GPU one model works at a time: the trained modules wait on the CPU while the VAE encodes (the VAE at
    1024 px needs more memory than a training step of SDXL) and the VAE leaves before the text encoders come.
    Moving a module keeps its parameter objects, so the optimizer built on them stays valid."""
    parked = list((trained or {}).values()) if device.type == "cuda" else []
    for module in parked:
        module.to("cpu")
    cache = None
    base.vae.to(device if recipe.slider is None else "cpu")  # a slider encodes no images
    if recipe.train.cache_latents and recipe.slider is None:
        cache = LatentCache(_cache_root(recipe), vae_fingerprint(base.vae), base.vae_scale_factor)
        flips = (False, True) if recipe.data.flip else (False,)
        with progress_bar("Caching latents", len(items), quiet=quiet) as bar:
            try:
                fresh = cache.fill(items, flips, encoder(base, device), bar.advance)
            except OSError as err:
                raise OutputError(
                    f"data: could not write the latent cache in {cache.folder}: {err.strerror or err}; free space "
                    "there, or set train.cache_latents = false"
                ) from None
        log(f"Latents: {len(items) * len(flips)} cached ({fresh} newly encoded) in {cache.folder}")
        base.vae.to("cpu")
    for module in base.text_encoders:
        module.to(device)
    text_cache = _text_cache(recipe, base, items + held_out, device, log)
    if text_cache is not None:
        for module in base.text_encoders:
            module.to("cpu")
    for module in parked:
        module.to(device)
    return cache, text_cache


@contextlib.contextmanager
def process_switches_kept() -> Iterator[None]:
    """Put back the process-wide torch switches a run changes (TF32 for matmuls and cuDNN) when it ends, so a
    program that calls `train` keeps its own numerics afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _speed_settings(recipe: Recipe, base: BaseModel, trained: dict[str, Any], device: Any, log: Log) -> None:
    """The fast paths that are safe on this device, each said in the log; and what a CPU run costs."""
    cfg = recipe.train
    processors = sorted({type(p).__name__ for p in base.unet.attn_processors.values()})
    text = sorted({str(getattr(m.config, "_attn_implementation", "eager")) for m in base.text_encoders})
    allowed = ""
    if device.type == "cuda":
        kernels = (
            ("flash", torch.backends.cuda.flash_sdp_enabled()),
            ("memory-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
            ("cuDNN", torch.backends.cuda.cudnn_sdp_enabled()),
            ("math", torch.backends.cuda.math_sdp_enabled()),
        )
        allowed = f"; CUDA kernels allowed: {', '.join(n for n, on in kernels if on)} (torch picks one per call)"
    kinds = f"U-Net {'/'.join(processors)}, text encoder {'/'.join(text)}"
    log(f"attention: {kinds} (scaled_dot_product_attention){allowed}")
    if device.type == "cuda":
        for module in trained.values():
            module.to(device)  # before the optimizer is built, so AdamW can use its fused CUDA kernel
        if torch.cuda.get_device_capability(device)[0] >= 8:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
            log(
                "train.allow_tf32: float32 matmuls and convolutions on TF32 tensor cores (Ampere or later)"
                if cfg.allow_tf32
                else "train.allow_tf32 = false: float32 matmuls in full float32 (slower on this GPU)"
            )
        base.unet.to(memory_format=torch.channels_last)
        log("U-Net weights in channels-last memory format (faster convolutions on CUDA)")
    elif cfg.optimizer == "adamw8bit":
        log(
            "train.optimizer: adamw8bit on a CPU keeps its promise (8-bit state) but each step costs about 6x AdamW's "
            '(0.70 s vs 0.11 s for SD 1.5\'s rank-16 LoRA on one core); "adamw" is faster here if memory allows'
        )
    if cfg.compile:
        base.unet.compile(dynamic=False)  # one graph per bucket shape; dynamic shapes trip inductor on CPU
        log("train.compile: the U-Net is compiled with torch.compile during the first step")


def _precision(recipe: Recipe, log: Log) -> tuple[str, str]:
    """(mixed precision, frozen weight dtype) actually used on this machine.

    fp16 autocast does nothing on a CPU. Most CPUs emulate bf16 several times slower than float32, so an fp16
    recipe runs bf16 only where the CPU computes it natively, else float32; either way it says so.
    """
    precision, weight_dtype = recipe.train.mixed_precision, recipe.model.weight_dtype
    if precision == "fp16" and not torch.cuda.is_available():
        if cpu_has_native_bf16():
            log("train.mixed_precision: fp16 autocast does nothing on a CPU; this CPU computes bf16, training in bf16")
            precision, weight_dtype = "bf16", "bfloat16" if weight_dtype == "float16" else weight_dtype
        else:
            log(
                "train.mixed_precision: fp16 autocast does nothing on a CPU and this CPU only emulates bf16 (slow); "
                "training in float32"
            )
            precision, weight_dtype = "no", "float32"
    wanted = {dtype: precision for precision, dtype in AUTOCAST_DTYPES.items()}.get(weight_dtype)
    if wanted and precision != wanted:
        raise LorakitError(
            f'model.weight_dtype: {weight_dtype} weights need train.mixed_precision = "{wanted}" '
            f'(it is "{precision}"); or keep weight_dtype = "float32"'
        )
    return precision, weight_dtype


def _load_dtype(precision: str, weight_dtype: str) -> str:
    """The dtype the base is read in: `weight_dtype`, or for float8 the compute dtype its stored weights dequantize
    to (the autocast dtype; float32 without autocast)."""
    if weight_dtype != "float8":
        return weight_dtype
    return AUTOCAST_DTYPES.get(precision, "float32")


def _train_in_bfloat16(recipe: Recipe, trained: dict[str, Any], embeddings: dict[str, Any], log: Log) -> None:
    """train.full_bf16: every trained tensor (LoRA factors, DoRA magnitudes, new token vectors) becomes bfloat16 in
    place, so the optimizer, the checkpoints and DDP see the same parameters, and their gradients are bfloat16 too."""
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    params += [m.vectors for m in embeddings.values()]
    with torch.no_grad():
        for param in params:
            param.data = param.data.to(torch.bfloat16)
    saved = sum(p.numel() for p in params) * 2 * 2  # 2 bytes less for each weight and for its gradient
    optimizer = recipe.train.optimizer
    state = (
        f"; {optimizer}'s own state is bfloat16 too"
        if optimizer in STATE_IN_PARAMETER_DTYPE
        else f"; {optimizer}'s state keeps its own dtype"
    )
    rounding = (
        "; each step rounds them stochastically (train.stochastic_rounding)"
        if recipe.train.rounds_stochastically
        else "; each step rounds them to nearest (train.stochastic_rounding = false)"
    )
    log(
        f"train.full_bf16: {len(params)} trained tensors and their gradients are bfloat16 ({mib(saved)} less than "
        f"float32){state}{rounding}"
    )


def _store_in_float8(base: BaseModel, compute: str, text_encoders: bool, log: Log) -> None:
    """model.weight_dtype = "float8": the frozen Linear and Conv2d weights of the U-Net (and text encoders), stored."""
    layers, saved = 0, 0
    for name, module in base.adaptable.items():
        if name == "unet" or text_encoders:
            stored, freed = store_in_float8(module, getattr(torch, compute), KEPT_IN_UNET if name == "unet" else ())
            layers, saved = layers + stored, saved + freed
    size = f"{saved / 2**30:.2f} GiB" if saved >= 2**30 else mib(saved)
    which = "U-Net and text encoders" if text_encoders else "U-Net (model.float8_text_encoders = false)"
    log(
        f"model.weight_dtype: {layers} frozen Linear and Conv2d weights of the {which} stored in float8 e4m3 with a "
        f"scale per output channel ({size} less than {compute}); they compute in {compute}, as does the rest of the "
        "base (the VAE stays float32)"
    )


def _accelerator(precision: str, run_dir: Path, trackers: list[Any]) -> Any:

    # accelerate keeps precision in a process-wide singleton; a second train() in the same process
    # (a notebook, the tests) must be free to choose another, so forget the previous run's choice.
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: under torchrun this is what makes the processes one gloo job.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=trackers or None,
        project_dir=str(run_dir),
    )


WANDB_LOCAL_MODES = ("offline", "disabled", "dryrun")  # WANDB_MODE values that need no account


def check_trackers(log_with: list[str]) -> None:
    """Before anything is loaded: a wandb tracker needs the wandb package, and an account unless WANDB_MODE keeps the
    run local. LorakitError says which and what to do. Only the first process asks (a terminal may prompt for the
    key, as wandb does)."""
    if "wandb" not in log_with:
        return
    try:
        import wandb
    except ImportError:
        raise LorakitError(
            "output.log_with: 'wandb' needs the wandb package; run `pip install wandb`, or remove it"
        ) from None
    if os.environ.get("WANDB_MODE", "").lower() in WANDB_LOCAL_MODES or os.environ.get("RANK", "0") != "0":
        return
    try:
        wandb.login(verify=False)
    except wandb.errors.Error as err:
        raise LorakitError(
            f"output.log_with: wandb has no account to log to ({first_line(err)}); run `wandb login` or set "
            "WANDB_API_KEY, or set WANDB_MODE=offline to log into the run folder and `wandb sync` it later"
        ) from None


WANDB_ID_FILE = Path("wandb") / "lorakit-run-id"  # in the run folder: the W&B run a resume continues


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The Weights & Biases run id: the one the run folder recorded when resuming, so that the resumed steps continue
    the same W&B run; a new one otherwise."""
    recorded = run_dir / WANDB_ID_FILE
    if resuming and recorded.is_file():
        text = recorded.read_text(encoding="utf-8").strip()
        if text.isalnum():
            return text
    return secrets.token_hex(4)


def _trackers(recipe: Recipe, run_dir: Path, wandb_id: str) -> list[Any]:
    """The recipe's trackers: TensorBoard into the run folder's `tensorboard/` (when the package is installed), Weights
    & Biases into `output.wandb_project` as the run `wandb_id` named `output.name`, its local files in the run
    folder."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    wanted = recipe.output.log_with
    trackers: list[Any] = []
    if "tensorboard" in wanted and is_tensorboard_available():
        trackers.append(TensorBoardTracker("tensorboard", str(run_dir)))
    if "wandb" in wanted:
        output = recipe.output
        trackers.append(
            WandBTracker(output.wandb_project, name=output.name, dir=str(run_dir), id=wandb_id, resume="allow")
        )
    return trackers


def _start_trackers(accelerator: Any, recipe: Recipe, run_dir: Path, wandb_id: str) -> None:
    """Start the trackers; Weights & Biases also gets the resolved recipe as its run's config (section.key), and the
    run folder records the W&B run's id for a resume."""
    accelerator.init_trackers("tensorboard")  # the trackers are built already: the name is theirs
    if accelerator.is_main_process and "wandb" in recipe.output.log_with:
        (run_dir / WANDB_ID_FILE).parent.mkdir(exist_ok=True)
        atomic_write_text(run_dir / WANDB_ID_FILE, wandb_id + "\n")
        flat = {
            f"{section}.{key}": value
            for section, keys in recipe_to_dict(recipe).items()
            for key, value in keys.items()
        }
        accelerator.get_tracker("wandb").store_init_configuration(flat)


def _inject(recipe: Recipe, base: BaseModel, log: Log) -> dict[str, Any]:
    """Freeze the base and add LoRA to the U-Net (and text encoders); return the trained modules by name."""

    lora = recipe.lora
    trained = base.adaptable if lora.train_text_encoder else {"unet": base.unet}
    if recipe.embedding and recipe.embedding.only:  # textual inversion: every weight of the base stays frozen
        for module in base.adaptable.values():
            module.requires_grad_(False)
        log("embedding.only: no LoRA; only the new token vectors train (textual inversion)")
        return {"unet": base.unet}
    counts = []
    zero_blocks = _zero_rate_modules(recipe, base, log)
    ranks, alphas = _block_ranks(recipe, base, log)
    conv_ranks, conv_alphas = _block_ranks(recipe, base, log, conv=True)
    for component, module in trained.items():
        names = adapters.inject_lora(
            module,
            component,
            rank=lora.rank,
            lora_alpha=lora.lora_alpha,
            dropout=lora.dropout,
            target_modules=lora.target_modules,
            conv_rank=lora.conv_rank,
            conv_alpha=lora.conv_alpha,
            use_dora=lora.use_dora,
            skip_layers=_unused_layers(module, recipe.model.clip_skip) if component != "unet" else (),
            skip_modules=zero_blocks if component == "unet" else (),
            module_ranks=ranks if component == "unet" else None,
            module_alphas=alphas if component == "unet" else None,
            conv_module_ranks=conv_ranks if component == "unet" else None,
            conv_module_alphas=conv_alphas if component == "unet" else None,
            kind=lora.type,
            lycoris_options={
                "decompose_factor": lora.decompose_factor,
                "decompose_both": lora.decompose_both,
                "use_effective_conv2d": lora.use_effective_conv2d,
            },
        )
        adapters.freeze_except_lora(module)
        cast_training_params(module)  # LoRA weights train in float32 whatever the frozen weights' dtype
        counts.append(f"{component} {len(names)}")
    if lora.init_from:
        _init_from(lora.init_from, trained, base.family, log)
    trainable = sum(adapters.count_parameters(m)[0] for m in trained.values())
    total = sum(adapters.count_parameters(m)[1] for m in (base.unet, base.vae, *base.text_encoders))
    log(
        f"{KIND_NAMES[lora.type]} modules: {', '.join(counts)}; trainable parameters: {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%)"
    )
    return trained


def _block_weights(recipe: Recipe, unet: Any) -> tuple[adapters.BlockWeights, int]:
    """The recipe's block-wise rate factors (down, mid, up), checked against the U-Net, and its layers per block."""
    cfg = recipe.train
    given = (cfg.down_lr_weight, cfg.mid_lr_weight, cfg.up_lr_weight)
    weights = adapters.resolve_block_weights(given, cfg.block_lr_zero_threshold, dict(unet.config))
    return weights, adapters.checked_block_weights(weights, dict(unet.config))


def _zero_rate_modules(recipe: Recipe, base: BaseModel, log: Log) -> tuple[str, ...]:
    """The U-Net modules in blocks whose block-wise rate is 0: they get no adapter (said in the log)."""
    weights, layers = _block_weights(recipe, base.unet)
    skipped = adapters.zero_rate_modules(base.unet, recipe.lora.target_modules, weights, layers)
    if skipped:
        log(f"Block-wise rates: {len(skipped)} U-Net modules are in blocks at 0 and get no adapter")
    return skipped


def _block_ranks(
    recipe: Recipe, base: BaseModel, log: Log, conv: bool = False
) -> tuple[dict[str, int], dict[str, float]]:
    """`lora.block_ranks` / `block_alphas` (with `conv`: `conv_block_ranks` / `conv_block_alphas`, for the 3x3
    convolutions) per U-Net module path, empty without them; said in the log."""
    lora = recipe.lora
    prefix = "conv_" if conv else ""
    given, alphas_given = getattr(lora, f"{prefix}block_ranks"), getattr(lora, f"{prefix}block_alphas")
    if given is None:
        return {}, {}
    key = f"lora.{prefix}block_ranks"
    if conv:
        alpha = lora.conv_alpha if lora.conv_alpha is not None else lora.lora_alpha
        ranks, alphas = adapters.conv_block_ranks(base.unet, lora.target_modules, given, alphas_given, alpha)
    else:
        ranks, alphas = adapters.block_ranks(base.unet, lora.target_modules, given, alphas_given, lora.lora_alpha)
    used = sorted({r for r in ranks.values() if r})
    what = "3x3 convolutions" if conv else "U-Net modules"
    log(
        f"{key}: {len(ranks)} {what} in blocks at ranks {', '.join(map(str, used))}"
        + (f"; {sum(r == 0 for r in ranks.values())} in blocks at 0 get no adapter" if 0 in ranks.values() else "")
    )
    return ranks, alphas


def _drop_inside_adapters(recipe: Recipe, trained: dict[str, Any], log: Log) -> AdapterDropout:
    """kohya's neuron, rank and module dropout on every trained LoRA layer (the hooks live as long as the
    modules)."""
    lora = recipe.lora
    rates = {"neuron": lora.neuron_dropout, "rank": lora.rank_dropout, "module": lora.module_dropout}
    hooks = AdapterDropout(trained.values(), **rates)
    said = [f"{kind} dropout {rate:g}" for kind, rate in rates.items() if rate]
    log(f"lora: {', '.join(said)} on {hooks.layers} LoRA modules while training (samples and files use all)")
    return hooks


def _mask_ranks_by_timestep(recipe: Recipe, base: BaseModel, log: Log) -> None:
    """T-LoRA: the U-Net's adapters use fewer ranks at noisier timesteps (the hooks live as long as the U-Net)."""
    lora = recipe.lora
    steps = base.noise_scheduler.config.num_train_timesteps
    masked = TimestepRanks(
        base.unet, min_rank=lora.tlora_min_rank, exponent=lora.tlora_exponent, num_train_timesteps=steps
    )
    middle = int(active_ranks(torch.tensor(steps // 2), steps, lora.rank, lora.tlora_min_rank, lora.tlora_exponent))
    log(
        f"lora.tlora_min_rank: the U-Net's {masked.modules} adapters use {lora.rank} ranks at timestep 0, {middle} at "
        f"{steps // 2} and {min(lora.tlora_min_rank, lora.rank)} at {steps - 1}; text-encoder adapters use all of them"
    )


def _unused_layers(text_encoder: Any, clip_skip: int) -> tuple[int, ...]:
    """The encoder layers whose output clip skip discards (the last clip_skip - 1)."""
    layers = text_encoder.config.num_hidden_layers
    return tuple(range(layers - clip_skip + 1, layers))


def _token_limit(recipe: Recipe, base: BaseModel) -> int:
    """The tokens of text a run encodes before it cuts the rest: `data.max_token_length`, where 75 means the model's
    own context (75 tokens for SD; fewer for the toy world)."""
    limit = recipe.data.max_token_length
    return base.tokenizers[0].model_max_length - 2 if limit == 75 else limit


def _state_slider(recipe: Recipe, base: BaseModel, log: Log) -> None:
    """[slider]: what it trains, what each step costs, and prompts that are cut short."""
    section = recipe.slider
    size = ", ".join(map(str, [recipe.data.resolution, *recipe.data.extra_resolutions]))
    limit = _token_limit(recipe, base)
    said = set()
    for texts in section.targets:
        for key, text in zip(("target_class", "positive", "negative"), texts, strict=True):
            count = token_count(base, text)
            if count > limit and text not in said:
                said.add(text)
                log(
                    f"slider.{key}: {count} tokens, longer than {limit}: the rest is cut off; shorten it"
                    + (" or set data.max_token_length = 150 or 225" if limit < 225 else "")
                )
    weighted = any(weight != 1 for weight in section.weights)
    ends = [
        f"{repr(target) if target else 'every picture (empty target_class)'} towards {positive!r} at strength +1 and "
        f"towards {negative!r} at -1" + (f" (loss weight {weight:g})" if weighted else "")
        for (target, positive, negative), weight in zip(section.targets, section.weights, strict=True)
    ]
    several = f"{len(ends)} targets, one drawn for each latent: " if len(ends) > 1 else ""
    log(
        f"slider: {several}{'; '.join(ends)}, learned from prompts at {size} px square; each step first denoises "
        f"pure noise with the base for 1 to {section.denoise_steps - 2} of {section.denoise_steps} steps"
    )


def _state_preservation(recipe: Recipe, items: list[Item], log: Log) -> None:
    """[preservation]: which captions have a class version (those naming the trigger), and what it costs."""
    trigger, word = recipe.data.trigger, recipe.preservation.class_word
    having = sum(contains_trigger(item.caption, trigger) for item in items)
    if not having:
        raise RecipeError(
            f"preservation.class_word: data.trigger {trigger!r} is in none of the {len(items)} captions, so there is "
            f"nothing to replace with {word!r}; prepare the photos with --trigger {trigger!r}"
        )
    example = next(item.caption for item in items if contains_trigger(item.caption, trigger))
    log(
        f"preservation: {having} of {len(items)} captions name {trigger!r}; each also trains as the base draws it "
        f"with {word!r} (e.g. {replace_trigger(example, trigger, word)[:60]!r}), at weight "
        f"{recipe.preservation.weight:g}: the U-Net runs on twice the batch, and once more without the adapter"
        + ("" if having == len(items) else "; the captions without the trigger are kept to the base as they are")
    )


def _add_embedding(recipe: Recipe, base: BaseModel, items: list[Item], log: Log) -> dict[str, Any]:
    """[embedding]: the word's new tokens in every tokenizer and text encoder (a `NewTokens` each, by encoder
    name), and the word spelled as them in everything the base tokenizes from now on."""
    section = recipe.embedding
    having = sum(contains_trigger(item.caption, section.token) for item in items)
    if not having:
        raise RecipeError(
            f"embedding.token: {section.token!r} is in none of the {len(items)} captions, so its vectors would "
            f"learn nothing; set data.trigger = {section.token!r}, or name the trigger word the captions have"
        )
    generator = torch.Generator().manual_seed(recipe.train.seed)
    modules = {
        name: add_new_tokens(te, tok, section.token, section.vectors, section.init_words, generator)
        for name, te, tok in zip(base.text_encoder_names, base.text_encoders, base.tokenizers, strict=True)
    }
    names = placeholder_names(section.token, section.vectors)
    base.placeholders[section.token] = " ".join(names)
    until = ""
    if section.train_until < 1:
        until = f" until step {embedding_steps(recipe)}, then frozen"
    log(
        f"embedding: {section.token!r} is {len(names)} new tokens ({' '.join(names)}) in {having} of {len(items)} "
        f"captions, learning at {section.lr:g}{until}"
    )
    return modules


def _init_from(path: str, trained: dict[str, Any], family: str, log: Log) -> None:
    adapter = read_adapter_file(path)
    if adapter.family not in ("unknown", family):
        raise AdapterError(
            f"lora.init_from: {path} is an {FAMILY_NAMES[adapter.family]} adapter but model.base is an "
            f"{FAMILY_NAMES[family]} model; start from an adapter trained on the same architecture"
        )
    check_against(adapter.state, trained, path)
    for component, lora_modules in adapter.state.items():
        adapters.load_lora_into(trained[component], lora_modules, path)
    loaded = sum(len(m) for m in adapter.state.values())
    total = sum(len(adapters.extract_lora(m)) for m in trained.values())
    log(f"lora.init_from: started from {path} ({loaded} of {total} modules)")


def _pairs(recipe: Recipe, items: list[Item], log: Log) -> dict[int, int]:
    """data.pairs: each image of the first folder with its namesake of the second, said in the log."""
    folders = recipe.data.folder if isinstance(recipe.data.folder, list) else [recipe.data.folder]
    partners = pair_items(items, folders)
    first, second = recipe.data.strengths
    log(
        f"data.pairs: {len(partners)} pairs of namesakes, {first:+g} from {folders[0]} and {second:+g} from "
        f"{folders[1]}; each pair trains in one batch with one noise, timestep and flip"
    )
    return partners


def _load_all_items(recipe: Recipe, base: BaseModel, log: Log) -> tuple[list[Item], list[Item]]:
    """The training items (with [prior]'s class images) and the ones `validation.split` holds out."""
    items = load_items(recipe.data, base.pixel_multiple)
    held_out: list[Item] = []
    if recipe.validation and recipe.validation.split:
        seed = recipe.validation.seed if recipe.validation.seed is not None else recipe.train.seed
        items, held_out = split_held_out(items, recipe.validation.split, seed)
        names = ", ".join(item.path.name for item in held_out[:4]) + (", ..." if len(held_out) > 4 else "")
        log(f"validation.split: {len(held_out)} of {len(items) + len(held_out)} images held out for val_loss: {names}")
    if recipe.data.strengths_vary:  # an image slider: say which images pull which way
        counts: dict[float, int] = {}
        for item in items:
            counts[item.strength] = counts.get(item.strength, 0) + 1
        log(
            "data.adapter_strength: the adapter trains at "
            + ", ".join(f"{strength:+g} on {count} images" for strength, count in sorted(counts.items()))
        )
    choosing = sum(has_wildcards(item.caption) for item in items)
    if recipe.data.wildcards:
        log(f"data.wildcards: {choosing} of {len(items)} captions choose among {{a|b}} options at every step")
    elif choosing:
        log(
            f"data: {choosing} of {len(items)} captions have {{a|b}} choices, which are read as written; set "
            "data.wildcards = true to pick one option per step"
        )
    limit = _token_limit(recipe, base)
    read = plain_text if recipe.data.weighted_captions else str  # weights' brackets are not encoded
    too_long = sum(token_count(base, read(steady_caption(item.caption, recipe.data))) > limit for item in items)
    if too_long:
        log(
            f"data: {too_long} of {len(items)} captions are longer than {limit} tokens and are truncated; "
            + ("set data.max_token_length = 150 or 225 to keep them" if limit < 225 else "shorten them")
        )
    if recipe.prior:
        prior = recipe.prior
        instance_samples = sum(item.repeats for item in items)
        buckets = bucket_list(recipe.data.resolution, base.pixel_multiple)
        items += load_class_items(
            Path(prior.class_dir),
            prompt=prior.class_prompt,
            count=prior.num_class_images,
            weight=prior.prior_loss_weight,
            buckets=buckets,
            instance_samples=instance_samples,
        )
        log(
            f"prior: {prior.num_class_images} class images from {prior.class_dir}, loss weight "
            f"{prior.prior_loss_weight}"
        )
    extra = recipe.data.extra_resolutions
    if extra:  # after the split: an image held out is held out at every resolution
        count = len(items)
        items = at_resolutions(items, extra, base.pixel_multiple)
        sides = ", ".join(str(side) for side in extra)
        log(
            f"data.extra_resolutions: every image also trains at {sides} px ({len(items)} items in "
            f"{len({item.bucket for item in items})} buckets; an epoch shows {len(items) // count}x as many)"
        )
    return items, held_out


def _captions(recipe: Recipe, items: list[Item]) -> set[str]:
    """Every text the run encodes: the items' captions (with their class versions for [preservation], and the empty
    caption of caption dropout), or a [slider]'s prompts and the empty one its denoising is guided against."""
    if recipe.slider is not None:
        return {text for target in recipe.slider.targets for text in target} | {""}
    data = recipe.data
    captions = {steady_caption(item.caption, data) for item in items}
    if recipe.preserving:  # and each with the trigger replaced by the class word
        captions |= {replace_trigger(c, data.trigger, recipe.preservation.class_word) for c in captions}
    return captions | ({""} if data.caption_dropout or data.caption_dropout_every_epochs else set())


def _text_cache(recipe: Recipe, base: BaseModel, items: list[Item], device: Any, log: Log) -> dict[str, Any] | None:
    """Text-encoder outputs of every caption (training and held-out items) or slider prompt, when the text encoder
    is frozen and captions never change."""

    data = recipe.data
    if recipe.lora.train_text_encoder or recipe.text_varies or recipe.embedding:
        return None
    captions = sorted(_captions(recipe, items))
    cache = {}
    with torch.no_grad():
        for caption in captions:
            weights = None
            if data.weighted_captions:
                ids, weights = tokenize_weighted(base, [caption], data.max_token_length)
            else:
                ids = tokenize(base, [caption], data.max_token_length)
            encoded = encode_prompts(base, [t.to(device) for t in ids], recipe.model.clip_skip)
            if weights is not None:
                encoded = apply_token_weights(encoded, weights)
            cache[caption] = {k: v[0].float().cpu() for k, v in encoded.items()}
    what = "prompts" if recipe.slider is not None else "captions"
    log(f"Text encoder outputs cached for {len(captions)} {what} (the text encoder is frozen)")
    return cache


def _cache_root(recipe: Recipe) -> Path:
    """Where latents are cached: the (first) dataset folder's `.cache/` (entries are content-keyed)."""
    folder = recipe.data.folder
    return Path(folder if isinstance(folder, str) else folder[0])

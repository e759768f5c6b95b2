"""`train(recipe)`: the base model, LoRA adapters, the training loop, checkpoints and exported adapters.

Every random choice of a run is a pure function of `train.seed` and a position (epoch, micro-step),
and a checkpoint holds that position with the adapter, EMA, optimizer and schedule state, so a
resumed run continues bit for bit where the interrupted one would have gone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import adapters, objective
from .checkpoint import (
    atomic_write_text,
    check_run_folder,
    create_run_folder,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .data import (
    BatchStream,
    Item,
    LatentCache,
    bucket_list,
    load_class_items,
    load_folder,
    load_items,
    load_pixels,
    step_rng,
    transform_caption,
    vae_fingerprint,
)
from .ema import AdapterEMA
from .errors import LorakitError, OutputError
from .formats.files import AdapterInfo, save_adapter_files
from .models import BaseModel, encode_prompts, is_local, load_base, resolve_base, token_count, tokenize
from .optim import build_lr_scheduler, build_optimizer
from .progress import progress_bar
from .recipe import Recipe, dump_recipe, recipe_to_dict

Log = Callable[[str], None]


@dataclass
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    adapter: Path
    diffusers_adapter: Path
    steps: int
    final_loss: float
    trainable_parameters: int
    models: dict[str, Any]  # the trained modules (with their peft adapters), by component name


@dataclass
class _Run:
    """Everything the training loop reads or changes."""

    recipe: Recipe
    base: BaseModel
    items: list[Item]
    accelerator: Any
    models: dict[str, Any]  # prepared (possibly DDP-wrapped) trained modules by component
    optimizer: Any
    lr_scheduler: Any
    stream: BatchStream
    cache: LatentCache | None
    text_cache: dict[str, Any] | None
    ema: AdapterEMA | None
    run_dir: Path
    step: int = 0
    micro: int = 0

    @property
    def device(self) -> Any:
        return self.accelerator.device

    def unwrapped(self) -> dict[str, Any]:
        return {name: self.accelerator.unwrap_model(m) for name, m in self.models.items()}

    def named_trainable(self) -> dict[str, Any]:
        return {
            f"{name}.{n}": p
            for name, m in self.unwrapped().items()
            for n, p in adapters.named_lora_parameters(m).items()
        }


def run_folder(recipe: Recipe) -> Path:
    return Path(recipe.output.folder).expanduser() / recipe.output.name


def resolve_recipe(recipe: Recipe, base: BaseModel) -> Recipe:
    """The recipe with every default that depends on the base filled in and every path absolute."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    model = dataclasses.replace(recipe.model, base=base.source, prediction_type=base.prediction_type)
    train_te = recipe.lora.train_text_encoder
    lora = dataclasses.replace(recipe.lora, train_text_encoder=base.family != "sdxl" if train_te is None else train_te)
    folder = recipe.data.folder
    data = dataclasses.replace(
        recipe.data, folder=absolute(folder) if isinstance(folder, str) else [absolute(f) for f in folder]
    )
    output = dataclasses.replace(recipe.output, folder=absolute(recipe.output.folder))
    prior = recipe.prior and dataclasses.replace(recipe.prior, class_dir=absolute(recipe.prior.class_dir))
    validation = recipe.validation and dataclasses.replace(
        recipe.validation, folder=absolute(recipe.validation.folder)
    )
    train = dataclasses.replace(
        recipe.train, max_timestep=recipe.train.max_timestep or base.noise_scheduler.config.num_train_timesteps
    )
    return dataclasses.replace(
        recipe, model=model, lora=lora, data=data, output=output, prior=prior, validation=validation, train=train
    )


def _precision(recipe: Recipe, log: Log) -> tuple[str, str]:
    """(mixed precision, frozen weight dtype) actually used on this machine."""
    import torch

    precision, weight_dtype = recipe.train.mixed_precision, recipe.model.weight_dtype
    if precision == "fp16" and not torch.cuda.is_available():
        log("train.mixed_precision: fp16 autocast does nothing on a CPU; training in bf16 instead")
        precision = "bf16"
        weight_dtype = "bfloat16" if weight_dtype == "float16" else weight_dtype
    wanted = {"float16": "fp16", "bfloat16": "bf16"}.get(weight_dtype)
    if wanted and precision != wanted:
        raise LorakitError(
            f'model.weight_dtype: {weight_dtype} weights need train.mixed_precision = "{wanted}" '
            f'(it is "{precision}"); or keep weight_dtype = "float32"'
        )
    return precision, weight_dtype


def _accelerator(precision: str, run_dir: Path) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import is_tensorboard_available

    # accelerate keeps precision in a process-wide singleton; a second train() in the same process
    # (a notebook, the tests) must be free to choose another, so forget the previous run's choice.
    AcceleratorState._reset_state(reset_partial_state=False)
    tracker = "tensorboard" if is_tensorboard_available() else None
    # cpu=True without CUDA: under torchrun this is what makes the processes one gloo job.
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=precision, log_with=tracker, project_dir=str(run_dir)
    )


def _derived_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _inject(recipe: Recipe, base: BaseModel, log: Log) -> dict[str, Any]:
    """Freeze the base and add LoRA to the U-Net (and text encoders); return the trained modules by name."""
    from diffusers.training_utils import cast_training_params

    lora = recipe.lora
    trained = {"unet": base.unet}
    if lora.train_text_encoder:
        trained.update(zip(base.text_encoder_names, base.text_encoders, strict=True))
    counts = []
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
        )
        adapters.freeze_except_lora(module)
        cast_training_params(module)  # LoRA weights train in float32 whatever the frozen weights' dtype
        counts.append(f"{component} {len(names)}")
    if lora.init_from:
        _init_from(lora.init_from, trained, log)
    trainable = sum(adapters.count_parameters(m)[0] for m in trained.values())
    total = sum(adapters.count_parameters(m)[1] for m in (base.unet, base.vae, *base.text_encoders))
    log(
        f"LoRA modules: {', '.join(counts)}; trainable parameters: {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%)"
    )
    return trained


def _init_from(path: str, trained: dict[str, Any], log: Log) -> None:
    from .formats.read import check_against, read_adapter_file

    adapter = read_adapter_file(path)
    check_against(adapter.state, trained, path)
    for component, lora_modules in adapter.state.items():
        adapters.load_lora_into(trained[component], lora_modules, path)
    loaded = sum(len(m) for m in adapter.state.values())
    total = sum(len(adapters.extract_lora(m)) for m in trained.values())
    log(f"lora.init_from: started from {path} ({loaded} of {total} modules)")


def _load_all_items(recipe: Recipe, base: BaseModel, log: Log) -> list[Item]:
    items = load_items(recipe.data, base.pixel_multiple)
    limit = recipe.data.max_token_length
    if limit == 75:  # the model's own context (75 tokens for SD; smaller for the toy world)
        limit = base.tokenizers[0].model_max_length - 2
    too_long = sum(token_count(base, item.caption) > limit for item in items)
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
    return items


def _encoder(base: BaseModel, device: Any) -> Callable[[Any], tuple[Any, Any]]:
    import torch

    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            dist = base.vae.encode(pixels.unsqueeze(0).to(device)).latent_dist
        return dist.mean[0].float().cpu(), dist.std[0].float().cpu()

    return encode


def _scale_latents(base: BaseModel, latents: Any) -> Any:
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * base.vae.config.scaling_factor


def _text_cache(recipe: Recipe, base: BaseModel, items: list[Item], device: Any, log: Log) -> dict[str, Any] | None:
    """Text-encoder outputs of every caption, when the text encoder is frozen and captions never change."""
    import torch

    data = recipe.data
    if recipe.lora.train_text_encoder or data.shuffle_tags:
        return None
    captions = sorted({item.caption for item in items} | ({""} if data.caption_dropout else set()))
    cache = {}
    with torch.no_grad():
        for caption in captions:
            ids = [t.to(device) for t in tokenize(base, [caption], data.max_token_length)]
            cache[caption] = {
                k: v[0].float().cpu() for k, v in encode_prompts(base, ids, recipe.model.clip_skip).items()
            }
    log(f"Text encoder outputs cached for {len(captions)} captions (the text encoder is frozen)")
    return cache


def _conditioning(run: _Run, captions: list[str]) -> dict[str, Any]:
    import torch

    if run.text_cache is not None:
        keys = run.text_cache[captions[0]].keys()
        return {k: torch.stack([run.text_cache[c][k] for c in captions]).to(run.device) for k in keys}
    recipe = run.recipe
    ids = [t.to(run.device) for t in tokenize(run.base, captions, recipe.data.max_token_length)]
    text_encoders = [
        run.models.get(n, m) for n, m in zip(run.base.text_encoder_names, run.base.text_encoders, strict=True)
    ]
    with torch.set_grad_enabled(recipe.lora.train_text_encoder), run.accelerator.autocast():
        return encode_prompts(dataclasses.replace(run.base, text_encoders=text_encoders), ids, recipe.model.clip_skip)


def _micro_batch_loss(run: _Run, batch: list[int]) -> Any:
    """The weighted denoising loss of one micro-batch; all its randomness derives from the micro-step."""
    import torch

    cfg, data, base = run.recipe.train, run.recipe.data, run.base
    rank = run.accelerator.process_index
    rng = step_rng(cfg.seed, f"{rank}:{run.micro}", "batch")
    generator = torch.Generator().manual_seed(_derived_seed(cfg.seed, rank, run.micro))
    flips = [data.flip and rng.random() < 0.5 for _ in batch]
    captions = [transform_caption(run.items[i].caption, data, rng) for i in batch]
    if run.cache is not None:
        pairs = [run.cache.get(i, f) for i, f in zip(batch, flips, strict=True)]
    else:
        encode = _encoder(base, run.device)
        pairs = [encode(load_pixels(run.items[i], f)) for i, f in zip(batch, flips, strict=True)]
    means, stds = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    latents = _scale_latents(base, means + stds * torch.randn(means.shape, generator=generator))
    noise = objective.sample_noise(tuple(latents.shape), cfg.noise_offset, generator)
    timesteps = objective.sample_timesteps(len(batch), cfg.min_timestep, cfg.max_timestep, generator)
    noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
    target = objective.training_target(base.noise_scheduler, latents, noise, timesteps, base.prediction_type)
    weights = objective.loss_weights(base.noise_scheduler, timesteps, cfg.min_snr_gamma, base.prediction_type)
    weights = weights * torch.tensor([run.items[i].loss_weight for i in batch])
    conditioning = _conditioning(run, captions)
    with run.accelerator.autocast():
        prediction = run.models["unet"](noisy.to(run.device), timesteps.to(run.device), **conditioning).sample
    return objective.diffusion_loss(
        prediction, target.to(run.device), weights.to(run.device), cfg.loss_type, cfg.huber_c
    )


def _optimizer_step(run: _Run) -> float:
    """Accumulate `gradient_accumulation_steps` micro-batches and take one optimizer step; returns the loss."""
    import torch

    cfg, accelerator = run.recipe.train, run.accelerator
    accumulation, total = cfg.gradient_accumulation_steps, 0.0
    with ExitStack() as no_sync:
        for k in range(accumulation):
            if k < accumulation - 1:  # only the last micro-batch all-reduces gradients
                for module in run.models.values():
                    no_sync.enter_context(accelerator.no_sync(module))
            loss = _micro_batch_loss(run, run.stream.next())
            accelerator.backward(loss / accumulation)
            total += loss.detach().item() / accumulation
            run.micro += 1
            if k == accumulation - 2:
                no_sync.close()
    if cfg.max_grad_norm:
        accelerator.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if run.ema is not None:
        run.ema.update(run.step)
    return accelerator.reduce(torch.tensor(total, device=run.device), "mean").item()


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _save(run: _Run) -> Path:
    return save_checkpoint(
        run.run_dir,
        run.step,
        adapter=run.named_trainable(),
        ema=run.ema.shadow if run.ema else None,
        optimizer_state=run.optimizer.state_dict(),
        scheduler_state=run.lr_scheduler.state_dict(),
        position={"epoch": run.stream.epoch, "offset": run.stream.offset, "micro": run.micro},
        rng=_rng_state(),
        recipe=recipe_to_dict(run.recipe),
        keep=run.recipe.train.keep_checkpoints,
    )


_MUST_MATCH = (
    "model.base",
    "model.vae",
    "lora",
    "data.folder",
    "data.num_repeats",
    "train.seed",
    "train.batch_size",
    "prior",
)


def _check_resumable(saved: dict, recipe: Recipe, log: Log) -> None:
    """Refuse a resume whose recipe changed what the checkpoint's tensors or data order depend on."""
    current = recipe_to_dict(recipe)
    changed = []
    for section in sorted(set(saved) | set(current)):
        for key in sorted(set(saved.get(section, {})) | set(current.get(section, {}))):
            before, after = saved.get(section, {}).get(key), current.get(section, {}).get(key)
            if before != after:
                changed.append((f"{section}.{key}", before, after))
    for key, before, after in changed:
        if key in _MUST_MATCH or key.split(".")[0] in _MUST_MATCH:
            raise OutputError(
                f"--resume: {key} changed from {before!r} to {after!r} since the checkpoint; "
                "resume with the same value, or start a new run"
            )
        log(f"--resume: {key} changed from {before!r} to {after!r}")


def _restore(run: _Run, checkpoint: Path, log: Log) -> None:
    import torch

    saved = load_checkpoint(checkpoint)
    _check_resumable(saved["recipe"], run.recipe, log)
    params = run.named_trainable()
    with torch.no_grad():
        for name, tensor in saved["adapter"].items():
            params[name].copy_(tensor)
    optimizer_state = saved["optimizer"]
    optimizer_state["state"] = {int(k): v for k, v in optimizer_state["state"].items()}
    run.optimizer.load_state_dict(optimizer_state)
    run.lr_scheduler.load_state_dict(saved["scheduler"])
    if run.ema is not None:
        if saved["ema"] is None:
            raise OutputError(f"--resume: {checkpoint} was saved without EMA; set train.ema_decay = 0 to resume it")
        run.ema.load(saved["ema"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(saved["rng"]["cuda"]))
    position = saved["position"]
    run.step, run.micro = saved["step"], position["micro"]
    run.stream = BatchStream(
        run.items,
        batch_size=run.recipe.train.batch_size,
        seed=run.recipe.train.seed,
        rank=run.accelerator.process_index,
        world=run.accelerator.num_processes,
        epoch=position["epoch"],
        offset=position["offset"],
    )
    metrics = run.run_dir / "metrics.jsonl"
    if metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= run.step]
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))
    log(f"Resumed from {checkpoint} at step {run.step}")


def _sample_settings(recipe: Recipe) -> Any:
    from .generate import RenderSettings

    sample, size = recipe.sample, recipe.data.resolution
    return RenderSettings(
        steps=sample.steps,
        guidance=sample.guidance,
        width=size,
        height=size,
        negative_prompt=sample.negative_prompt,
        sampler="euler",
        clip_skip=recipe.model.clip_skip,
    )


def _render_samples(run: _Run) -> None:
    """One grid of the `[sample]` prompts with the adapter as it is now, into `samples/step-NNNNNN.png`."""
    from .generate import a1111_parameters, make_grid, render, sample_pipeline, save_png

    sample, base = run.recipe.sample, run.base
    models = run.unwrapped()
    te = models.get("text_encoder", base.text_encoders[0])
    base.vae.to(run.device)
    pipe = sample_pipeline(models["unet"], base.vae, te, base.tokenizers[0], base.noise_scheduler)
    settings = _sample_settings(run.recipe)
    for module in models.values():
        module.eval()
    with run.accelerator.autocast():
        seeds = [sample.seed + i for i in range(len(sample.prompts))]
        images = render(pipe, sample.prompts, seeds, settings)
    for module in models.values():
        module.train()
    if run.cache is not None:
        base.vae.to("cpu")
    parameters = a1111_parameters(
        " | ".join(sample.prompts),
        negative_prompt=sample.negative_prompt,
        steps=sample.steps,
        sampler="Euler",
        guidance=sample.guidance,
        seed=sample.seed,
        width=settings.width,
        height=settings.height,
        extra={"Lora": run.recipe.output.name, "Training step": run.step},
    )
    folder = run.run_dir / "samples"
    folder.mkdir(exist_ok=True)
    save_png(make_grid(images, columns=len(images)), folder / f"step-{run.step:06d}.png", parameters)


def _render_class_images(recipe: Recipe, base: BaseModel, device: Any, log: Log, quiet: bool) -> None:
    """Prior preservation: render the class images `[prior] class_dir` lacks with the base model, and keep them."""
    from .data import IMAGE_SUFFIXES
    from .generate import a1111_parameters, render, sample_pipeline, save_png

    prior = recipe.prior
    folder = Path(prior.class_dir)
    have = len([p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]) if folder.is_dir() else 0
    missing = prior.num_class_images - have
    if missing <= 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    log(f"prior: {folder} holds {have} of {prior.num_class_images} class images; rendering {missing} with the base")
    base.vae.to(device)
    base.unet.to(device)
    base.text_encoders[0].to(device)
    pipe = sample_pipeline(base.unet, base.vae, base.text_encoders[0], base.tokenizers[0], base.noise_scheduler)
    settings = _sample_settings(recipe)
    from .progress import progress_bar

    with progress_bar("Class images", missing, quiet=quiet) as bar:
        for index in range(have, prior.num_class_images):
            prompts = [prior.class_prompt] if isinstance(prior.class_prompt, str) else prior.class_prompt
            prompt = prompts[index % len(prompts)]
            (image,) = render(pipe, [prompt], [index], settings)
            (folder / f"class-{index:05d}.txt").write_text(prompt + "\n", encoding="utf-8")
            parameters = a1111_parameters(
                prompt,
                negative_prompt=settings.negative_prompt,
                steps=settings.steps,
                sampler="Euler",
                guidance=settings.guidance,
                seed=index,
                width=settings.width,
                height=settings.height,
            )
            save_png(image, folder / f"class-{index:05d}.png", parameters)
            bar.advance()


def _validation_items(run: _Run) -> tuple[list[Item], LatentCache]:
    folder = Path(run.recipe.validation.folder)
    buckets = bucket_list(run.recipe.data.resolution, run.base.pixel_multiple)
    items = load_folder(folder, trigger=run.recipe.data.trigger, repeats=1, buckets=buckets)
    cache = LatentCache(folder, vae_fingerprint(run.base.vae))
    run.base.vae.to(run.device)
    cache.fill(items, (False,), _encoder(run.base, run.device))
    if run.cache is not None:
        run.base.vae.to("cpu")
    return items, cache


def _validation_loss(run: _Run, items: list[Item], cache: LatentCache) -> float:
    """Mean denoising loss on held-out images at fixed noise and timesteps (comparable across steps)."""
    import torch

    validation, base = run.recipe.validation, run.base
    losses = []
    models = run.unwrapped()
    for module in models.values():
        module.eval()
    with torch.no_grad():
        for index, item in enumerate(items):
            mean, _ = cache.get(index, False)
            latents = _scale_latents(base, mean[None])
            for timestep in validation.timesteps:
                generator = torch.Generator().manual_seed(_derived_seed("validation", index, timestep))
                noise = torch.randn(latents.shape, generator=generator)
                t = torch.tensor([timestep])
                noisy = base.noise_scheduler.add_noise(latents, noise, t)
                target = objective.training_target(base.noise_scheduler, latents, noise, t, base.prediction_type)
                conditioning = _conditioning(run, [item.caption])
                with run.accelerator.autocast():
                    prediction = models["unet"](noisy.to(run.device), t.to(run.device), **conditioning).sample
                losses.append(torch.nn.functional.mse_loss(prediction.float(), target.to(run.device)).item())
    for module in models.values():
        module.train()
    return sum(losses) / len(losses)


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train(
    recipe: Recipe, *, overwrite: bool = False, resume: str | None = None, quiet: bool = False, log: Log = print
) -> RunResult:
    """Train the LoRA described by `recipe` and write its run folder; see DESIGN.md for the layout.

    `resume` is `"latest"` or a checkpoint folder of the same run folder.
    """
    import torch

    started = datetime.now(UTC)
    run_dir = run_folder(recipe)
    checkpoint = find_checkpoint(run_dir, resume) if resume else None
    if checkpoint is None:
        check_run_folder(run_dir, overwrite)
    precision, weight_dtype = _precision(recipe, log)
    resolve_base(recipe.model.base)
    if not is_local(recipe.model.base):
        log(f"Loading base model {recipe.model.base} from the Hugging Face hub or its cache")
    base = load_base(
        recipe.model.base,
        prediction_type=recipe.model.prediction_type,
        revision=recipe.model.revision,
        vae=recipe.model.vae,
        weight_dtype=weight_dtype,
        config=recipe.model.config,
    )
    recipe = resolve_recipe(recipe, base)
    cfg = recipe.train
    accelerator = _accelerator(precision, run_dir)
    say = log if accelerator.is_main_process else (lambda _: None)
    quiet = quiet or not accelerator.is_main_process
    if recipe.prior and accelerator.is_main_process:
        _render_class_images(recipe, base, accelerator.device, say, quiet)
    accelerator.wait_for_everyone()
    items = _load_all_items(recipe, base, say)
    stream = BatchStream(
        items,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
    )
    torch.manual_seed(cfg.seed)
    trained = _inject(recipe, base, say)
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for name, module in trained.items():
            if name != "unet":
                # transformers 5.2x renamed the switch; the old name still works but warns on every run.
                enable = getattr(module, "activation_checkpointing_enable", None)
                (enable or module.gradient_checkpointing_enable)({"use_reentrant": False})
    groups = [
        {
            "params": adapters.lora_parameters(m),
            "name": name,
            "lr": cfg.unet_lr if name == "unet" else cfg.text_encoder_lr,
        }
        for name, m in trained.items()
    ]
    optimizer = build_optimizer(cfg, groups)
    lr_scheduler = build_lr_scheduler(cfg, optimizer)

    if accelerator.is_main_process and checkpoint is None:
        create_run_folder(run_dir, overwrite)
    accelerator.wait_for_everyone()

    device = accelerator.device
    base.vae.to(device)
    for module in base.text_encoders:
        module.to(device)
    cache = None
    if cfg.cache_latents:
        cache = LatentCache(_cache_root(recipe), vae_fingerprint(base.vae))
        flips = (False, True) if recipe.data.flip else (False,)
        with progress_bar("Caching latents", len(items), quiet=quiet) as bar:
            fresh = cache.fill(items, flips, _encoder(base, device), bar.advance)
        say(f"Latents: {len(items) * len(flips)} cached ({fresh} newly encoded) in {cache.folder}")
        base.vae.to("cpu")
    text_cache = _text_cache(recipe, base, items, device, say)
    if text_cache is not None:
        for module in base.text_encoders:
            module.to("cpu")

    prepared = accelerator.prepare(*trained.values(), optimizer)
    models = dict(zip(trained, prepared[:-1], strict=True))
    for module in models.values():
        module.train()
    run = _Run(
        recipe, base, items, accelerator, models, prepared[-1], lr_scheduler, stream, cache, text_cache, None, run_dir
    )
    if cfg.ema_decay:
        run.ema = AdapterEMA(run.named_trainable(), cfg.ema_decay)
    if checkpoint is not None:
        _restore(run, checkpoint, say)
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "recipe.resolved.toml", dump_recipe(recipe))
    if accelerator.log_with:
        accelerator.init_trackers("tensorboard")
    validation = _validation_items(run) if recipe.validation else None
    sample_every = recipe.sample.every_steps or cfg.save_every_steps

    metrics_path = run_dir / "metrics.jsonl"
    loss = float("nan")
    start = time.monotonic()
    with progress_bar("Training", cfg.max_steps - run.step, quiet=quiet) as bar:
        while run.step < cfg.max_steps:
            loss = _optimizer_step(run)
            if not math.isfinite(loss):
                raise LorakitError(
                    f"training diverged: the loss is {loss} at step {run.step}; lower "
                    'train.unet_lr / train.text_encoder_lr or use mixed_precision = "bf16" or "no"'
                )
            row: dict[str, Any] = {}
            if validation and _due(run.step, recipe.validation.every_steps, cfg.max_steps):
                row["val_loss"] = _validation_loss(run, *validation)
            if accelerator.is_main_process:
                if _due(run.step, cfg.log_every_steps, cfg.max_steps) or row:
                    lrs = {f"lr_{g['name']}": g["lr"] for g in run.optimizer.param_groups}
                    row = {
                        "step": run.step,
                        "loss": loss,
                        **row,
                        **lrs,
                        "epoch": round(run.stream.epochs_done, 4),
                        "elapsed_s": round(time.monotonic() - start, 3),
                    }
                    with metrics_path.open("a", encoding="utf-8") as out:
                        out.write(json.dumps(row) + "\n")
                    accelerator.log({k: v for k, v in row.items() if k not in ("step", "elapsed_s")}, step=run.step)
                if _due(run.step, cfg.save_every_steps, cfg.max_steps):
                    _save(run)
                if recipe.sample.prompts and _due(run.step, sample_every, cfg.max_steps):
                    _render_samples(run)
            if _due(run.step, cfg.save_every_steps, cfg.max_steps) or _due(run.step, sample_every, cfg.max_steps):
                accelerator.wait_for_everyone()  # the other processes wait while the main one writes
            bar.advance(1, loss=f"{loss:.4f}")

    accelerator.wait_for_everyone()
    models = run.unwrapped()
    ema_weights = {}
    if run.ema is not None:
        ema_weights = {
            name: {n[len(name) + 1 :]: t for n, t in run.ema.shadow.items() if n.startswith(name + ".")}
            for name in models
        }
    state = {name: adapters.extract_lora(m, ema_weights.get(name)) for name, m in models.items()}
    kohya_path = None if recipe.lora.use_dora else run_dir / f"{recipe.output.name}.safetensors"
    diffusers_path = run_dir / f"{recipe.output.name}.diffusers.safetensors"
    if accelerator.is_main_process:
        info = _adapter_info(recipe, base, items, run.step, started)
        kohya_path, diffusers_path = save_adapter_files(
            state, run_dir, recipe.output.name, recipe.output.save_dtype, info
        )
        if kohya_path is None:
            say(f"Saved {diffusers_path} (DoRA, diffusers layout: diffusers and `lorakit generate`/`merge`)")
        else:
            say(f"Saved {kohya_path} (kohya layout: A1111/Forge, ComfyUI, diffusers) and {diffusers_path.name}")
    accelerator.end_training()
    trainable = sum(p.numel() for p in run.named_trainable().values())
    return RunResult(run_dir, kohya_path or diffusers_path, diffusers_path, run.step, loss, trainable, models)


def _cache_root(recipe: Recipe) -> Path:
    """Where latents are cached: the (first) dataset folder's `.cache/` (entries are content-keyed)."""
    folder = recipe.data.folder
    return Path(folder if isinstance(folder, str) else folder[0])


def _recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()


def _adapter_info(recipe: Recipe, base: BaseModel, items: list, steps: int, started: datetime) -> AdapterInfo:
    cfg, lora = recipe.train, recipe.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else json.dumps(lora.target_modules)
    network_args = {}
    if lora.target_modules == "transformer+conv":
        network_args = {
            "conv_dim": str(lora.conv_rank or lora.rank),
            "conv_alpha": f"{lora.conv_alpha if lora.conv_alpha is not None else lora.lora_alpha:g}",
        }
    training = {
        "ss_network_args": json.dumps(network_args),
        "ss_steps": str(steps),
        "ss_num_train_images": str(sum(item.repeats for item in items)),
        "ss_learning_rate": str(cfg.unet_lr),
        "ss_unet_lr": str(cfg.unet_lr),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr if lora.train_text_encoder else 0.0),
        "ss_network_train_unet_only": str(not lora.train_text_encoder),
        "ss_optimizer": cfg.optimizer,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": str(cfg.seed),
        "ss_resolution": f"({recipe.data.resolution}, {recipe.data.resolution})",
        "ss_clip_skip": str(recipe.model.clip_skip),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_max_token_length": str(recipe.data.max_token_length),
        "ss_training_started_at": str(started.timestamp()),
        "ss_training_finished_at": str(datetime.now(UTC).timestamp()),
        "lorakit_steps": str(steps),
        "lorakit_recipe_sha256": _recipe_hash(recipe),
        "lorakit_trigger": recipe.data.trigger,
        "lorakit_ema_decay": str(cfg.ema_decay),
    }
    return AdapterInfo(
        family=base.family,
        base_model=recipe.model.base,
        prediction_type=base.prediction_type,
        rank=lora.rank,
        alpha=lora.lora_alpha,
        targets=targets,
        output_name=recipe.output.name,
        training=training,
        resolution=recipe.data.resolution,
        trigger=recipe.data.trigger,
        tag_frequency=_tag_frequency(items),
        dataset_dirs=_dataset_dirs(items),
    )


def _dataset_key(item: Item) -> str:
    return Path(item.folder).name or item.folder


def _tag_frequency(items: list[Item]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: per dataset folder, how many captions carry each comma-separated tag."""
    frequency: dict[str, dict[str, int]] = {}
    for item in items:
        counts = frequency.setdefault(_dataset_key(item), {})
        for tag in {t.strip() for t in item.caption.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    return frequency


def _dataset_dirs(items: list[Item]) -> dict[str, dict[str, int]]:
    dirs: dict[str, dict[str, int]] = {}
    for item in items:
        entry = dirs.setdefault(_dataset_key(item), {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dirs

"""`train(recipe)`: the base model, LoRA adapters, the training loop and the exported adapter files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import adapters, objective
from .checkpoint import atomic_write_text, check_run_folder, create_run_folder
from .data import LatentCache, epoch_batches, load_items, load_pixels, step_rng, transform_caption, vae_fingerprint
from .errors import LorakitError
from .formats.files import AdapterInfo, save_adapter_files
from .models import BaseModel, encode_prompts, is_local, load_base, resolve_base, tokenize
from .optim import build_lr_scheduler, build_optimizer
from .progress import progress_bar
from .recipe import Recipe, dump_recipe

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


def run_folder(recipe: Recipe) -> Path:
    return Path(recipe.output.folder).expanduser() / recipe.output.name


def resolve_recipe(recipe: Recipe, base: BaseModel) -> Recipe:
    """The recipe with every default that depends on the base filled in and every path absolute."""
    model = dataclasses.replace(recipe.model, base=base.source, prediction_type=base.prediction_type)
    train_te = recipe.lora.train_text_encoder
    lora = dataclasses.replace(recipe.lora, train_text_encoder=base.family != "sdxl" if train_te is None else train_te)
    data = dataclasses.replace(recipe.data, folder=str(Path(recipe.data.folder).expanduser().resolve()))
    output = dataclasses.replace(recipe.output, folder=str(Path(recipe.output.folder).expanduser().resolve()))
    return dataclasses.replace(recipe, model=model, lora=lora, data=data, output=output)


def _accelerator(recipe: Recipe, run_dir: Path, log: Log) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import is_tensorboard_available

    precision = recipe.train.mixed_precision
    cuda = torch.cuda.is_available()
    if precision == "fp16" and not cuda:
        log("train.mixed_precision: fp16 autocast does nothing on a CPU; training in bf16 instead")
        precision = "bf16"
    tracker = "tensorboard" if is_tensorboard_available() else None
    # accelerate keeps precision in a process-wide singleton; a second train() in the same process
    # (a notebook, the tests) must be free to choose another, so forget the previous run's choice.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=not cuda, mixed_precision=precision, log_with=tracker, project_dir=str(run_dir))


def _derived_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _inject(recipe: Recipe, base: BaseModel, log: Log) -> dict[str, Any]:
    """Freeze the base and add LoRA to the U-Net (and text encoders); return the trained modules by name."""
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
        )
        adapters.freeze_except_lora(module)
        counts.append(f"{component} {len(names)}")
    trainable = sum(adapters.count_parameters(m)[0] for m in trained.values())
    total = sum(adapters.count_parameters(m)[1] for m in (base.unet, base.vae, *base.text_encoders))
    log(
        f"LoRA modules: {', '.join(counts)}; trainable parameters: {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%)"
    )
    return trained


def _param_groups(recipe: Recipe, trained: dict[str, Any]) -> list[dict[str, Any]]:
    groups = []
    for component, module in trained.items():
        lr = recipe.train.unet_lr if component == "unet" else recipe.train.text_encoder_lr
        groups.append({"params": adapters.lora_parameters(module), "lr": lr, "name": component})
    return groups


def _encoder(base: BaseModel, device: Any) -> Callable[[Any], tuple[Any, Any]]:
    import torch

    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            dist = base.vae.encode(pixels.unsqueeze(0).to(device)).latent_dist
        return dist.mean[0].float().cpu(), dist.std[0].float().cpu()

    return encode


def _latents(base: BaseModel, means: Any, stds: Any, generator: Any) -> Any:
    """Sample latents from cached distributions and scale them as the U-Net expects."""
    import torch

    latents = means + stds * torch.randn(means.shape, generator=generator)
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * base.vae.config.scaling_factor


def _write_metrics(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")


def _recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()


def train(recipe: Recipe, *, overwrite: bool = False, quiet: bool = False, log: Log = print) -> RunResult:
    """Train the LoRA described by `recipe` and write its run folder; see DESIGN.md for the layout."""
    import torch

    started = datetime.now(timezone.utc)
    run_dir = run_folder(recipe)
    check_run_folder(run_dir, overwrite)
    resolve_base(recipe.model.base)
    if not is_local(recipe.model.base):
        log(f"Loading base model {recipe.model.base} from the Hugging Face hub or its cache")
    base = load_base(recipe.model.base, prediction_type=recipe.model.prediction_type, revision=recipe.model.revision)
    recipe = resolve_recipe(recipe, base)
    items = load_items(recipe.data, base.pixel_multiple)
    cfg, data = recipe.train, recipe.data

    accelerator = _accelerator(recipe, run_dir, log)
    say = log if accelerator.is_main_process else (lambda _: None)
    quiet = quiet or not accelerator.is_main_process
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    trained = _inject(recipe, base, say)
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for name, module in trained.items():
            if name != "unet":
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = build_optimizer(cfg, _param_groups(recipe, trained))
    lr_scheduler = build_lr_scheduler(cfg, optimizer)

    if accelerator.is_main_process:
        create_run_folder(run_dir, overwrite)
        atomic_write_text(run_dir / "recipe.resolved.toml", dump_recipe(recipe))
    accelerator.wait_for_everyone()
    metrics_path = run_dir / "metrics.jsonl"

    base.vae.to(device)
    for module in base.text_encoders:
        module.to(device)
    flips = (False, True) if data.flip else (False,)
    cache = None
    if cfg.cache_latents:
        cache = LatentCache(Path(data.folder), vae_fingerprint(base.vae))
        with progress_bar("Caching latents", len(items), quiet=quiet) as bar:
            fresh = cache.fill(items, flips, _encoder(base, device), bar.advance)
        say(f"Latents: {len(items) * len(flips)} cached ({fresh} newly encoded) in {cache.folder}")
        base.vae.to("cpu")

    names = list(trained)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    models, optimizer = dict(zip(names, prepared[:-1], strict=True)), prepared[-1]
    for module in models.values():
        module.train()
    text_encoders = [models.get(n, m) for n, m in zip(base.text_encoder_names, base.text_encoders, strict=True)]
    cond_base = dataclasses.replace(base, text_encoders=text_encoders)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if accelerator.log_with:
        accelerator.init_trackers("tensorboard")

    rank, world = accelerator.process_index, accelerator.num_processes
    accumulation = cfg.gradient_accumulation_steps
    shards: list[list[int]] = []
    epoch, step, micro, loss_value = 0, 0, 0, float("nan")
    start = time.monotonic()
    with progress_bar("Training", cfg.max_steps, quiet=quiet) as bar:
        while step < cfg.max_steps:
            step_loss = 0.0
            with ExitStack() as no_sync:
                for k in range(accumulation):
                    if not shards:
                        batches = epoch_batches(
                            items, batch_size=cfg.batch_size, num_repeats=data.num_repeats, seed=cfg.seed, epoch=epoch
                        )
                        usable = len(batches) // world * world
                        shards = batches[rank:usable:world]
                        epoch += 1
                    batch = shards.pop(0)
                    if k < accumulation - 1:
                        for module in models.values():
                            no_sync.enter_context(accelerator.no_sync(module))
                    rng = step_rng(cfg.seed, f"{rank}:{micro}", "batch")
                    generator = torch.Generator().manual_seed(_derived_seed(cfg.seed, rank, micro))
                    flip = [data.flip and rng.random() < 0.5 for _ in batch]
                    captions = [transform_caption(items[i].caption, data, rng) for i in batch]
                    if cache is not None:
                        pairs = [cache.get(i, f) for i, f in zip(batch, flip, strict=True)]
                        means, stds = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
                    else:
                        encode = _encoder(base, device)
                        pairs = [encode(load_pixels(items[i], f)) for i, f in zip(batch, flip, strict=True)]
                        means, stds = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
                    latents = _latents(base, means, stds, generator)
                    noise = objective.sample_noise(tuple(latents.shape), cfg.noise_offset, generator)
                    timesteps = objective.sample_timesteps(
                        len(batch), base.noise_scheduler.config.num_train_timesteps, generator
                    )
                    noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
                    target = objective.training_target(
                        base.noise_scheduler, latents, noise, timesteps, base.prediction_type
                    )
                    weights = objective.loss_weights(
                        base.noise_scheduler, timesteps, cfg.min_snr_gamma, base.prediction_type
                    )
                    ids = [t.to(device) for t in tokenize(base, captions)]
                    with torch.set_grad_enabled(recipe.lora.train_text_encoder), accelerator.autocast():
                        conditioning = encode_prompts(cond_base, ids)
                    with accelerator.autocast():
                        prediction = models["unet"](noisy.to(device), timesteps.to(device), **conditioning).sample
                    loss = objective.diffusion_loss(prediction, target.to(device), weights.to(device))
                    accelerator.backward(loss / accumulation)
                    step_loss += loss.detach().item() / accumulation
                    micro += 1
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = accelerator.reduce(torch.tensor(step_loss, device=device), "mean").item()
            if not math.isfinite(loss_value):
                raise LorakitError(
                    f"training diverged: the loss is {loss_value} at step {step}; lower "
                    'train.unet_lr / train.text_encoder_lr or use mixed_precision = "bf16" or "no"'
                )
            if accelerator.is_main_process and (step % cfg.log_every_steps == 0 or step == cfg.max_steps):
                lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
                row = {
                    "step": step,
                    "loss": loss_value,
                    **lrs,
                    "epoch": epoch,
                    "elapsed_s": round(time.monotonic() - start, 3),
                }
                _write_metrics(metrics_path, row)
                accelerator.log({"loss": loss_value, **lrs}, step=step)
            bar.advance(1, loss=f"{loss_value:.4f}")

    accelerator.wait_for_everyone()
    state = {name: adapters.extract_lora(accelerator.unwrap_model(module)) for name, module in models.items()}
    kohya_path = run_dir / f"{recipe.output.name}.safetensors"
    diffusers_path = run_dir / f"{recipe.output.name}.diffusers.safetensors"
    if accelerator.is_main_process:
        info = _adapter_info(recipe, base, items, step, started)
        kohya_path, diffusers_path = save_adapter_files(
            state, run_dir, recipe.output.name, recipe.output.save_dtype, info
        )
        say(f"Saved {kohya_path} (kohya layout: A1111/Forge, ComfyUI, diffusers) and {diffusers_path.name}")
    accelerator.end_training()
    trainable = sum(p.numel() for p in params)
    unwrapped = {name: accelerator.unwrap_model(module) for name, module in models.items()}
    return RunResult(run_dir, kohya_path, diffusers_path, step, loss_value, trainable, unwrapped)


def _adapter_info(recipe: Recipe, base: BaseModel, items: list, steps: int, started: datetime) -> AdapterInfo:
    cfg, lora = recipe.train, recipe.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else json.dumps(lora.target_modules)
    training = {
        "ss_steps": str(steps),
        "ss_num_train_images": str(len(items) * recipe.data.num_repeats),
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
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_training_started_at": str(started.timestamp()),
        "ss_training_finished_at": str(datetime.now(timezone.utc).timestamp()),
        "lorakit_steps": str(steps),
        "lorakit_recipe_sha256": _recipe_hash(recipe),
        "lorakit_trigger": recipe.data.trigger,
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
    )

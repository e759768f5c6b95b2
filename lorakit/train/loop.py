"""The training loop: one optimizer step at a time, its loss, validation, checkpoints and resume.

Every random choice is a pure function of `train.seed` and a position (epoch, micro-step), and a checkpoint holds
that position with the adapter, EMA, optimizer and schedule state, so a resumed run continues bit for bit where
the interrupted one would have gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from .. import adapters, objective, slider
from ..checkpoint import (
    RunPaths,
    check_resumable,
    checkpoint_name,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
    write_failure,
)
from ..data import (
    BatchStream,
    Item,
    LatentCache,
    bucket_list,
    dataset_fingerprint,
    draw_colour_change,
    load_folder,
    load_mask,
    load_pixels,
    size_conditioning,
    steady_caption,
    step_rng,
    transform_caption,
    vae_fingerprint,
    warmup_steps,
)
from ..ema import AdapterEMA
from ..embedding import embedding_file
from ..errors import Interrupted, LorakitError, OutputError
from ..files import atomic_write, atomic_write_text, crash_point
from ..formats.files import save_adapter_files
from ..formats.metadata import training_info
from ..memory import STATE_IN_PARAMETER_DTYPE, adapter_bytes, checkpoint_bytes, rounding_chunk
from ..models import BaseModel, apply_token_weights, encode_prompts, tokenize, tokenize_weighted
from ..optim import averaged_weights, reapply_hyperparameters, step_rounding_stochastically
from ..progress import progress_bar
from ..recipe import Recipe, recipe_to_dict
from ..trigger import replace_trigger
from .images import render_samples

Log = Callable[[str], None]


@dataclass
class Run:
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
    paths: RunPaths
    log: Log
    quiet: bool
    step: int = 0
    micro: int = 0
    held_out: list[Item] = dataclasses.field(default_factory=list)  # `[validation] folder`'s items
    phases: Any = None  # setup.Phases: the wall time of each phase up to the first step
    token_cache: dict[str, list[Any]] = dataclasses.field(default_factory=dict)  # caption -> ids per tokenizer
    verbose: bool = False
    planned_gib: float | None = None  # lorakit plan's allocator peak for the training steps (CUDA runs)
    norms: tuple[int, float] | None = None  # train.scale_weight_norms: (modules scaled, largest norm) of the last step
    started: datetime | None = None  # when `train` was called (the adapters' ss_training_started_at)
    embeddings: dict[str, Any] = dataclasses.field(default_factory=dict)  # [embedding]: NewTokens per text encoder
    timestep_weights: Any = None  # train.timestep_bias: how often each timestep is drawn (None: uniformly)
    dropout: Any = None  # dropout.AdapterDropout: kohya's dropouts inside the adapters, when the recipe has them
    preservation_part: Any = None  # [preservation]: this step's weighted preservation loss so far (a tensor)
    preservation_loss: float | None = None  # [preservation]: the last step's, logged as `preservation_loss`
    strengths: Any = None  # [slider]: slider.SampleStrengths, each sample's adapter strength in the training pass

    @property
    def epochs_done(self) -> int:
        """Whole epochs this run has taken (ss_epoch)."""
        return int(self.stream.epochs_done)

    @property
    def device(self) -> Any:
        return self.accelerator.device

    def unwrapped(self) -> dict[str, Any]:
        return {name: self.accelerator.unwrap_model(m) for name, m in self.models.items()}

    def named_trainable(self) -> dict[str, Any]:
        """Every trained tensor by name: the adapters' (`unet.<path>`), then the new token vectors
        (`embedding.text_encoder`)."""
        named = {
            f"{name}.{n}": p
            for name, m in self.unwrapped().items()
            for n, p in adapters.named_lora_parameters(m).items()
        }
        named.update({f"embedding.{name}": m.vectors for name, m in self.embeddings.items()})
        return named


def derived_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def encoder(base: BaseModel, device: Any) -> Callable[[Any], tuple[Any, Any]]:

    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            dist = base.vae.encode(pixels.unsqueeze(0).to(device)).latent_dist
        return dist.mean[0].float().cpu(), dist.std[0].float().cpu()

    return encode


def timestep_weights(cfg: Any, count: int) -> Any:
    """The recipe's timestep bias over the base's `count` timesteps (None: uniform)."""
    return objective.timestep_weights(
        count,
        cfg.min_timestep,
        cfg.max_timestep,
        cfg.timestep_bias,
        cfg.timestep_bias_multiplier,
        cfg.timestep_bias_portion,
        cfg.timestep_bias_begin,
        cfg.timestep_bias_end,
    )


def scale_latents(base: BaseModel, latents: Any) -> Any:
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * base.vae.config.scaling_factor


def text_conditioning(run: Run, captions: list[str]) -> dict[str, Any]:

    if run.text_cache is not None:
        keys = run.text_cache[captions[0]].keys()
        return {k: to_device(torch.stack([run.text_cache[c][k] for c in captions]), run.device) for k in keys}
    recipe = run.recipe
    *ids, weights = [to_device(t, run.device) for t in token_ids(run, captions)]
    text_encoders = [
        run.models.get(n, m) for n, m in zip(run.base.text_encoder_names, run.base.text_encoders, strict=True)
    ]
    learning = recipe.lora.train_text_encoder or any(m.vectors.requires_grad for m in run.embeddings.values())
    # not inside validation's no_grad: the encoders' graph would be built and dropped for every held-out image
    with torch.set_grad_enabled(learning and torch.is_grad_enabled()), run.accelerator.autocast():
        base = dataclasses.replace(run.base, text_encoders=text_encoders)
        conditioning = encode_prompts(base, ids, recipe.model.clip_skip)
        return apply_token_weights(conditioning, weights) if recipe.data.weighted_captions else conditioning


def token_ids(run: Run, captions: list[str]) -> list[Any]:
    """Token ids of a batch's captions, per tokenizer, then their weights (`data.weighted_captions`; ones without
    it); each distinct caption is tokenized once per run."""
    cache = run.token_cache
    missing = [c for c in dict.fromkeys(captions) if c not in cache]
    if missing:
        if len(cache) > 50_000:  # shuffled or dropped-out captions can be many: keep memory bounded
            cache.clear()
        length = run.recipe.data.max_token_length
        if run.recipe.data.weighted_captions:
            ids, weights = tokenize_weighted(run.base, missing, length)
        else:
            ids = tokenize(run.base, missing, length)
            weights = torch.ones(ids[0].shape)
        for caption, *rows in zip(missing, *ids, weights, strict=True):
            cache[caption] = rows
    return [torch.stack([cache[c][k] for c in captions]) for k in range(len(run.base.tokenizers) + 1)]


def unet_conditioning(run: Run, captions: list[str], items: list[Item], flips: list[bool]) -> dict[str, Any]:
    """The U-Net's keyword arguments for a batch: text conditioning, and for SDXL the pooled text embedding with
    each image's size conditioning (`added_cond_kwargs`)."""
    return _sized_conditioning(
        run, captions, lambda: [size_conditioning(item, flip) for item, flip in zip(items, flips, strict=True)]
    )


def _sized_conditioning(run: Run, captions: list[str], sizes: Callable[[], list[Any]]) -> dict[str, Any]:
    """Text conditioning for `captions`, with SDXL's pooled embedding and `sizes()` (one six-number size
    conditioning per caption, asked for only by an SDXL base) as `added_cond_kwargs`."""
    conditioning = text_conditioning(run, captions)
    pooled = conditioning.pop("pooled", None)
    if pooled is not None:
        time_ids = torch.tensor(sizes(), dtype=torch.float32, device=run.device)
        conditioning["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return conditioning


def _micro_batch_loss(run: Run, batch: list[int]) -> Any:
    """The weighted denoising loss of one micro-batch; all its randomness derives from the micro-step."""

    if run.recipe.slider is not None:
        return _slider_loss(run)
    cfg, data, base = run.recipe.train, run.recipe.data, run.base
    rank = run.accelerator.process_index
    rng = step_rng(cfg.seed, f"{rank}:{run.micro}", "batch")
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, rank, run.micro))
    flips = _tied([data.flip and rng.random() < 0.5 for _ in batch], data.pairs)
    colours = [None] * len(batch)
    if data.color_aug:  # a stream of its own: the other draws stay as they are without it
        colour_rng = step_rng(cfg.seed, f"{rank}:{run.micro}", "colour")
        colours = _tied([draw_colour_change(colour_rng) for _ in batch], data.pairs)
    items = [run.items[i] for i in batch]
    if data.random_crop:  # where each crop sits in its image's margin, from a stream of its own too
        crop_rng = step_rng(cfg.seed, f"{rank}:{run.micro}", "crop")
        places = _tied([(crop_rng.random(), crop_rng.random()) for _ in batch], data.pairs)
        items = [dataclasses.replace(item, place=place) for item, place in zip(items, places, strict=True)]
    progress = (run.step, warmup_steps(data, run.recipe.train.max_steps))
    captions = [transform_caption(run.items[i].caption, data, rng, run.items[i].fixed_tags, progress) for i in batch]
    every = data.caption_dropout_every_epochs
    if every and (run.stream.epoch + 1) % every == 0:  # kohya counts epochs from 1: epochs N, 2N, ... drop them all
        captions = [""] * len(batch)
    if run.cache is not None:
        pairs = [run.cache.get(i, f) for i, f in zip(batch, flips, strict=True)]
    else:
        encode = encoder(base, run.device)
        pairs = [encode(load_pixels(item, f, c)) for item, f, c in zip(items, flips, colours, strict=True)]
    means, stds = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    latents = scale_latents(base, means + stds * torch.randn(means.shape, generator=generator))
    noise = objective.sample_noise(
        tuple(latents.shape),
        cfg.noise_offset,
        generator,
        cfg.multires_noise_iterations,
        cfg.multires_noise_discount,
        random_strength=cfg.noise_offset_random_strength,
        adaptive_scale=cfg.adaptive_noise_scale,
        latents=latents,
    )
    timesteps = objective.sample_timesteps(
        len(batch), cfg.min_timestep, cfg.max_timestep, generator, run.timestep_weights
    )
    noised_with = objective.perturbed_noise(noise, cfg.ip_noise_gamma, generator, cfg.ip_noise_gamma_random_strength)
    noise, timesteps, noised_with = (_tied(t, data.pairs) for t in (noise, timesteps, noised_with))
    noisy = base.noise_scheduler.add_noise(latents, noised_with, timesteps)
    target = objective.training_target(base.noise_scheduler, latents, noise, timesteps, base.prediction_type)
    weights = _loss_weights(run, timesteps) * torch.tensor([item.loss_weight for item in items])
    preservation_loss = None
    if not run.recipe.preserving:
        predicted = _prediction(run, captions, items, flips, noisy, timesteps)
    else:
        predicted, preservation_loss = _preserving_prediction(run, captions, items, flips, noisy, timesteps, weights)
    pixel_weights = None
    if data.masked_loss:  # the subject counts fully, the rest by mask_background_weight
        masks = torch.stack([batch_mask(run, i, item, f) for i, item, f in zip(batch, items, flips, strict=True)])
        pixel_weights = to_device(masks + (1 - masks) * data.mask_background_weight, run.device)
    loss = objective.diffusion_loss(
        predicted,
        to_device(target, run.device),
        to_device(weights, run.device),
        cfg.loss_type,
        _loss_threshold(run, timesteps),
        pixel_weights,
    )
    if preservation_loss is None:
        return loss
    part = run.recipe.preservation.weight * preservation_loss
    run.preservation_part = part.detach() + (0 if run.preservation_part is None else run.preservation_part)
    return loss + part


def _tied(draws: Any, pairs: bool) -> Any:
    """`data.pairs`: a batch is pairs of neighbours (first image, its namesake), and the namesake trains with the
    first's draw (flip, noise, timestep); the draws are made for every image alike, so the random streams stay
    as they are without pairs."""
    if not pairs:
        return draws
    if isinstance(draws, list):
        return [draws[i - i % 2] for i in range(len(draws))]
    tied = draws.clone()
    tied[1::2] = draws[0::2]
    return tied


def _loss_threshold(run: Run, timesteps: Any) -> Any:
    """The huber / smooth_l1 threshold of each sample at its timestep (squared error has none)."""
    cfg = run.recipe.train
    if cfg.loss_type not in ("huber", "smooth_l1"):
        return cfg.huber_c
    return objective.huber_thresholds(
        run.base.noise_scheduler, timesteps, cfg.huber_c, cfg.huber_schedule, cfg.huber_scale
    )


def _loss_weights(run: Run, timesteps: Any) -> Any:
    """Each sample's loss weight at its timestep: min-SNR, debiased estimation and the v-prediction scalings."""
    cfg, base = run.recipe.train, run.base
    return objective.loss_weights(
        base.noise_scheduler,
        timesteps,
        cfg.min_snr_gamma,
        base.prediction_type,
        cfg.debiased_estimation,
        cfg.scale_v_pred_loss_like_noise_pred,
        cfg.v_pred_like_loss,
    )


def _slider_loss(run: Run) -> Any:
    """[slider]: the loss of one micro-batch of `train.batch_size` noisy latents made by the base, learned at
    strength +1 and -1 in one pass of twice the batch (see `lorakit.slider`); its randomness derives from the
    micro-step."""
    from diffusers import DDIMScheduler

    cfg, base, section, data = run.recipe.train, run.base, run.recipe.slider, run.recipe.data
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, run.accelerator.process_index, run.micro))
    rng = step_rng(cfg.seed, f"{run.accelerator.process_index}:{run.micro}", "slider")
    size = rng.choice([data.resolution, *data.extra_resolutions]) if data.extra_resolutions else data.resolution
    side = size // base.vae_scale_factor
    channels = base.unet.config.in_channels
    noise = objective.sample_noise(
        (cfg.batch_size, channels, side, side),
        cfg.noise_offset,
        generator,
        cfg.multires_noise_iterations,
        cfg.multires_noise_discount,
        random_strength=cfg.noise_offset_random_strength,
    )
    taken = int(torch.randint(1, section.denoise_steps - 1, (1,), generator=generator))
    count = cfg.batch_size
    choices = section.targets  # several: each latent draws its own (no draw for one, as before there were lists)
    picks = [rng.randrange(len(choices)) if len(choices) > 1 else 0 for _ in range(count)]
    prompts = [  # each latent's (target class, positive, negative)
        [slider.shuffled(text, rng) if section.shuffle else text for text in choices[pick]] for pick in picks
    ]
    targets, positives, negatives = ([row[k] for row in prompts] for k in range(3))
    models = run.unwrapped()
    with torch.no_grad(), adapters.adapters_disabled(*models.values()):  # the base, for the latents and targets

        def predict(latents: Any, t: Any, conditioning: dict[str, Any]) -> Any:
            with run.accelerator.autocast():
                timesteps = torch.full((latents.shape[0],), int(t), device=run.device)
                return models["unet"](latents.to(run.device), timesteps, **conditioning).sample.float()

        scheduler = DDIMScheduler.from_config(base.noise_scheduler.config, prediction_type=base.prediction_type)
        guided = _prompt_conditioning(run, [""] * count + targets, size)  # encoded once for every denoising step
        noisy, t = slider.partial_denoise(
            lambda x, step: predict(x, step, guided),
            scheduler,
            to_device(noise, run.device),
            section.denoise_steps,
            taken,
        )
        three = _prompt_conditioning(run, targets + positives + negatives, size)
        neutral, positive, negative = predict(torch.cat([noisy] * 3), t, three).chunk(3)
    wanted = slider.sided_targets(neutral, positive, negative, section.guidance)
    timesteps = torch.full((2 * count,), int(t))
    weights = _loss_weights(run, timesteps) * torch.tensor([section.weights[pick] for pick in picks] * 2)
    run.strengths.set(torch.tensor([strength for strength in slider.SIDES for _ in range(count)], device=run.device))
    conditioning = _prompt_conditioning(run, targets * 2, size)
    with run.accelerator.autocast():
        predicted = run.models["unet"](torch.cat([noisy] * 2), to_device(timesteps, run.device), **conditioning).sample
    return objective.diffusion_loss(
        predicted,
        wanted,
        to_device(weights, run.device),
        cfg.loss_type,
        _loss_threshold(run, timesteps),
        None,
    )


def _prompt_conditioning(run: Run, prompts: list[str], size: int) -> dict[str, Any]:
    """The U-Net's keyword arguments for prompts drawn `size` pixels square (SDXL: uncropped)."""
    return _sized_conditioning(run, prompts, lambda: [(size, size, 0, 0, size, size)] * len(prompts))


def _prediction(run: Run, captions: list[str], items: list[Item], flips: list[bool], noisy: Any, timesteps: Any):
    """What the U-Net being trained predicts for the noisy latents at their timesteps, under their captions; each
    image at its adapter strength (`data.adapter_strength`), when some are not 1."""
    if run.strengths is not None:  # set before the text encoders run too; cleared after the step's backward passes
        run.strengths.set(torch.tensor([item.strength for item in items], device=run.device))
    conditioning = unet_conditioning(run, captions, items, flips)
    with run.accelerator.autocast():
        return run.models["unet"](
            to_device(noisy, run.device), to_device(timesteps, run.device), **conditioning
        ).sample


def _preserving_prediction(
    run: Run, captions: list[str], items: list[Item], flips: list[bool], noisy: Any, timesteps: Any, weights: Any
) -> tuple[Any, Any]:
    """[preservation]: the prediction for the captions, and the loss that keeps the prediction for the class captions
    (the trigger replaced by the class word) at what the base without the adapters (the text encoders' too)
    predicts for them on the same noisy latents and timesteps."""
    section = run.recipe.preservation
    classes = [replace_trigger(c, run.recipe.data.trigger, section.class_word) for c in captions]
    models = run.unwrapped()
    with torch.no_grad(), adapters.adapters_disabled(*models.values()):  # first, while no graph holds the adapters
        conditioning = unet_conditioning(run, classes, items, flips)
        with run.accelerator.autocast():
            noisy_here, timesteps_here = to_device(noisy, run.device), to_device(timesteps, run.device)
            target = models["unet"](noisy_here, timesteps_here, **conditioning).sample.float()
    # both caption sets in one forward pass of twice the batch: DDP allows one forward per backward
    both = _prediction(
        run, captions + classes, items * 2, flips * 2, torch.cat([noisy] * 2), torch.cat([timesteps] * 2)
    )
    predicted, preserved = both.chunk(2)
    threshold = run.recipe.train.huber_c  # squared error has none
    return predicted, objective.diffusion_loss(
        preserved, target, to_device(weights, run.device), "l2", threshold, None
    )


def batch_mask(run: Run, index: int, item: Item, flip: bool) -> Any:
    """An image's mask on the latent grid: from the latent cache when latents are cached, else read and fitted as
    its image is this step (an image without a mask gets ones)."""
    cached = run.cache.mask(index, flip) if run.cache is not None else None
    return cached if cached is not None else load_mask(item, flip, run.base.vae_scale_factor)


def to_device(tensor: Any, device: Any) -> Any:
    """A CPU-made batch tensor on the training device: on CUDA through pinned memory, without waiting for the copy
    (the stream orders it before the kernels that read it)."""
    if getattr(device, "type", str(device)) != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def optimizer_step(run: Run) -> float:
    """Accumulate `gradient_accumulation_steps` micro-batches and take one optimizer step; returns the loss."""

    cfg, accelerator = run.recipe.train, run.accelerator
    if run.embeddings and run.step >= embedding_steps(run.recipe):  # [embedding] train_until: the LoRA goes on alone
        for module in run.embeddings.values():
            module.vectors.requires_grad_(False)
    accumulation, total = cfg.gradient_accumulation_steps, torch.zeros((), device=run.device)
    with ExitStack() as no_sync:
        for k in range(accumulation):
            if k < accumulation - 1:  # only the last micro-batch all-reduces gradients
                for module in run.models.values():
                    no_sync.enter_context(accelerator.no_sync(module))
            loss = _micro_batch_loss(run, run.stream.next())
            accelerator.backward(loss / accumulation)
            total += loss.detach() / accumulation  # no host sync inside the accumulation loop
            run.micro += 1
            if k == accumulation - 2:
                no_sync.close()
    if run.strengths is not None:  # every backward pass is done: samples and validation see strength 1
        run.strengths.clear()
    if run.dropout is not None:  # module dropout: a module off for the whole step is left alone, as kohya's is
        run.dropout.forget_idle_gradients(lambda used: accelerator.reduce(used, "sum"))
    average_embedding_gradients(run)
    stop_finished_text_encoders(run, drop_gradients=True)
    if cfg.max_grad_norm:
        accelerator.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
    if cfg.rounds_stochastically:  # the same random bits on every process, and again on resume
        generator = torch.Generator(device=run.device).manual_seed(derived_seed(cfg.seed, "round", run.step))
        lifted_state, chunk = cfg.optimizer in STATE_IN_PARAMETER_DTYPE, rounding_chunk(cfg.optimizer)
        step_rounding_stochastically(run.optimizer, generator, lifted_state, chunk)
    else:
        run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    stop_finished_text_encoders(run)  # the schedule set every rate again: the rate logged is the next step's
    if cfg.scale_weight_norms is not None:  # before the EMA, which then follows the capped weights
        run.norms = adapters.cap_update_norms(run.models, cfg.scale_weight_norms)
    if run.ema is not None:
        run.ema.update(run.step)
    if run.preservation_part is not None:  # reduced with the loss, in the same one sync
        both = accelerator.reduce(torch.stack([total, run.preservation_part / accumulation]), "mean").tolist()
        run.preservation_part, run.preservation_loss = None, both[1]
        return both[0]
    return accelerator.reduce(total, "mean").item()  # the one sync per step: the loss is checked and logged


def average_embedding_gradients(run: Run) -> None:
    """[embedding] on several processes: average the new token vectors' gradients over the processes where DDP does
    not, that is in a text encoder that is not trained (and so not wrapped), as DDP averages what it wraps."""
    if run.accelerator.num_processes == 1:
        return
    for name, module in run.embeddings.items():
        if name not in run.models and module.vectors.grad is not None:
            module.vectors.grad = run.accelerator.reduce(module.vectors.grad, "mean")


def exported_weights(run: Run) -> dict[str, Any] | None:
    """The weights that are saved instead of the trained tensors, by `named_trainable` name: the EMA's where the
    recipe keeps one, schedule-free AdamW's running average with that optimizer; None otherwise."""
    if run.ema is not None:
        return run.ema.shadow
    return averaged_weights(run.optimizer, run.named_trainable())


@contextlib.contextmanager
def averaged_in_place(run: Run) -> Iterator[None]:
    """Samples and validation with schedule-free AdamW: its running average is put into the adapters for the block,
    and the trained tensors are put back exactly afterwards (its own `eval()` / `train()` round trip would move
    them by rounding, on the writing process only)."""
    averaged = averaged_weights(run.optimizer, run.named_trainable())
    if averaged is None:
        yield
        return
    params = run.named_trainable()
    kept = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(averaged[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(kept[name])


def adapter_state(run: Run) -> dict[str, Any]:
    """The adapters to export, by component: `exported_weights` where there are such, else the trained ones."""
    models = run.unwrapped()
    weights = exported_weights(run) or {}
    by_component = {
        name: {n[len(name) + 1 :]: t for n, t in weights.items() if n.startswith(name + ".")} for name in models
    }
    return {name: adapters.extract_adapters(m, by_component[name] or None) for name, m in models.items()}


def save_intermediate_adapter(run: Run, epoch: int | None) -> Path:
    """The adapter as it is at this step, beside the final one (`output.intermediate_adapters`), named for the
    epoch that just ended or for the step; one file, in the final file's layout."""
    recipe = run.recipe
    timesteps = run.base.noise_scheduler.config.num_train_timesteps
    started = run.started or datetime.now(UTC)
    info = training_info(recipe, run.base.family, run.items, run.step, started, timesteps, epoch=run.epochs_done)
    stem = run.paths.intermediate_name(run.step, epoch)
    try:
        if embedding_only(recipe):  # textual inversion: the vectors are all there is
            return save_embedding(run, stem[len(recipe.output.name) :])
        kohya, diffusers = save_adapter_files(
            adapter_state(run), run.paths.folder, stem, recipe.output.save_dtype, info, diffusers_copy=False
        )
        save_embedding(run, stem[len(recipe.output.name) :])
    except OSError as err:
        needed = adapter_bytes(recipe, [t.numel() for t in run.named_trainable().values()]) // 2
        raise write_failure(err, run.paths.folder, f"the adapter of step {run.step}", needed, recipe.source) from None
    return kohya or diffusers


def embedding_only(recipe: Recipe) -> bool:
    """Whether the run trains an [embedding] alone, with no LoRA (`embedding.only`)."""
    return recipe.embedding is not None and recipe.embedding.only


def text_encoder_steps(recipe: Recipe) -> int:
    """The steps during which the text encoders' adapters learn (`train.text_encoder_until` of the run's, at least
    one)."""
    return max(1, math.ceil(recipe.train.text_encoder_until * recipe.train.max_steps))


def stop_finished_text_encoders(run: Run, drop_gradients: bool = False) -> None:
    """Past `train.text_encoder_until`, the text encoders' parameter groups at rate 0 (what is logged) and, before the
    optimizer step, without gradients: every optimizer skips a parameter without one, so the weights stay exactly as
    they are (decay included; Prodigy and schedule-free AdamW would move them at rate 0), gradient clipping measures
    the U-Net's alone, and the processes of a multi-process run keep their DDP wrappers as they were."""
    if run.recipe.train.text_encoder_until < 1 and run.step >= text_encoder_steps(run.recipe):
        for group in run.optimizer.param_groups:
            if group["name"].startswith("text_encoder"):
                group["lr"] = 0.0
                if "scheduled_lr" in group:  # what schedule-free AdamW logs
                    group["scheduled_lr"] = 0.0
                if drop_gradients:
                    for parameter in group["params"]:
                        parameter.grad = None


def embedding_steps(recipe: Recipe) -> int:
    """The steps during which [embedding]'s vectors train (`train_until` of the run's steps, at least one)."""
    return max(1, math.ceil(recipe.embedding.train_until * recipe.train.max_steps))


def save_embedding(run: Run, suffix: str = "") -> Path | None:
    """[embedding]: the token vectors (the EMA's where the recipe keeps one) as a textual-inversion file,
    `embeddings/<token><suffix>.safetensors`; None without an [embedding]."""
    if not run.embeddings:
        return None
    token = run.recipe.embedding.token
    weights = exported_weights(run) or run.named_trainable()
    vectors = [weights[f"embedding.{name}"] for name in run.embeddings]
    path = run.paths.embedding(token, suffix)
    path.parent.mkdir(exist_ok=True)
    data = embedding_file(vectors, run.base.family, token, run.step)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


def save(run: Run) -> Path:
    return save_checkpoint(
        run.paths.folder,
        run.step,
        adapter=run.named_trainable(),
        ema=run.ema.shadow if run.ema else None,
        optimizer_state=run.optimizer.state_dict(),
        scheduler_state=run.lr_scheduler.state_dict(),
        position={"epoch": run.stream.epoch, "offset": run.stream.offset, "micro": run.micro},
        rng=rng_state(),
        recipe=recipe_to_dict(run.recipe),
        keep=run.recipe.train.keep_checkpoints,
        dataset=dataset_fingerprint(run.items),
    )


def restore(run: Run, checkpoint: Path, log: Log) -> None:

    saved = load_checkpoint(checkpoint)
    check_resumable(saved["recipe"], run.recipe, log)
    if saved.get("dataset") and saved["dataset"] != dataset_fingerprint(run.items):
        raise OutputError(
            f"--resume: the dataset changed since {checkpoint.name} (images, captions or repeats); the data order "
            "and what the adapter learned depend on it: resume with the same dataset, or start a new run"
        )
    params = run.named_trainable()
    with torch.no_grad():
        for name, tensor in saved["adapter"].items():
            params[name].copy_(tensor)
    optimizer_state = saved["optimizer"]
    optimizer_state["state"] = {int(k): v for k, v in optimizer_state["state"].items()}
    run.optimizer.load_state_dict(optimizer_state)
    reapply_hyperparameters(run.recipe.train, run.optimizer)
    run.lr_scheduler.load_state_dict(saved["scheduler"])
    if run.ema is not None:
        if saved["ema"] is None:
            raise OutputError(f"--resume: {checkpoint} was saved without EMA; set train.ema_decay = 0 to resume it")
        run.ema.load(saved["ema"])
    restore_rng(saved["rng"])
    position = saved["position"]
    run.step, run.micro = saved["step"], position["micro"]
    run.stream = (
        slider.NoImages(position["offset"])
        if run.recipe.slider is not None
        else BatchStream(
            run.items,
            batch_size=run.recipe.train.batch_size,
            seed=run.recipe.train.seed,
            rank=run.accelerator.process_index,
            world=run.accelerator.num_processes,
            epoch=position["epoch"],
            offset=position["offset"],
            partners=run.stream.partners,
        )
    )
    metrics = run.paths.metrics
    if metrics.is_file():
        kept, torn = [], 0
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= run.step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut off by the crash being resumed from
                torn += 1
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))
        if torn:
            log(f"--resume: dropped {torn} damaged line(s) of {metrics.name} (cut off when the run was killed)")
    log(f"Resumed from {checkpoint} at step {run.step}")


def held_out_items(recipe: Recipe, base: BaseModel) -> list[Item]:
    """The items of `[validation] folder` (none without a `[validation]` section, or with `split`, whose items
    set-up takes from the dataset)."""
    if not recipe.validation or recipe.validation.folder is None:
        return []
    buckets = bucket_list(recipe.data.resolution, base.pixel_multiple)
    return load_folder(
        Path(recipe.validation.folder),
        trigger=recipe.data.trigger,
        repeats=1,
        buckets=buckets,
        separator=recipe.data.keep_tokens_separator,
    )


def validation_items(run: Run) -> tuple[list[Item], LatentCache]:
    """The held-out items with their latents encoded (cached beside them: in their folder, or the dataset's for
    `validation.split`)."""
    data = run.recipe.data.folder
    folder = Path(run.recipe.validation.folder or (data if isinstance(data, str) else data[0]))
    cache = LatentCache(folder, vae_fingerprint(run.base.vae), run.base.vae_scale_factor)
    run.base.vae.to(run.device)
    cache.fill(run.held_out, (False,), encoder(run.base, run.device))
    if run.cache is not None:
        run.base.vae.to("cpu")
    return run.held_out, cache


def validation_loss(run: Run, items: list[Item], cache: LatentCache) -> float:
    """Mean denoising loss on held-out images at fixed noise and timesteps (comparable across steps)."""

    validation, base = run.recipe.validation, run.base
    losses = []
    models = run.unwrapped()
    for module in models.values():
        module.eval()
    with torch.no_grad():
        for index, item in enumerate(items):
            mean, _ = cache.get(index, False)
            latents = scale_latents(base, mean[None])
            for timestep in validation.timesteps:
                generator = torch.Generator().manual_seed(derived_seed("validation", index, timestep))
                noise = torch.randn(latents.shape, generator=generator)
                t = torch.tensor([timestep])
                noisy = base.noise_scheduler.add_noise(latents, noise, t)
                target = objective.training_target(base.noise_scheduler, latents, noise, t, base.prediction_type)
                caption = steady_caption(item.caption, run.recipe.data)
                if run.strengths is not None:  # a held-out image at its folder's adapter strength
                    run.strengths.set(torch.tensor([item.strength], device=run.device))
                conditioning = unet_conditioning(run, [caption], [item], [False])
                with run.accelerator.autocast():
                    prediction = models["unet"](noisy.to(run.device), t.to(run.device), **conditioning).sample
                losses.append(torch.nn.functional.mse_loss(prediction.float(), target.to(run.device)).item())
    if run.strengths is not None:
        run.strengths.clear()
    for module in models.values():
        module.train()
    return sum(losses) / len(losses)


def due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def now() -> float:
    """The clock `train.save_every_minutes` reads (seconds; a test replaces it)."""
    return time.monotonic()


def _backup_due(run: Run, since: float) -> bool:
    """Whether `train.save_every_minutes` have passed since `since`. On several processes the first one's clock decides
    for all, so that every process takes part in the same step's checkpoint."""
    minutes = run.recipe.train.save_every_minutes
    if not minutes:
        return False
    passed = now() - since >= minutes * 60
    if run.accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        passed = bool(broadcast(torch.tensor([float(passed)], device=run.device), from_process=0).item())
    return passed


class _StopRequests:
    """SIGINT/SIGTERM during training: the step in progress finishes, a checkpoint is saved and the run stops with
    how to resume. A second signal stops at once. Only in a single-process run's main thread (the processes of a
    multi-process job cannot agree on which step to stop at, so they keep the default behaviour)."""

    def __init__(self, active: bool):
        self.signal: int | None = None
        self.active = active and threading.current_thread() is threading.main_thread()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        if self.active:
            for number in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(number) is not signal.SIG_IGN:  # nohup and friends asked to ignore it: keep that
                    self._previous[number] = signal.signal(number, self._request)
        return self

    def _request(self, number: int, frame: Any) -> None:
        if self.signal is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signal = number

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def save_or_explain(run: Run) -> Path:
    """`save(run)`, with a failed write (a full disk) turned into one line that says what it needs."""
    try:
        return save(run)
    except OSError as err:
        needed = checkpoint_bytes(run.recipe, [t.numel() for t in run.named_trainable().values()])
        raise write_failure(
            err, run.paths.folder, f"the checkpoint of step {run.step}", needed, run.recipe.source
        ) from None


def check_finite_adapter(run: Run) -> None:
    """Never save an adapter with NaN or infinite weights: name the step and the likely causes instead."""
    bad = [name for name, tensor in run.named_trainable().items() if not torch.isfinite(tensor).all()]
    if bad:
        raise LorakitError(
            f"training diverged: {len(bad)} adapter tensors hold NaN or infinity at step {run.step} (first: "
            f"{bad[0]}); nothing was saved for this step and the last checkpoint is kept; lower train.unet_lr / "
            'train.text_encoder_lr or use mixed_precision = "bf16" or "no"'
        )


def fit(run: Run) -> float:
    """Train until `train.max_steps`, logging, validating, checkpointing and sampling as the recipe says; returns
    the last step's loss."""

    recipe, cfg, accelerator = run.recipe, run.recipe.train, run.accelerator
    validation = validation_items(run) if recipe.validation else None
    at_checkpoints = not (recipe.sample.every_steps or recipe.sample.every_epochs)  # samples go with checkpoints
    sample_every = recipe.sample.every_steps or (cfg.save_every_steps if at_checkpoints else 0)
    loss, start = float("nan"), time.monotonic()
    if run.device.type == "cuda":  # loading and caching peak apart from the training steps' peak
        loading = torch.cuda.max_memory_allocated(run.device) / 2**30
        run.log(
            f"GPU memory: {loading:.2f} GiB at most while loading and caching; metrics.jsonl's "
            "max_memory_allocated_gib is the peak of the training steps"
        )
        torch.cuda.reset_peak_memory_stats(run.device)
    if recipe.sample.at_first and run.step == 0:  # what the base draws, before any step (not again on a resume)
        if accelerator.is_main_process:
            with averaged_in_place(run):
                render_samples(run)
        accelerator.wait_for_everyone()
    stops = _StopRequests(accelerator.num_processes == 1)
    last_save = now()
    with progress_bar("Training", cfg.max_steps - run.step, quiet=run.quiet) as bar, stops:
        while run.step < cfg.max_steps:
            first = run.phases is not None and "first step" not in run.phases.seconds
            epochs_before = run.epochs_done
            loss = optimizer_step(run)
            if first:
                run.phases.done("first step")
                if cfg.compile:
                    took = run.phases.seconds["first step"]
                    run.log(f"train.compile: the first step, which compiled the U-Net, took {took:.1f} s")
                if run.verbose:
                    run.log("Start-up (end of imports to the end of the first step):")
                    for line in run.phases.lines():
                        run.log(line)
            if not math.isfinite(loss):
                raise LorakitError(
                    f"training diverged: the loss is {loss} at step {run.step}; lower "
                    'train.unet_lr / train.text_encoder_lr or use mixed_precision = "bf16" or "no"'
                )
            row: dict[str, Any] = {}
            validating = validation and (
                due(run.step, recipe.validation.every_steps, cfg.max_steps)
                or _epoch_ended(epochs_before, run.epochs_done, recipe.validation.every_epochs) is not None
            )
            if validating:
                with averaged_in_place(run):
                    row["val_loss"] = validation_loss(run, *validation)
            epoch_end = _epoch_ended(epochs_before, run.epochs_done, cfg.save_every_epochs)
            saving = due(run.step, cfg.save_every_steps, cfg.max_steps) or epoch_end is not None
            backup = not saving and _backup_due(run, last_save)  # a timed checkpoint alone
            sample_epoch = _epoch_ended(epochs_before, run.epochs_done, recipe.sample.every_epochs)
            sampling = bool(recipe.sample.prompts) and (
                due(run.step, sample_every, cfg.max_steps) or sample_epoch is not None or (at_checkpoints and saving)
            )
            if accelerator.is_main_process:
                if due(run.step, cfg.log_every_steps, cfg.max_steps) or row:
                    if run.norms is not None:
                        row |= {"keys_scaled": run.norms[0], "max_key_norm": round(run.norms[1], 6)}
                    if run.preservation_loss is not None:  # its weighted share of `loss`
                        row["preservation_loss"] = run.preservation_loss
                    _log_metrics(run, {"step": run.step, "loss": loss, **row}, start)
                if saving:
                    check_finite_adapter(run)
                    save_or_explain(run)
                    if recipe.output.intermediate_adapters and run.step < cfg.max_steps:
                        save_intermediate_adapter(run, epoch_end)
                if backup:
                    check_finite_adapter(run)
                    save_or_explain(run)
                if sampling:
                    with averaged_in_place(run):
                        render_samples(run)
            if saving or backup:
                last_save = now()
            if saving or sampling or backup:
                accelerator.wait_for_everyone()  # the other processes wait while the main one writes
            bar.advance(1, loss=f"{loss:.4f}")
            if stops.signal is not None:
                _stop(run, stops.signal, saved=saving or backup)
    accelerator.wait_for_everyone()
    return loss


def _epoch_ended(before: int, after: int, every: int) -> int | None:
    """The epoch whose end a step reached, when it is one of every `every`-th (counted from 1), else None."""
    if every <= 0 or after // every == before // every:
        return None
    return after // every * every


def _stop(run: Run, number: int, saved: bool) -> None:
    """End the run on a stop request, after saving this step's checkpoint (unless it was just saved)."""
    check_finite_adapter(run)
    path = run.paths.checkpoints / checkpoint_name(run.step) if saved else save_or_explain(run)
    name = signal.Signals(number).name
    raise Interrupted(
        f"{name} at step {run.step} of {run.recipe.train.max_steps}: progress saved in {path}; continue with "
        f"`lorakit train {run.recipe.source} --resume latest`",
        exit_code=128 + number,
    )


def _log_metrics(run: Run, row: dict[str, Any], start: float) -> None:
    """One `metrics.jsonl` line (and a TensorBoard point): loss, validation loss, learning rates, epoch, time."""
    # schedule-free AdamW warms its rate up inside the step and records it as `scheduled_lr`
    lrs = {f"lr_{g['name']}": g.get("scheduled_lr", g["lr"]) for g in run.optimizer.param_groups}
    row = {
        **row,
        **lrs,
        "epoch": round(run.stream.epochs_done, 4),
        "elapsed_s": round(time.monotonic() - start, 3),
    }
    if run.device.type == "cuda":  # the measured peak, for comparing with what a plan predicted
        row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
    line = json.dumps(row) + "\n"
    with run.paths.metrics.open("a", encoding="utf-8") as out:
        out.write(line[: len(line) // 2])
        out.flush()
        crash_point("metrics-line")  # a kill here leaves a torn last line, which a resume drops
        out.write(line[len(line) // 2 :])
    run.accelerator.log({k: v for k, v in row.items() if k not in ("step", "elapsed_s")}, step=run.step)

"""Pretraining the toy base model on the CPU: a VAE on a wide image distribution, then the U-Net and text encoder.

The result is an SD 1.x-shaped diffusers folder (same component classes as Stable Diffusion, only
tiny) that draws the toy world's captions, built deterministically for a seed and cached.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from ..files import atomic_write_text
from ..progress import progress_bar
from .text import make_clip_tokenizer, make_text_encoder
from .world import SIZE, WORDS, base_world, vae_scene

VERSION = 2
DEFAULT_FOLDER = Path("~/.cache/lorakit").expanduser() / f"toy-base-v{VERSION}"


def _tensor(images):

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def build_components(seed: int):
    """Untrained toy components (tokenizer, text encoder, VAE, U-Net, scheduler)."""

    # Toy captions are at most 9 tokens; a 16-token context keeps the cross-attention cheap.
    tokenizer, vocab = make_clip_tokenizer(WORDS, model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = make_text_encoder(vocab, 64)
    # Two levels (8x8 latents from 16x16 pictures); without the mid-block attention, which buys nothing here.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )
    with torch.no_grad():  # start the posterior narrow, as a trained SD VAE's is (std ~ 0.01, not ~1)
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -9.0
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(4, 8),
        norm_num_groups=16,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    return tokenizer, text_encoder, vae, unet, scheduler


def train_vae(vae, steps: int, seed: int, advance) -> float:
    """Reconstruction + a light KL on random shapes of any colour on any background (never the captioned world
    itself); returns the final reconstruction MSE."""

    rng = random.Random(seed)
    pool = _tensor([vae_scene(rng) for _ in range(4000)])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    mse = 0.0
    for step in range(steps):
        batch = pool[torch.randint(0, len(pool), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(
            posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        ).sample
        mse_loss = torch.nn.functional.mse_loss(reconstruction, batch)
        loss = mse_loss + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * (0.1 + 0.9 * (1 - step / steps))
        mse = 0.98 * mse + 0.02 * mse_loss.item() if step else mse_loss.item()
        advance()
    vae.eval()
    return mse


def train_denoiser(unet, text_encoder, tokenizer, vae, scheduler, steps: int, seed: int, advance) -> float:
    """The U-Net and text encoder on the base world's latents (epsilon objective, 10% empty captions)."""

    pairs = base_world(32, seed + 2)
    with torch.no_grad():
        posterior = torch.cat(
            [vae.encode(chunk).latent_dist.mean for chunk in _tensor([p for p, _ in pairs]).split(256)]
        )
    scale = 1.0 / posterior.std().item()
    vae.register_to_config(scaling_factor=round(scale, 4))
    latents = posterior * scale
    captions = [c for _, c in pairs]
    ids = tokenizer(
        captions + [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    empty = ids[-1:]
    ids = ids[:-1]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=6e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train()
    ema = 0.0
    for step in range(steps):
        index = torch.randint(0, len(latents), (32,), generator=generator)
        batch_ids = ids[index].clone()
        drop = torch.rand(32, generator=generator) < 0.1
        batch_ids[drop] = empty
        noise = torch.randn(latents[index].shape, generator=generator)
        t = torch.randint(0, 1000, (32,), generator=generator)
        noisy = scheduler.add_noise(latents[index], noise, t)
        prediction = unet(noisy, t, encoder_hidden_states=text_encoder(batch_ids)[0]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = (
                6e-4
                * min(1.0, (step + 1) / 100)
                * (0.05 + 0.95 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * step / steps)))
            )
        ema = 0.98 * ema + 0.02 * loss.item() if step else loss.item()
        advance()
    unet.eval()
    text_encoder.eval()
    return ema


def build_toy_base(
    out: str | Path | None = None,
    *,
    seed: int = 0,
    vae_steps: int = 800,
    unet_steps: int = 1200,
    quiet: bool = False,
    log=print,
) -> Path:
    """Build (or reuse) the toy base model in `out`; returns its folder."""

    out = Path(out).expanduser() if out else DEFAULT_FOLDER
    stamp = {"version": VERSION, "seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps}
    marker = out / "toy.json"
    if marker.is_file() and json.loads(marker.read_text()).get("build") == stamp:
        log(f"Toy base model: reusing {out}")
        return out
    start = time.monotonic()
    tokenizer, text_encoder, vae, unet, scheduler = build_components(seed)
    with progress_bar("Toy VAE", vae_steps, quiet=quiet) as bar:
        vae_mse = train_vae(vae, vae_steps, seed, bar.advance)
    with progress_bar("Toy U-Net + text encoder", unet_steps, quiet=quiet) as bar:
        loss = train_denoiser(unet, text_encoder, tokenizer, vae, scheduler, unet_steps, seed, bar.advance)
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
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    minutes = (time.monotonic() - start) / 60
    atomic_write_text(
        marker,
        json.dumps(
            {
                "build": stamp,
                "vae_mse": vae_mse,
                "denoiser_loss": loss,
                "minutes": round(minutes, 2),
                "torch_threads": torch.get_num_threads(),
            },
            indent=1,
        )
        + "\n",
    )
    log(f"Toy base model built in {minutes:.1f} min (VAE MSE {vae_mse:.4f}, denoiser loss {loss:.4f}): {out}")
    return out

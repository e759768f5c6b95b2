"""Tiny Stable Diffusion 1.x-shaped pipelines, built in code, for the tests and benchmarks.

Real SD weights cannot be downloaded everywhere lorakit is developed and tested, so this module
builds a structurally faithful miniature: the same component classes (U-Net with cross-attention
transformer blocks and 1x1-conv projections, KL VAE, CLIP text encoder, byte-level BPE CLIP
tokenizer, DDPM scheduler with SD's beta schedule), only narrow and shallow. Everything lorakit
does to a real model (injection, export names, loading) it does identically to this one.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.toy.text import make_clip_tokenizer, make_text_encoder


def build_tiny_components(seed: int = 0, *, prediction_type: str = "epsilon", sample_size: int = 16) -> dict:
    """Build the components of a tiny SD 1.x pipeline, deterministically for `seed`.

    `prediction_type="v_prediction"` gives an SD 2.x-style base (linear transformer projections).
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    tokenizer, vocab = make_clip_tokenizer()
    sd2 = prediction_type == "v_prediction"
    torch.manual_seed(seed)
    text_encoder = make_text_encoder(vocab, 32, activation="gelu" if sd2 else "quick_gelu")
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=sd2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 4,
    )
    # A trained SD VAE's posterior is narrow (std ~ 0.01); a random one's is ~1, which would make every
    # encode a different picture. Pin the log-variance half of the posterior low, as training would.
    with torch.no_grad():
        channels = vae.config.latent_channels
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = -9.0
        # SD scales latents to unit variance (its 0.18215 is 1 / std of its VAE's latents); do the same here.
        images = torch.nn.functional.interpolate(
            torch.rand(8, 3, 4, 4) * 2 - 1, size=(sample_size * 4,) * 2, mode="bilinear"
        )
        spread = vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / spread, 4))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_tiny_pipeline(path: str | Path, seed: int = 0, *, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD 1.x-shaped pipeline in the diffusers folder layout and return its path."""
    from diffusers import StableDiffusionPipeline

    components = build_tiny_components(seed, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def save_in_dtype(base: str | Path, path: str | Path, dtype) -> Path:
    """The tiny SD pipeline at `base` saved again at `path` with its weights stored in `dtype` (a torch dtype)."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(base, dtype=dtype).save_pretrained(path)
    return Path(path)


def write_tiny_dataset(
    folder: str | Path,
    *,
    count: int = 8,
    resolution: int = 64,
    trigger: str = "ohwx",
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (80, 48), (48, 80)),
) -> Path:
    """Write `count` synthetic "photos" (a red disc on varied backgrounds) in the dataset folder layout.

    This is the layout `lorakit prepare` writes (DESIGN.md, "Dataset folder"); captions are
    tag lists without the trigger word, which training adds.
    """
    import hashlib
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    backgrounds = {"white": (235, 235, 235), "blue": (40, 70, 200), "green": (40, 160, 60), "black": (20, 20, 20)}
    rows = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        colour_name, colour = list(backgrounds.items())[index % len(backgrounds)]
        image = Image.new("RGB", (width, height), colour)
        radius = rng.randint(min(width, height) // 5, min(width, height) // 3)
        cx, cy = rng.randint(radius, width - radius), rng.randint(radius, height - radius)
        ImageDraw.Draw(image).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(220, 30, 30))
        name = f"images/{index:03d}.png"
        image.save(folder / name)
        rows.append(
            {
                "file_name": name,
                "text": f"toy, red, {colour_name} background",
                "width": width,
                "height": height,
                "original_width": width,
                "original_height": height,
                "crop_left": 0,
                "crop_top": 0,
                "source": f"generated/{index:03d}.png",
                "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
            }
        )
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    info = {
        "version": 1,
        "resolution": resolution,
        "buckets": [list(s) for s in dict.fromkeys(sizes)],
        "trigger": trigger,
    }
    (folder / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return folder


def captioned_copy(folder: Path, captions: list[str] | str, source: Path) -> Path:
    """A dataset folder reusing `source`'s images with other captions: one per row in order (rows past the list are
    left out), or one text for every row."""
    import shutil

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".cache"))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    captions = [captions] * len(rows) if isinstance(captions, str) else captions
    for row, caption in zip(rows, captions, strict=False):
        row["text"] = caption
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[: len(captions)]))
    return folder


def save_tiny_sdxl_pipeline(path: str | Path, seed: int = 0, *, prediction_type: str = "epsilon") -> Path:
    """A tiny SDXL-shaped pipeline: CLIP-L-like and bigG-like text encoders (the second with a pooled
    projection), a U-Net with SDXL's block layout (three levels, two layers each, text-time added embedding) and
    the tiny VAE, in the diffusers folder layout."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    base = build_tiny_components(seed, prediction_type=prediction_type)
    tokenizer, vocab = make_clip_tokenizer()
    torch.manual_seed(seed + 1)
    # Its own width, as in SDXL (768 and 1280): single-file readers tell the two encoders apart by it.
    text_encoder_2 = make_text_encoder(vocab, 48, activation="gelu", projection_dim=16)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=80,  # 32 (first encoder) + 48 (second)
        attention_head_dim=(2, 2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + 16,
    )
    pipe = StableDiffusionXLPipeline(
        vae=base["vae"],
        text_encoder=base["text_encoder"],
        text_encoder_2=text_encoder_2,
        tokenizer=base["tokenizer"],
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=base["scheduler"],
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path

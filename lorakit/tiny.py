"""Tiny Stable Diffusion 1.x-shaped pipelines, built in code, for tests, benchmarks and the demo.

Real SD weights cannot be downloaded everywhere lorakit is developed and tested, so this module
builds a structurally faithful miniature: the same component classes (U-Net with cross-attention
transformer blocks and 1x1-conv projections, KL VAE, CLIP text encoder, byte-level BPE CLIP
tokenizer, DDPM scheduler with SD's beta schedule), only narrow and shallow. Everything lorakit
does to a real model (injection, export names, loading) it does identically to this one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

# Words that get whole-word tokens, so that short captions stay short in tokens.
DEFAULT_WORDS = (
    "a photo of person man woman dog cat red green blue yellow black white hat shirt "
    "smiling standing sitting background studio outdoors portrait painting style object "
    "ohwx sks toy on the with in and"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_clip_vocab(words: tuple[str, ...] | list[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary: every byte (bare and word-final), whole-word merges, then bos/eos.

    The special tokens come last, as in the real CLIP vocabulary; their ids are what the text
    encoder's config must name as `bos_token_id` / `eos_token_id` / `pad_token_id`.
    """
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in dict.fromkeys(words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            rule = f"{merged} {symbol}"
            merged += symbol
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def make_clip_tokenizer(words: tuple[str, ...] | list[str] = DEFAULT_WORDS, model_max_length: int = 77):
    """A CLIPTokenizer loaded from a generated vocab.json / merges.txt; returns (tokenizer, vocab)."""
    from transformers import CLIPTokenizer

    vocab, merges = build_clip_vocab(words)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length), vocab


def make_text_encoder(
    vocab: dict[str, int], hidden: int, *, layers: int = 2, heads: int = 4, activation: str = "quick_gelu"
):
    """A small CLIPTextModel whose bos / eos / pad ids are the vocabulary's special tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = vocab["<|endoftext|>"]
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            projection_dim=hidden,
            hidden_act=activation,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )


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

"""GPU speed and memory of lorakit's training step against a bare forward/backward loop of the same model.

The model is the real SD 1.5 (or 2.1, or SDXL) architecture built from lorakit's shipped configs with random
weights (nothing is downloaded); the settings are those of `recipes/character.toml` for SD (LoRA rank 16 on
the transformer blocks and the text encoder, fp16 autocast, gradient checkpointing, 8-bit AdamW, cached
latents) and of `recipes/sdxl-character.toml` for SDXL (U-Net only with cached text embeddings, fp16 frozen
weights, 1024 px). "bare" is the floor any trainer pays: the same adapters, one fixed batch of latents and
token ids (or text embeddings, when the encoders are frozen), forward + backward + optimizer step; "lorakit" is
`lorakit.train.train` on a dataset of random photos. Run by hand or by gpu_check.sh:

    python benchmarks/gpu_speed.py --arch sd15 --resolution 512 --batch-sizes 1,4 --steps 20 --out table.md
    python benchmarks/gpu_speed.py --arch sdxl --resolution 1024 --batch-sizes 1 --steps 8 --out sdxl.md
    python benchmarks/gpu_speed.py --arch tiny --resolution 64 --batch-sizes 1 --steps 3 --device cpu   # smoke
    python benchmarks/gpu_speed.py --arch tiny-sdxl --resolution 64 --batch-sizes 1 --steps 3 --device cpu

Steady-state it/s excludes the first `--warmup` steps; peak VRAM is `torch.cuda.max_memory_allocated` of each
configuration (reset in between), so lorakit's includes loading the base and filling the latent and text caches
(the VAE and encoders at work); "steps' peak" is the training steps alone (lorakit resets the counter before its
first step and writes it to metrics.jsonl); peak reserved is what the allocator held (closer to nvidia-smi).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # lorakit and tests/ from a checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _is_sdxl(arch: str) -> bool:
    return arch in ("sdxl", "tiny-sdxl")


def write_base(arch: str, folder: Path, device: str) -> Path:
    """A diffusers folder of the architecture with random weights (the tokenizer's vocabulary is generated),
    initialised on `device` (SDXL has 3.5 billion parameters) and stored in float16."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from lorakit.architectures import CONFIGS, build_on_meta, component_config
    from lorakit.toy.text import make_clip_tokenizer

    if arch in ("tiny", "tiny-sdxl"):
        from tests.tiny import save_tiny_pipeline, save_tiny_sdxl_pipeline

        return (save_tiny_sdxl_pipeline if arch == "tiny-sdxl" else save_tiny_pipeline)(folder)
    torch.manual_seed(0)
    components = {}
    names = ("unet", "vae", "text_encoder", "text_encoder_2") if arch == "sdxl" else ("unet", "vae", "text_encoder")
    for name in names:
        module = build_on_meta(arch, name).to_empty(device=device)
        for param in module.parameters():
            torch.nn.init.normal_(param, std=0.02)
        components[name] = module.half()
    tokenizer, _ = make_clip_tokenizer()
    if arch == "sdxl":
        scheduler = EulerDiscreteScheduler.from_config(json.loads((CONFIGS / "sdxl" / "scheduler.json").read_text()))
        pipe = StableDiffusionXLPipeline(**components, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)
    else:
        scheduler = DDPMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            num_train_timesteps=1000,
            steps_offset=1,
            clip_sample=False,
            prediction_type="epsilon" if arch == "sd15" else "v_prediction",
        )
        assert component_config(arch, "unet")["cross_attention_dim"] == components["text_encoder"].config.hidden_size
        pipe = StableDiffusionPipeline(
            **components,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe, components
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def write_dataset(folder: Path, resolution: int, count: int) -> Path:
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        pixels = (torch.rand(resolution, resolution, 3, generator=generator) * 255).to(torch.uint8).numpy()
        name = f"images/photo{index}.png"
        Image.fromarray(pixels).save(folder / name)
        rows.append({"file_name": name, "text": "ohwx person, a photo", "width": resolution, "height": resolution})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _recipe(base: Path, dataset: Path, out: Path, args, batch: int, device: str, variant: str = "") -> dict:
    import tomllib

    from lorakit.recipe.validate import parse_override

    recipe = tomllib.loads(
        (RECIPES / ("sdxl-character.toml" if _is_sdxl(args.arch) else "character.toml")).read_text()
    )
    recipe["model"]["base"] = str(base)
    recipe["data"].update(folder=str(dataset), resolution=args.resolution, num_repeats=1)
    recipe["train"].update(
        max_steps=args.steps, batch_size=batch, gradient_accumulation_steps=1, log_every_steps=1, save_every_steps=0
    )
    if device == "cpu":  # the smoke run: no fp16 on a CPU, and keep it quick
        recipe["train"].update(mixed_precision="no", optimizer="adamw")
        recipe["model"]["weight_dtype"] = "float32"
    recipe["output"].update(folder=str(out), name="bench")
    for override in filter(None, variant.split(",")):  # e.g. "train.compile=true,train.allow_tf32=false"
        section, key, value = parse_override(override)
        recipe.setdefault(section, {})[key] = value
    return recipe


def run_lorakit(base: Path, dataset: Path, args, batch: int, device: str, variant: str = "") -> dict:
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as out:
        recipe = recipe_from_dict(_recipe(base, dataset, Path(out), args, batch, device, variant))
        result = train(recipe, quiet=True, log=lines.append)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["elapsed_s"] for r in rows]
    steady = (times[-1] - times[args.warmup - 1]) / (len(times) - args.warmup)
    said = [line for line in lines if line.startswith(("attention:", "train.", "U-Net weights"))]
    print("\n".join(f"  [{variant or 'default'}] {line}" for line in said), flush=True)
    steps_peak = rows[-1].get("max_memory_allocated_gib", float("nan"))  # reset after loading and caching
    return {
        "s_per_step": steady,
        "first_step_s": result.startup.get("first step", float("nan")),
        "steps_peak_gib": steps_peak,
        **_peaks(device),
    }


def run_bare(base: Path, args, batch: int, device: str) -> dict:
    """Forward + backward + optimizer step on one fixed batch: the same adapters and precision as lorakit."""
    from lorakit.adapters import freeze_except_lora, inject_lora, lora_parameters
    from lorakit.models import encode_prompts, load_base, tokenize
    from lorakit.optim import build_optimizer
    from lorakit.recipe import recipe_from_dict

    recipe = recipe_from_dict(_recipe(base, Path("."), Path("."), args, batch, device))
    cfg, lora = recipe.train, recipe.lora
    fp16 = cfg.mixed_precision == "fp16"
    model = load_base(str(base), weight_dtype=recipe.model.weight_dtype)  # the recipe's frozen weights, as lorakit
    trained = {"unet": model.unet}
    if lora.train_text_encoder:
        trained.update(zip(model.text_encoder_names, model.text_encoders, strict=True))
    for name, module in trained.items():
        inject_lora(
            module, name, rank=lora.rank, lora_alpha=lora.lora_alpha, dropout=0.0, target_modules=lora.target_modules
        )
        freeze_except_lora(module)
        for param in lora_parameters(module):
            param.data = param.data.float()
    for module in (model.unet, *model.text_encoders):
        module.to(device)
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    groups = [{"params": lora_parameters(m), "lr": 1e-4} for m in trained.values()]
    optimizer = build_optimizer(cfg, groups)
    scaler = torch.amp.GradScaler(device, enabled=fp16 and device == "cuda")
    latent = args.resolution // model.vae_scale_factor
    latents = torch.randn(batch, 4, latent, latent, device=device)
    ids = [t.to(device) for t in tokenize(model, ["ohwx person, a photo"] * batch)]
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    side = float(args.resolution)
    time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]] * batch, device=device)

    def conditioning() -> dict:
        with torch.autocast(device, dtype=torch.float16, enabled=fp16 and device == "cuda"):
            encoded = encode_prompts(model, ids)
        pooled = encoded.pop("pooled", None)
        if pooled is not None:
            encoded["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return encoded

    if not lora.train_text_encoder:  # frozen encoders: their outputs once, then they leave the GPU
        with torch.no_grad():
            fixed = conditioning()
        for module in model.text_encoders:
            module.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.float16, enabled=fp16 and device == "cuda"):
            kwargs = conditioning() if lora.train_text_encoder else fixed
            noise = torch.randn_like(latents)
            prediction = model.unet(latents + noise, timesteps, **kwargs).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = times[args.warmup :]
    peaks = _peaks(device)
    return {"s_per_step": sum(steady) / len(steady), "steps_peak_gib": peaks["peak_allocated_gib"], **peaks}


def _peaks(device: str) -> dict:
    if device != "cuda":
        return {"peak_allocated_gib": float("nan"), "peak_reserved_gib": float("nan")}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=["sd15", "sd21", "sdxl", "tiny", "tiny-sdxl"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="Also write the table (Markdown) here.")
    parser.add_argument(
        "--variants",
        default="",
        help="Also run lorakit with these recipe overrides, ';' between variants, ',' within one "
        "(e.g. 'train.allow_tf32=false;train.compile=true'); the table gets a row each.",
    )
    args = parser.parse_args()
    args.warmup = min(args.warmup, args.steps - 1)
    device = args.device
    header = (
        "| model | px | batch | loop | it/s | s/step | ratio to bare | first step s | steps' peak GiB "
        "| peak allocated GiB | peak reserved GiB |"
    )
    lines = [header, "|" + "---|" * 11]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        base = write_base(args.arch, Path(tmp) / "base", device)
        print(f"random-weight {args.arch} base written in {time.perf_counter() - started:.1f} s", flush=True)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            dataset = write_dataset(Path(tmp) / f"data{batch}", args.resolution, max(8, 2 * batch))
            bare = run_bare(base, args, batch, device)
            variants = ["", *filter(None, args.variants.split(";"))]
            for name in ["bare", *(f"lorakit {v}".strip() for v in variants)]:
                row = bare if name == "bare" else run_lorakit(base, dataset, args, batch, device, name[8:])
                lines.append(
                    f"| {args.arch} | {args.resolution} | {batch} | {name} | {1 / row['s_per_step']:.2f} | "
                    f"{row['s_per_step']:.3f} | {row['s_per_step'] / bare['s_per_step']:.2f} | "
                    f"{row.get('first_step_s', float('nan')):.1f} | {row['steps_peak_gib']:.2f} | "
                    f"{row['peak_allocated_gib']:.2f} | {row['peak_reserved_gib']:.2f} |"
                )
                print(lines[-1], flush=True)
                if args.out:  # row by row, so a run stopped at its time cap still leaves what it measured
                    args.out.write_text("\n".join(lines) + "\n")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()

"""Seconds per optimizer step and peak RSS: lorakit with and without latent caching vs a bare loop.

Run by hand (not part of the test suite):

    python benchmarks/train_speed.py [--base DIR|toy] [--steps 30] [--resolution 128] [--batch-size 2]

Each configuration runs in its own process, so its peak RSS is its own. Without `--base` a tiny
SD 1.x-shaped model is built. "bare" is the floor any trainer pays: LoRA on the same U-Net and
text encoder, one fixed batch of latents and token ids, forward + backward + AdamW step, nothing
else; "naive" is what the common example scripts do: load the images, encode them with the VAE and
tokenize the captions every step. Steady-state time per step excludes the first `--warmup` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The tiny test pipelines live in the test suite (tests/tiny.py): run from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _recipe(args, cache: bool, out: Path) -> dict:
    return {
        "model": {"base": args.base},
        "data": {"folder": args.dataset, "resolution": args.resolution},
        "lora": {"rank": args.rank, "lora_alpha": args.rank},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "optimizer": "adamw",
            "cache_latents": cache,
            "seed": 0,
        },
        "output": {"folder": str(out), "name": "bench"},
    }


def run_lorakit(args, cache: bool) -> dict:
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    with tempfile.TemporaryDirectory() as out:
        result = train(recipe_from_dict(_recipe(args, cache, Path(out))), quiet=True, log=lambda _: None)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    warm = rows[args.warmup - 1]["elapsed_s"]
    return {"s_per_step": (rows[-1]["elapsed_s"] - warm) / (len(rows) - args.warmup)}


def run_loop(args, naive: bool) -> dict:
    """The floor ("bare": one fixed batch of latents) or the common example-script loop ("naive": every step loads
    the images, encodes them with the VAE and tokenizes the captions)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from lorakit.adapters import inject_lora, lora_parameters
    from lorakit.data import load_items, load_pixels
    from lorakit.recipe import DataSection

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(args.base, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(args.base, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(args.base, subfolder="tokenizer")
    vae = AutoencoderKL.from_pretrained(args.base, subfolder="vae").requires_grad_(False)
    for component, module in (("unet", unet), ("text_encoder", text_encoder)):
        module.requires_grad_(False)
        inject_lora(module, component, rank=args.rank, lora_alpha=args.rank, dropout=0.0, target_modules="transformer")
    optimizer = torch.optim.AdamW(lora_parameters(unet) + lora_parameters(text_encoder), lr=1e-4)
    multiple = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)
    items = load_items(DataSection(folder=args.dataset, resolution=args.resolution), multiple)
    with torch.no_grad():
        fixed = vae.encode(torch.stack([load_pixels(items[0], False)] * args.batch_size)).latent_dist.mean
    fixed_ids = tokenizer([items[0].caption] * args.batch_size, padding="max_length", return_tensors="pt").input_ids
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        if naive:
            batch = [items[(step * args.batch_size + k) % len(items)] for k in range(args.batch_size)]
            with torch.no_grad():
                pixels = torch.stack([load_pixels(item, False) for item in batch])
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(
                [item.caption for item in batch], padding="max_length", truncation=True, return_tensors="pt"
            ).input_ids
        else:
            latents, ids = fixed, fixed_ids
        hidden = text_encoder(ids)[0]
        timesteps = torch.randint(0, 1000, (args.batch_size,))
        loss = torch.nn.functional.mse_loss(
            unet(latents, timesteps, encoder_hidden_states=hidden).sample, torch.randn_like(latents)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    steady = times[args.warmup :]
    return {"s_per_step": sum(steady) / len(steady)}


CONFIGURATIONS = (
    "bare forward/backward",
    "naive (VAE + tokenizer every step)",
    "lorakit (cached latents)",
    "lorakit (VAE every step)",
)


def child(args) -> None:
    result = {
        CONFIGURATIONS[0]: lambda: run_loop(args, naive=False),
        CONFIGURATIONS[1]: lambda: run_loop(args, naive=True),
        CONFIGURATIONS[2]: lambda: run_lorakit(args, True),
        CONFIGURATIONS[3]: lambda: run_lorakit(args, False),
    }[args.child]()
    result["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base",
        help="diffusers folder of the base model, or 'toy' for the toy base (default: build a tiny random one)",
    )
    parser.add_argument("--dataset", help="dataset folder (default: generated example photos)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.base == "toy":
            from lorakit.toy.build import build_toy_base

            args.base = str(build_toy_base(quiet=True, log=lambda _: None))
        elif args.base is None:
            from tests.tiny import save_tiny_pipeline

            args.base = str(save_tiny_pipeline(Path(tmp) / "base"))
        if args.dataset is None:
            from tests.tiny import write_tiny_dataset

            sizes = ((args.resolution, args.resolution),)
            args.dataset = str(write_tiny_dataset(Path(tmp) / "dataset", count=8, sizes=sizes))
        forwarded = [
            f"--base={args.base}",
            f"--dataset={args.dataset}",
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--resolution={args.resolution}",
            f"--batch-size={args.batch_size}",
            f"--rank={args.rank}",
        ]
        results = {}
        for name in CONFIGURATIONS:
            out = subprocess.run(
                [sys.executable, __file__, *forwarded, f"--child={name}"], capture_output=True, text=True, check=True
            ).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
    bare = results["bare forward/backward"]["s_per_step"]
    naive = results[CONFIGURATIONS[1]]["s_per_step"]
    print(f"{'configuration':<38}{'s/step':>9}{'vs bare':>9}{'vs naive':>10}{'peak RSS MiB':>14}")
    for name, row in results.items():
        print(
            f"{name:<38}{row['s_per_step']:>9.4f}{row['s_per_step'] / bare:>9.2f}{row['s_per_step'] / naive:>10.2f}"
            f"{row['peak_rss_mib']:>14.0f}"
        )
    print(
        json.dumps(
            {"steps": args.steps, "resolution": args.resolution, "batch_size": args.batch_size, "results": results}
        )
    )


if __name__ == "__main__":
    main()

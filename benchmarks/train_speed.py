"""Seconds per optimizer step, start-up, wall time and peak memory: lorakit against a bare loop and a naive one.

Run by hand (not part of the test suite), e.g. the two tables in the README:

    OMP_NUM_THREADS=1 python benchmarks/train_speed.py --base toy --resolution 16 --batch-size 8 --steps 40
    OMP_NUM_THREADS=1 python benchmarks/train_speed.py --resolution 128 --batch-size 8 --steps 30

Each configuration runs in its own process, so its peak RSS and wall time are its own. Without `--base` a
tiny SD 1.x-shaped model is built; `--base toy` uses the toy world's base (16 px is its own resolution).
"bare" is the floor any trainer pays: LoRA on the same U-Net (and text encoder, when it is trained), one
fixed batch of latents and token ids (or text embeddings, when the encoder is frozen), forward + backward +
AdamW step, nothing else; "naive" is what the common example scripts do: load the images, encode them with
the VAE and tokenize the captions every step. The steady step is the median after `--warmup` steps (one slow
step on a shared machine does not move it). The "one process" rows alternate lorakit's step and the bare step
on the very same modules in blocks of ten. "start-up" is lorakit's time from the end of imports to the first
step (model load, adapters, optimizer, cache check, accelerate); "imports only" is the floor every process
pays before it. Run with OMP_NUM_THREADS=1 on a 2-core machine: configurations run one after the other. On a
machine with CUDA every loop runs there (lorakit picks it by itself; the loops follow, with TF32 set as
lorakit's default sets it), and the table adds it/s and each configuration's peak VRAM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


def _device():
    """Where the loops run: CUDA when there is one (lorakit's own runs pick it too), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    if torch.cuda.get_device_capability()[0] >= 8:  # what lorakit's train.allow_tf32 default does, for fairness
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda")


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def _peak_vram_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _recipe(args, cache: bool, out: Path, text_encoder: bool) -> dict:
    return {
        "model": {"base": args.base},
        "data": {"folder": args.dataset, "resolution": args.resolution},
        "lora": {"rank": args.rank, "lora_alpha": args.rank, "train_text_encoder": text_encoder},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "optimizer": "adamw",
            "cache_latents": cache,
            "seed": 0,
        },
        "output": {"folder": str(out), "name": "bench"},
    }


def run_lorakit(args, cache: bool, text_encoder: bool) -> dict:
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    with tempfile.TemporaryDirectory() as out:
        recipe = recipe_from_dict(_recipe(args, cache, Path(out), text_encoder))
        result = train(recipe, quiet=True, log=lambda _: None)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [row["elapsed_s"] for row in rows]
    steps = [b - a for a, b in zip(elapsed[args.warmup - 1 :], elapsed[args.warmup :], strict=False)]
    startup = sum(v for k, v in result.startup.items() if k != "first step")
    return {"s_per_step": statistics.median(steps), "startup_s": startup}


def run_loop(args, naive: bool, trains_text: bool = True) -> dict:
    """The floor ("bare": one fixed batch of latents) or the common example-script loop ("naive": every step loads
    the images, encodes them with the VAE and tokenizes the captions)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from lorakit.adapters import inject_lora, lora_parameters
    from lorakit.data import load_items, load_pixels
    from lorakit.recipe import DataSection

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(args.base, subfolder="unet").requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(args.base, subfolder="text_encoder").requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(args.base, subfolder="tokenizer")
    vae = AutoencoderKL.from_pretrained(args.base, subfolder="vae").requires_grad_(False)
    adapted = [("unet", unet)] + ([("text_encoder", text_encoder)] if trains_text else [])
    for component, module in adapted:
        inject_lora(module, component, rank=args.rank, lora_alpha=args.rank, dropout=0.0, target_modules="transformer")
    device = _device()
    for module in (unet, text_encoder, vae):
        module.to(device)
    optimizer = torch.optim.AdamW([p for _, m in adapted for p in lora_parameters(m)], lr=1e-4)
    multiple = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)
    items = load_items(DataSection(folder=args.dataset, resolution=args.resolution), multiple)
    with torch.no_grad():
        pixels = torch.stack([load_pixels(items[0], False)] * args.batch_size).to(device)
        fixed = vae.encode(pixels).latent_dist.mean
    ids = tokenizer([items[0].caption] * args.batch_size, padding="max_length", return_tensors="pt").input_ids
    fixed_ids = ids.to(device)
    with torch.no_grad():
        fixed_hidden = text_encoder(fixed_ids)[0]
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        if naive:
            batch = [items[(step * args.batch_size + k) % len(items)] for k in range(args.batch_size)]
            with torch.no_grad():
                pixels = torch.stack([load_pixels(item, False) for item in batch]).to(device)
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(
                [item.caption for item in batch], padding="max_length", truncation=True, return_tensors="pt"
            ).input_ids.to(device)
        else:
            latents, ids = fixed, fixed_ids
        hidden = text_encoder(ids)[0] if trains_text or naive else fixed_hidden
        timesteps = torch.randint(0, 1000, (args.batch_size,), device=device)
        loss = torch.nn.functional.mse_loss(
            unet(latents, timesteps, encoder_hidden_states=hidden).sample, torch.randn_like(latents)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"s_per_step": statistics.median(times[args.warmup :])}


def run_interleaved(args, text_encoder: bool) -> dict:
    """lorakit's step and the bare step on the very same modules in one process, in alternating blocks of ten:
    the ratio without the process-to-process spread of a shared machine."""
    import torch

    from lorakit.models import tokenize
    from lorakit.recipe import recipe_from_dict
    from lorakit.train.loop import optimizer_step
    from lorakit.train.setup import set_up

    with tempfile.TemporaryDirectory() as out:
        settings = _recipe(args, True, Path(out), text_encoder)
        settings["train"]["max_steps"] = 10_000
        run = set_up(recipe_from_dict(settings), overwrite=False, resume=None, quiet=True, log=lambda _: None)
        unet, encoder = run.models["unet"], run.models.get("text_encoder", run.base.text_encoders[0])
        optimizer = torch.optim.AdamW([p for group in run.optimizer.param_groups for p in group["params"]], lr=1e-5)
        mean, _ = run.cache.get(0, False)
        device = run.device
        latents = torch.randn(args.batch_size, *mean.shape).to(device)
        ids = tokenize(run.base, [run.items[0].caption] * args.batch_size)[0].to(device)
        with torch.no_grad():
            fixed_hidden = encoder(ids)[0]

        def bare() -> None:
            hidden = encoder(ids)[0] if text_encoder else fixed_hidden
            timesteps = torch.randint(0, 1000, (args.batch_size,), device=device)
            prediction = unet(latents, timesteps, encoder_hidden_states=hidden).sample
            torch.nn.functional.mse_loss(prediction, torch.randn_like(latents)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times: dict[str, list[float]] = {"bare": [], "lorakit": []}
        for _name, step in (("bare", bare), ("lorakit", lambda: optimizer_step(run))) * (args.warmup // 2 + 1):
            step()  # warm both up
        for _ in range(max(2, args.steps // 10)):
            for name, step in (("bare", bare), ("lorakit", lambda: optimizer_step(run))):
                for _ in range(10):
                    started = time.perf_counter()
                    step()
                    _sync(device)
                    times[name].append(time.perf_counter() - started)
    bare_s, ours = statistics.median(times["bare"]), statistics.median(times["lorakit"])
    return {"s_per_step": ours, "bare_s_per_step": bare_s}


def run_imports() -> dict:
    """The floor every process pays: the ML stack's imports (timed in `child`)."""
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return {"s_per_step": float("nan")}


CONFIGURATIONS = {
    "bare, text encoder trained": lambda args: run_loop(args, naive=False, trains_text=True),
    "bare, text encoder frozen": lambda args: run_loop(args, naive=False, trains_text=False),
    "naive (VAE + tokenizer every step)": lambda args: run_loop(args, naive=True),
    "lorakit cached, text encoder trained": lambda args: run_lorakit(args, True, True),
    "lorakit cached, text encoder frozen": lambda args: run_lorakit(args, True, False),
    "lorakit VAE every step, text trained": lambda args: run_lorakit(args, False, True),
    "imports only": lambda args: run_imports(),
    "one process: lorakit / bare, TE trained": lambda args: run_interleaved(args, True),
    "one process: lorakit / bare, TE frozen": lambda args: run_interleaved(args, False),
}
BARE = {True: "bare, text encoder trained", False: "bare, text encoder frozen"}


def child(args) -> None:
    started = time.perf_counter()
    result = CONFIGURATIONS[args.child](args)
    result["peak_rss_mib"] = _peak_rss_mib()
    result["peak_vram_gib"] = _peak_vram_gib()
    result["in_process_s"] = time.perf_counter() - started
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
            began = time.perf_counter()
            out = subprocess.run(
                [sys.executable, __file__, *forwarded, f"--child={name}"], capture_output=True, text=True, check=True
            ).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
            results[name]["wall_s"] = time.perf_counter() - began
    naive = results["naive (VAE + tokenizer every step)"]["s_per_step"]
    header = (
        f"{'configuration':<40}{'s/step':>8}{'it/s':>7}{'vs bare':>9}{'vs naive':>9}{'start-up s':>11}{'wall s':>8}"
        f"{'RSS MiB':>9}{'VRAM GiB':>10}"
    )
    print(header)
    for name, row in results.items():
        bare = row.get("bare_s_per_step") or results[BARE["frozen" not in name]]["s_per_step"]
        startup = f"{row['startup_s']:.2f}" if "startup_s" in row else "-"
        print(
            f"{name:<40}{row['s_per_step']:>8.4f}{1 / row['s_per_step']:>7.2f}{row['s_per_step'] / bare:>9.2f}"
            f"{row['s_per_step'] / naive:>9.2f}{startup:>11}{row['wall_s']:>8.1f}{row['peak_rss_mib']:>9.0f}"
            f"{row.get('peak_vram_gib', float('nan')):>10.2f}"
        )
    print(
        json.dumps(
            {"steps": args.steps, "resolution": args.resolution, "batch_size": args.batch_size, "results": results}
        )
    )


if __name__ == "__main__":
    main()

"""Measured GPU memory per phase against `lorakit plan`'s estimate, on a fixed six-point grid: SD 1.5 at 512 px and
SDXL at 1024 px (random weights, the real architectures), gradient checkpointing off and on, batch 1 and 2; then
two more SDXL points, `model.weight_dtype = "float8"` and `train.full_bf16`, last so that a capped run keeps the six.

Each point is a short `lorakit train` (3 steps) of the shipped recipe with those settings; the loading-and-caching
peak comes from its log, the training steps' peak from metrics.jsonl, and both are compared with the plan.
Run by gpu_check.sh (step memory-grid) or by hand on a CUDA machine:

    python benchmarks/memory_grid.py --out memory-grid.md
    python benchmarks/memory_grid.py --device cpu --archs tiny    # the smoke run: the table, no measurements
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from gpu_speed import _recipe, write_base, write_dataset  # noqa: E402

FLOAT8 = 'model.weight_dtype="float8"'
FULL_BF16 = 'train.mixed_precision="bf16",model.weight_dtype="bfloat16",train.full_bf16=true'
GRID = {  # architecture -> (resolution, [(gradient checkpointing, batch, what changes from the recipe)])
    "sd15": (512, [(False, 1, ""), (True, 1, ""), (True, 2, "")]),
    "sdxl": (1024, [(False, 1, ""), (True, 1, ""), (True, 2, ""), (True, 1, FLOAT8), (True, 1, FULL_BF16)]),
    "tiny": (64, [(False, 1, ""), (True, 2, ""), (True, 1, FLOAT8), (True, 1, FULL_BF16)]),
}
LABELS = {"": "recipe", FLOAT8: "float8 weights", FULL_BF16: "full bf16"}


def run_point(
    base: Path,
    dataset: Path,
    arch: str,
    resolution: int,
    checkpointing: bool,
    batch: int,
    device: str,
    variant: str = "",
):
    from lorakit.memory import estimate
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    args = argparse.Namespace(arch=arch, resolution=resolution, steps=3)
    with tempfile.TemporaryDirectory() as out:
        raw = _recipe(base, dataset, Path(out), args, batch, device, variant)
        raw["train"]["gradient_checkpointing"] = checkpointing
        recipe = recipe_from_dict(raw)
        lines: list[str] = []
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        result = train(recipe, quiet=True, log=lines.append)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = rows[-1].get("max_memory_allocated_gib", float("nan"))
        caching = next(
            (float(m.group(1)) for line in lines if (m := re.search(r"GPU memory: ([\d.]+) GiB", line))), float("nan")
        )
        planned = estimate(recipe, "sdxl" if arch == "sdxl" else "sd15")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else float("nan")
    return {
        "caching": caching,
        "steps": steps,
        "reserved": reserved,
        "plan_caching": planned.phase_gib("latent caching"),
        "plan_steps": planned.phase_gib("training step"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="sd15,sdxl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = [
        "| model | px | GC | batch | settings | caching GiB (measured / plan) | training steps GiB (measured / plan) "
        "| peak reserved GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            resolution, points = GRID[arch]
            base = write_base(arch, Path(tmp) / arch, args.device)
            dataset = write_dataset(Path(tmp) / f"data-{arch}", resolution, 4)
            for checkpointing, batch, variant in points:
                row = run_point(base, dataset, arch, resolution, checkpointing, batch, args.device, variant)
                lines.append(
                    f"| {arch} | {resolution} | {'on' if checkpointing else 'off'} | {batch} | {LABELS[variant]} | "
                    f"{row['caching']:.2f} / {row['plan_caching']:.2f} | {row['steps']:.2f} / {row['plan_steps']:.2f} "
                    f"| {row['reserved']:.2f} |"
                )
                print(lines[-1], flush=True)
                if args.out:  # row by row: a run stopped at its cap keeps what it measured
                    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

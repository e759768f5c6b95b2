"""What `model.weight_dtype = "float8"` costs: seconds per training step against float32 weights, and how far the
stored base's noise prediction moves, with lorakit's per-channel scale and with a plain cast (kohya's fp8_base).

Run by hand (not part of the test suite), on the toy base (built once per machine, ~8 min):

    OMP_NUM_THREADS=1 python benchmarks/float8_speed.py --steps 40

Every run happens in this one process, one after the other, so the ratios share one machine state. A GPU runs
the dequantization as one elementwise kernel per layer; on a CPU it is a larger share of a step.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_steps import step_seconds, toy_base_and_dataset  # noqa: E402


def prediction_error(base: Path, size: int) -> dict[str, float]:
    """Relative L2 change of the toy U-Net's noise prediction once its weights are stored, per timestep."""
    import torch
    from diffusers import UNet2DConditionModel

    from lorakit.float8 import FLOAT8, KEPT_IN_UNET, store_in_float8

    full = UNet2DConditionModel.from_pretrained(base / "unet").requires_grad_(False)
    scaled = copy.deepcopy(full)
    store_in_float8(scaled, torch.float32, KEPT_IN_UNET)
    plain = copy.deepcopy(full)
    originals = {name: m.weight.detach().clone() for name, m in plain.named_modules() if hasattr(m, "weight")}
    store_in_float8(plain, torch.float32, KEPT_IN_UNET)
    for name, module in plain.named_modules():  # kohya's fp8_base: a plain cast, no scale
        if hasattr(module, "weight_scale"):
            module.weight = torch.nn.Parameter(originals[name].to(FLOAT8), requires_grad=False)
            module.weight_scale = torch.ones_like(module.weight_scale)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(8, full.config.in_channels, size // 8, size // 8, generator=generator)
    hidden = torch.randn(8, 77, full.config.cross_attention_dim, generator=generator)
    errors = {}
    with torch.no_grad():
        for t in (100, 500, 900):
            step = torch.full((8,), t)
            want = full(latents, step, encoder_hidden_states=hidden).sample
            for name, model in (("per-channel scale", scaled), ("plain cast", plain)):
                got = model(latents, step, encoder_hidden_states=hidden).sample
                errors[f"{name}, t={t}"] = ((got - want).norm() / want.norm()).item()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    from lorakit.recipe import recipe_from_dict
    from lorakit.toy.world import SIZE, TRIGGER
    from lorakit.train import train

    base, work = toy_base_and_dataset("float8-speed-")

    def run(name: str, weight_dtype: str, checkpointing: bool) -> float:
        recipe = {
            "model": {"base": str(base), "weight_dtype": weight_dtype},
            "data": {"folder": str(work / "dataset"), "resolution": SIZE, "trigger": TRIGGER},
            "lora": {"rank": 4, "lora_alpha": 4.0},
            "train": {
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "optimizer": "adamw",
                "save_every_steps": 0,
                "gradient_checkpointing": checkpointing,
            },
            "output": {"folder": str(work / "runs"), "name": name, "save_dtype": "float32", "log_with": []},
        }
        result = train(recipe_from_dict(recipe), overwrite=True, quiet=True, log=lambda _: None)
        return step_seconds(result.run_dir, args.warmup)

    print(
        f"toy base, {SIZE}x{SIZE}, batch {args.batch_size}, LoRA rank 4 (U-Net and text encoder), {args.steps} steps"
    )
    print("| gradient checkpointing | float32 s/step | float8 s/step | float8 / float32 |")
    print("|---|---|---|---|")
    for checkpointing in (False, True):
        full = run("float32", "float32", checkpointing)
        stored = run("float8", "float8", checkpointing)
        print(f"| {checkpointing} | {full:.4f} | {stored:.4f} | {stored / full:.2f} |")
    print()
    print("| toy U-Net noise prediction, relative L2 change against float32 | |")
    print("|---|---|")
    for name, error in prediction_error(Path(base), SIZE).items():
        print(f"| {name} | {error:.4f} |")


if __name__ == "__main__":
    main()

"""Seconds per step of a `[slider]` against a plain LoRA step on the same base, adapter, batch and resolution: the
check of `lorakit plan`'s slider work factor, 2 + 1 + (denoise_steps - 1) / 3 plain steps.

Run by hand (not part of the test suite), on the toy base (built once per machine, ~8 min):

    OMP_NUM_THREADS=1 python benchmarks/slider_speed.py --steps 40

Every run happens in this one process, one after the other, so the ratios share one machine state. The step time
is the mean of the differences of `metrics.jsonl`'s `elapsed_s` after `--warmup` steps (a mean, as an ETA
sums them: a slider step's cost varies with how many denoising steps made its latent).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_steps import step_seconds, toy_base_and_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--denoise-steps", type=int, nargs="+", default=[10, 20, 40])
    args = parser.parse_args()

    from lorakit.plan import slider_work
    from lorakit.recipe import recipe_from_dict
    from lorakit.toy.world import SIZE, TRIGGER
    from lorakit.train import train

    base, work = toy_base_and_dataset("slider-speed-")
    common = {
        "model": {"base": str(base)},
        "data": {"resolution": SIZE},
        "lora": {"rank": 4, "lora_alpha": 4.0, "train_text_encoder": False},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "optimizer": "adamw", "save_every_steps": 0},
        "output": {"folder": str(work / "runs"), "save_dtype": "float32", "log_with": []},
    }

    def run(name: str, **sections: dict) -> float:
        recipe = {key: dict(value) for key, value in common.items()}
        for section, values in sections.items():
            recipe.setdefault(section, {}).update(values)
        recipe["output"]["name"] = name
        result = train(recipe_from_dict(recipe), overwrite=True, quiet=True, log=lambda _: None)
        return step_seconds(result.run_dir, args.warmup)

    print(f"toy base, {SIZE}x{SIZE}, batch {args.batch_size}, LoRA rank 4 on the U-Net, {args.steps} steps")
    print("| gradient checkpointing | run | s/step | x plain | planner's factor |")
    print("|---|---|---|---|---|")
    for checkpointing in (False, True):
        train_keys = {"gradient_checkpointing": checkpointing}
        plain = run("plain", data={"folder": str(work / "dataset"), "trigger": TRIGGER}, train=train_keys)
        print(f"| {checkpointing} | plain LoRA | {plain:.4f} | 1.00 | 1.00 |")
        for steps in args.denoise_steps:
            section = {"positive": "black background", "negative": "white background", "denoise_steps": steps}
            seconds = run(f"slider-{steps}", slider=section, train=train_keys)
            sliding = {**common, "slider": section, "train": {**common["train"], **train_keys}}
            factor = slider_work(recipe_from_dict(sliding))
            print(
                f"| {checkpointing} | slider, denoise_steps {steps} | {seconds:.4f} | {seconds / plain:.2f} | "
                f"{factor:.2f} |"
            )


if __name__ == "__main__":
    main()

"""`lorakit demo`: the whole train path offline, on a tiny base model and generated example photos."""

from __future__ import annotations

from pathlib import Path

from .recipe import recipe_from_dict
from .tiny import save_tiny_pipeline, write_tiny_dataset
from .train import RunResult, train


def run_demo(out: Path, *, steps: int = 60, overwrite: bool = False, quiet: bool = False, log=print) -> RunResult:
    """Build (or reuse) `out/base` and `out/dataset`, then train `out/runs/demo/`."""
    out = Path(out)
    base = out / "base"
    if not (base / "model_index.json").is_file():
        log(f"Building a tiny offline base model in {base}")
        save_tiny_pipeline(base)
    dataset = out / "dataset"
    if not (dataset / "metadata.jsonl").is_file():
        log(f"Writing example photos in {dataset}")
        write_tiny_dataset(dataset)
    recipe = recipe_from_dict(
        {
            "model": {"base": str(base)},
            "data": {"folder": str(dataset), "resolution": 64, "trigger": "ohwx", "flip": True},
            "lora": {"rank": 8, "lora_alpha": 8},
            "train": {
                "max_steps": steps,
                "batch_size": 2,
                "unet_lr": 1e-3,
                "text_encoder_lr": 5e-4,
                "optimizer": "adamw8bit",
                "seed": 0,
            },
            "output": {"folder": str(out / "runs"), "name": "demo"},
        },
        source="lorakit demo",
    )
    return train(recipe, overwrite=overwrite, quiet=quiet, log=log)

"""What `train` says about speed on this machine, `--verbose` start-up phases, and the switches that change the
step (compile), on the CPU; the CUDA fast paths are in the GPU tier (tests/test_gpu.py)."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict, write_recipe


def test_verbose_prints_each_start_up_phase(tiny_base, tiny_dataset, tmp_path):
    path = tmp_path / "r.toml"
    write_recipe(path, make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 1}))
    result = CliRunner().invoke(app, ["train", str(path), "--verbose"])
    assert result.exit_code == 0, result.output
    for phase in ("load base model", "adapters and optimizer", "latent and text caches", "first step", "in all"):
        assert phase in result.output, phase
    assert "attention: U-Net AttnProcessor2_0, text encoder sdpa (scaled_dot_product_attention)" in result.output
    quiet = CliRunner().invoke(app, ["train", str(path), "--overwrite"])
    assert "load base model" not in quiet.output  # without --verbose, no phase table


def test_eight_bit_adamw_on_a_cpu_says_what_it_costs(tiny_base, tiny_dataset, tmp_path):
    lines: list[str] = []
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 1, "optimizer": "adamw8bit"})
    train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert any("adamw8bit on a CPU" in line and "6x AdamW's" in line for line in lines)


def test_a_run_tokenizes_each_distinct_caption_once(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    import lorakit.train.loop as loop

    calls: list[int] = []
    original = loop.tokenize
    monkeypatch.setattr(
        loop,
        "tokenize",
        lambda base, captions, length: calls.append(len(captions)) or original(base, captions, length),
    )
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 6, "batch_size": 2})
    train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    distinct = len({line for line in (tiny_dataset / "metadata.jsonl").read_text().splitlines()})
    assert sum(calls) <= distinct  # 12 captions drawn, each distinct one tokenized once


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler"
)
@pytest.mark.parametrize("weight_dtype", ["float32", "float8"])
def test_compiled_unet_trains_like_the_eager_one(tiny_base, tiny_dataset, tmp_path, weight_dtype):
    """The compiled U-Net computes the eager one's loss (the first step's, before any update: later steps drift
    apart as Adam normalises float-rounding differences) and trains on; float8 weights' autograd functions too."""
    import json
    import math

    losses = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        lines: list[str] = []
        recipe = make_recipe_dict(
            tiny_base,
            tiny_dataset,
            tmp_path / name,
            train={"max_steps": 2, "compile": compiled},
            model={"weight_dtype": weight_dtype},
        )
        result = train(recipe_from_dict(recipe), quiet=True, log=lines.append)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [row["loss"] for row in rows]
    assert any("the first step, which compiled the U-Net, took" in line for line in lines)
    assert math.isclose(losses["compiled"][0], losses["eager"][0], rel_tol=1e-4), losses
    assert all(math.isfinite(loss) for loss in losses["compiled"])

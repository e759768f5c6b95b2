"""Runs measured in epochs, saves at each epoch's end, the adapters saved along the way, and the schedule shapes
kohya users set (`max_train_epochs`, `save_every_n_epochs`, `lr_scheduler_num_cycles`, `lr_scheduler_power`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.errors import RecipeError
from lorakit.recipe import TrainSection, dump_recipe, recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict
from .invoke import fails, ok

# The tiny dataset: 8 images in buckets of 3, 3 and 2 at resolution 64; batch_size 2 gives 2 + 2 + 1 = 5 batches.


def _metadata(path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_max_epochs_sets_the_length_that_plan_also_predicts(tiny_base, tiny_dataset, tmp_path):
    from lorakit.plan import plan

    # 2 repeats: 6 + 6 + 4 images, 3 + 3 + 2 = 8 batches; 8 micro-batches in steps of 3 are 3 steps.
    sections = {"train": {"max_epochs": 1, "gradient_accumulation_steps": 3}, "data": {"num_repeats": 2}}
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, **sections)
    del recipe["train"]["max_steps"]
    planned = plan(recipe_from_dict(recipe), vram=8)
    assert (planned.steps, planned.steps_source) == (3, "train.max_epochs = 1, 8 batches per epoch")
    lines: list[str] = []
    result = train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert result.steps == 3
    assert "train.max_epochs: 1 epochs of 8 batches in steps of 3 are 3 steps" in lines
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == pytest.approx(9 / 8)  # the last step reached one batch into the next epoch
    assert _metadata(result.adapter)["ss_epoch"] == "1" and _metadata(result.adapter)["ss_num_epochs"] == "1"
    # The resolved recipe names both lengths, consistently: it loads and trains again without a conflict.
    resolved = (result.run_dir / "recipe.resolved.toml").read_text()
    assert "max_steps = 3" in resolved and "max_epochs = 1" in resolved


def test_a_max_steps_that_disagrees_with_max_epochs_is_refused(tiny_base, tiny_dataset, tmp_path):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 4, "max_epochs": 2})
    path = tmp_path / "recipe.toml"
    path.write_text(dump_recipe(recipe_from_dict(recipe)), encoding="utf-8")
    fails(
        ["train", str(path), "--quiet"],
        "train.max_steps = 4 disagrees with train.max_epochs = 2 (2 epochs of 5 batches are 10 steps for this "
        "dataset); remove one of them",
    )
    assert not (tmp_path / "out" / "run").exists()


def test_epoch_saves_write_checkpoints_and_adapters_that_equal_a_run_stopped_there(tiny_base, tiny_dataset, tmp_path):
    train_cfg = {"max_epochs": 3, "save_every_epochs": 1, "save_every_steps": 0}
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "epochs", train=train_cfg)
    del recipe["train"]["max_steps"]
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    run = result.run_dir
    assert result.steps == 15
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000005", "step-000010", "step-000015"]
    # One file per epoch before the last, in kohya's names; the last epoch is the final adapter itself.
    assert sorted(p.name for p in run.glob("run-*.safetensors")) == [
        "run-000001.safetensors",
        "run-000002.safetensors",
    ]
    first = run / "run-000001.safetensors"
    assert {k: _metadata(first)[k] for k in ("ss_epoch", "ss_steps")} == {"ss_epoch": "1", "ss_steps": "5"}
    # The epoch-1 file is exactly what a run of those 5 steps exports (constant schedule, same seed).
    short = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "short", train={"max_steps": 5})
    stopped = train(recipe_from_dict(short), quiet=True, log=lambda _: None)
    saved, expected = load_file(str(first)), load_file(str(stopped.adapter))
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key


def test_step_saves_write_adapters_unless_switched_off(tiny_base, tiny_dataset, tmp_path):
    settings = {"max_steps": 4, "save_every_steps": 2}
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "a", train=settings)
    run = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None).run_dir
    assert sorted(p.name for p in run.glob("*.safetensors")) == [
        "run-step00000002.safetensors",
        "run.diffusers.safetensors",
        "run.safetensors",
    ]
    ok(["inspect", str(run / "run-step00000002.safetensors")])
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "b", train=settings)
    recipe["output"]["intermediate_adapters"] = False
    run = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None).run_dir
    assert not list(run.glob("run-*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def _learning_rates(steps: int, **train_keys) -> list[float]:
    from lorakit.optim import build_lr_scheduler

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = build_lr_scheduler(TrainSection(max_steps=steps, **train_keys), optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_cosine_restarts_and_polynomial_power_shape_the_schedule():
    restarts = _learning_rates(10, lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2)
    assert restarts[0] == restarts[5] == 1.0  # back at the top halfway through
    assert restarts[4] < 0.1 and restarts[9] < 0.1
    assert _learning_rates(10, lr_scheduler="cosine_with_restarts")[5] == pytest.approx(0.5)  # 1 cycle: plain cosine
    squared = _learning_rates(10, lr_scheduler="polynomial", lr_scheduler_power=2.0)
    assert squared[5] == pytest.approx(0.5**2, abs=1e-6)
    assert _learning_rates(10, lr_scheduler="polynomial")[5] == pytest.approx(0.5, abs=1e-6)


def test_cosine_with_a_floor_and_warmup_stable_decay_follow_their_shapes():
    floor = _learning_rates(12, lr_scheduler="cosine_with_min_lr", lr_warmup_steps=2, lr_scheduler_min_lr_ratio=0.1)
    assert floor[:3] == [0.0, 0.5, 1.0]  # the warm-up, then the top
    # halfway down the cosine it is halfway between 1 and the floor, and it never goes below the floor
    assert floor[7] == pytest.approx(0.55) and min(floor[2:]) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(0.9 * math.pi))
    )
    assert all(a > b for a, b in zip(floor[2:-1], floor[3:], strict=True))
    wsd = _learning_rates(
        12, lr_scheduler="warmup_stable_decay", lr_warmup_steps=2, lr_decay_steps=4, lr_scheduler_min_lr_ratio=0.2
    )
    assert wsd[:8] == pytest.approx([0.2, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # up from the floor, then stable
    assert wsd[8:] == pytest.approx([0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    # transformers' schedules of those names (what kohya builds) give the same rates
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup, get_wsd_schedule

    # inverse_sqrt: up over the warm-up, then 1 / sqrt((step + timescale - warm-up) / timescale)
    inverse = _learning_rates(12, lr_scheduler="inverse_sqrt", lr_warmup_steps=2, lr_scheduler_timescale=4)
    assert inverse[:3] == [0.0, 0.5, 1.0] and inverse[6] == pytest.approx(1 / math.sqrt((6 + 4 - 2) / 4))
    by_warmup = _learning_rates(12, lr_scheduler="inverse_sqrt", lr_warmup_steps=2)  # the timescale is the warm-up
    from transformers.optimization import get_inverse_sqrt_schedule

    for ours, build in [
        (floor, lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, 2, 12, min_lr_rate=0.1)),
        (wsd, lambda o: get_wsd_schedule(o, 2, 4, num_stable_steps=6, min_lr_ratio=0.2)),
        (inverse, lambda o: get_inverse_sqrt_schedule(o, 2, timescale=4)),
        (by_warmup, lambda o: get_inverse_sqrt_schedule(o, 2)),
    ]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule, theirs = build(optimizer), []
        for _ in range(12):
            theirs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert ours == pytest.approx(theirs, abs=1e-9)


def test_a_resumed_run_continues_a_warmup_stable_decay_schedule(tiny_base, tiny_dataset, tmp_path):
    import shutil

    schedule = {"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 1, "lr_decay_steps": 3}
    sections = {"train": {"max_steps": 6, "save_every_steps": 3, "unet_lr": 1e-3, **schedule}}
    straight = train(
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "a", **sections)),
        quiet=True,
        log=lambda _: None,
    )
    rates = [json.loads(r)["lr_unet"] for r in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    # logged after each step: stable at the top after the 1-step warm-up, then down over the last 3
    assert rates[:3] == pytest.approx([1e-3] * 3) and rates[3] == pytest.approx(0.75e-3) and rates[5] == 0.0
    resumed_dir = tmp_path / "b" / "run"
    shutil.copytree(straight.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-000006")
    recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "b", **sections))
    resumed = train(recipe, resume="latest", quiet=True, log=lambda _: None)
    a, b = load_file(straight.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"lr_scheduler_num_cycles": 3},
            "train.lr_scheduler_num_cycles: only shapes lr_scheduler = 'cosine_with_restarts' (this recipe has "
            "'constant'); set that schedule or remove the key",
        ),
        (
            {"lr_scheduler": "cosine", "lr_scheduler_power": 2.0},
            "train.lr_scheduler_power: only shapes lr_scheduler = 'polynomial' (this recipe has 'cosine')",
        ),
        ({"max_epochs": 0}, "train.max_epochs: 0 is outside 1..100000"),
        ({"lr_scheduler": "cosine", "lr_scheduler_min_lr_ratio": 0.1}, "train.lr_scheduler_min_lr_ratio: only shapes"),
        ({"lr_decay_steps": 100}, "train.lr_decay_steps: only shapes lr_scheduler = 'warmup_stable_decay'"),
        ({"lr_scheduler_timescale": 100}, "train.lr_scheduler_timescale: only shapes lr_scheduler = 'inverse_sqrt'"),
        ({"lr_scheduler": "warmup_stable_decay"}, "train.lr_decay_steps: lr_scheduler = 'warmup_stable_decay' needs"),
    ],
)
def test_schedule_keys_the_schedule_ignores_are_refused(keys, message):
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({"model": {"base": "x/y"}, "train": keys})
    assert message in str(caught.value)


def test_plan_counts_epochs_before_the_dataset_is_prepared(tmp_path):
    from lorakit.plan import planned_steps

    recipe = recipe_from_dict(
        {"model": {"base": "x/y"}, "data": {"folder": str(tmp_path / "none")}, "train": {"max_epochs": 4}}
    )
    steps, source = planned_steps(recipe)
    assert steps == 4 * math.ceil(20 / 1)
    assert "20 images per epoch assumed (no prepared dataset)" in source


def test_samples_every_epoch_with_the_chosen_sampler(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    from PIL import Image

    import lorakit.train.images as images

    used = []
    real_render = images.render

    def render(pipe, prompts, seeds, settings, advance=None):
        used.append(type(pipe.scheduler).__name__)
        return real_render(pipe, prompts, seeds, settings, advance)

    monkeypatch.setattr(images, "render", render)
    recipe = make_recipe_dict(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_epochs": 2, "save_every_steps": 0},
        sample={"prompts": ["ohwx toy"], "every_epochs": 1, "steps": 2, "sampler": "dpmpp_2m"},
    )
    del recipe["train"]["max_steps"]
    run = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None).run_dir
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000005.png", "step-000010.png"]
    assert used == ["DPMSolverMultistepScheduler"] * 2
    with Image.open(run / "samples" / "step-000005.png") as grid:
        assert "Sampler: DPM++ 2M" in grid.text["parameters"]
    # Samples at epochs only: the step checkpoints do not add any.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000010"]

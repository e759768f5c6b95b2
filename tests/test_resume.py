"""Checkpoints and resume: an interrupted run continues exactly where the uninterrupted one went."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorakit.checkpoint import MANIFEST
from lorakit.cli import app
from lorakit.files import file_sha256
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import assert_same_tensors, make_recipe_dict, stopped_copy, write_recipe


def _train(base, dataset, out, resume=None, **sections):
    recipe = recipe_from_dict(make_recipe_dict(base, dataset, out, **sections))
    return train(recipe, resume=resume, quiet=True, log=lambda _: None)


@pytest.mark.parametrize(
    ("train_cfg", "lora_cfg"),
    [
        ({"lr_scheduler": "cosine", "lr_warmup_steps": 2}, {}),
        (
            {"optimizer": "adamw8bit", "gradient_accumulation_steps": 2},
            {"rank": 64, "lora_alpha": 32.0, "target_modules": "attention"},
        ),
        ({"ema_decay": 0.9}, {"use_dora": True}),
        ({"loraplus_lr_ratio": 16.0}, {}),
        ({}, {"type": "lokr", "rank": 2, "target_modules": "transformer+conv"}),
        ({"gradient_checkpointing": True}, {"rank": 4, "tlora_min_rank": 1}),
        (
            {"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 2},
            {"rank_dropout": 0.3, "module_dropout": 0.3},
        ),
        ({"optimizer": "adamw_schedulefree", "lr_warmup_steps": 2}, {}),
        (
            {"optimizer": "adamw8bit", "mixed_precision": "bf16", "full_bf16": True},
            {"rank": 64, "lora_alpha": 32.0, "target_modules": "attention"},
        ),
    ],
    ids=[
        "adamw-cosine",
        "adamw8bit-accumulation",
        "dora-ema",
        "loraplus",
        "lokr",
        "tlora-checkpointing",
        "restarts-rank-module-dropout",
        "schedulefree",
        "full-bf16-adamw8bit",
    ],
)
def test_half_then_resume_equals_straight(tiny_base, tiny_dataset, tmp_path, train_cfg, lora_cfg):
    settings = {"train": {"max_steps": 6, "save_every_steps": 3, **train_cfg}, "lora": lora_cfg}
    straight = _train(tiny_base, tiny_dataset, tmp_path / "a", **settings)
    if train_cfg.get("optimizer") == "adamw8bit":
        state = load_file(straight.run_dir / "checkpoints" / "step-000003" / "optimizer.safetensors")
        assert any(t.dtype == torch.uint8 for t in state.values())  # the 8-bit state is what gets restored
    if train_cfg.get("full_bf16"):  # the bfloat16 weights are what a checkpoint holds, and what resumes
        saved = load_file(straight.run_dir / "checkpoints" / "step-000003" / "adapter.safetensors")
        assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    checkpoint = stopped_copy(straight.run_dir, tmp_path / "b", 3)
    resumed_dir = checkpoint.parent.parent
    for name in ("run.safetensors", "run.diffusers.safetensors"):
        (resumed_dir / name).unlink(missing_ok=True)
    resumed = _train(tiny_base, tiny_dataset, tmp_path / "b", resume=str(checkpoint), **settings)
    assert resumed.steps == 6
    assert_same_tensors(straight.adapter, resumed.adapter)
    rows = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_step_count_is_cumulative_across_several_resumes(tiny_base, tiny_dataset, tmp_path):
    straight = _train(tiny_base, tiny_dataset, tmp_path / "a", train={"max_steps": 7})
    out = tmp_path / "b"
    _train(tiny_base, tiny_dataset, out, train={"max_steps": 2})
    _train(tiny_base, tiny_dataset, out, resume="latest", train={"max_steps": 5})
    final = _train(tiny_base, tiny_dataset, out, resume="latest", train={"max_steps": 7})
    assert final.steps == 7
    assert_same_tensors(straight.adapter, final.adapter)
    with open(final.adapter, "rb"):
        from safetensors import safe_open

        with safe_open(final.adapter, "pt") as f:
            assert f.metadata()["ss_steps"] == "7"
    rows = [json.loads(line)["step"] for line in (final.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 8))
    assert [p.name for p in (final.run_dir / "checkpoints").iterdir()] != []


def test_a_checkpoint_from_an_older_lorakit_resumes(tiny_base, tiny_dataset, tmp_path):
    """Keys a later lorakit added are not in an older checkpoint's recipe; that lorakit ran as their defaults do,
    so a resume goes on (even for keys a resume must not change) instead of reporting them as changed."""
    straight = _train(tiny_base, tiny_dataset, tmp_path / "a", train={"max_steps": 4, "save_every_steps": 2})
    out = tmp_path / "b"
    first = _train(tiny_base, tiny_dataset, out, train={"max_steps": 2, "save_every_steps": 2})
    state_path = first.run_dir / "checkpoints" / "step-000002" / "state.json"
    state = json.loads(state_path.read_text())
    for section, key in [
        ("train", "block_lr_zero_threshold"),
        ("train", "v_pred_like_loss"),
        ("data", "secondary_separator"),
    ]:
        del state["recipe"][section][key]  # as the lorakit before them wrote it
    state_path.write_text(json.dumps(state, indent=1))
    manifest_path = state_path.parent / MANIFEST  # the edited file's new size and hash, as a save records them
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["state.json"] = {"bytes": state_path.stat().st_size, "sha256": file_sha256(state_path)}
    manifest_path.write_text(json.dumps(manifest))
    lines: list[str] = []
    recipe = recipe_from_dict(
        make_recipe_dict(tiny_base, tiny_dataset, out, train={"max_steps": 4, "save_every_steps": 2})
    )
    final = train(recipe, resume="latest", quiet=True, log=lines.append)
    said = " ".join(line for line in lines if "changed from" in line)
    assert final.steps == 4 and "max_steps" in said  # the one change this resume makes is said
    assert not any(key in said for key in ("block_lr_zero_threshold", "v_pred_like_loss", "secondary_separator"))
    assert_same_tensors(straight.adapter, final.adapter)


def test_checkpoints_are_pruned_to_the_newest(tiny_base, tiny_dataset, tmp_path):
    result = _train(
        tiny_base, tiny_dataset, tmp_path, train={"max_steps": 5, "save_every_steps": 1, "keep_checkpoints": 2}
    )
    names = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000005"]


def test_resume_errors_are_one_line(tiny_base, tiny_dataset, tmp_path):
    runner = CliRunner()
    recipe = write_recipe(tmp_path / "r.toml", make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out"))
    missing = runner.invoke(app, ["train", str(recipe), "--resume", "latest"])
    assert missing.exit_code == 2 and "has no checkpoints" in missing.stderr
    assert runner.invoke(app, ["train", str(recipe), "-q", "--set", "train.max_steps=2"]).exit_code == 0
    changed = runner.invoke(app, ["train", str(recipe), "--resume", "latest", "--set", "lora.rank=8"])
    assert changed.exit_code == 2
    assert "lora.rank changed from 4 to 8 since the checkpoint" in changed.stderr
    bogus = runner.invoke(app, ["train", str(recipe), "--resume", str(tmp_path)])
    assert bogus.exit_code == 2 and "is not a checkpoint folder" in bogus.stderr
    extended = runner.invoke(app, ["train", str(recipe), "--resume", "latest", "--set", "train.max_steps=3", "-q"])
    assert extended.exit_code == 0, extended.output


def test_ema_weights_are_exported_instead_of_the_raw_ones(tiny_base, tiny_dataset, tmp_path):
    result = _train(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 4, "ema_decay": 0.9})
    ema = load_file(result.run_dir / "checkpoints" / "step-000004" / "ema.safetensors")
    exported = load_file(result.diffusers_adapter)
    raw = dict(result.models["unet"].named_parameters())
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight"
    file_key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    assert torch.equal(exported[file_key], ema[f"unet.{name}"])
    assert not torch.equal(exported[file_key], raw[name].detach())


def test_schedule_free_saves_its_average_and_samples_leave_its_steps_alone(
    tiny_base, tiny_dataset, tmp_path, monkeypatch
):
    """Schedule-free AdamW steps at y and is meant to be used at its average x = y + (1 - 1/beta1)(z - y): the
    adapter saved is x, and samples and validation in the middle of the run (drawn with x) put y back exactly, so
    the run with them ends where the run without them does."""
    import lorakit.train.setup as setup

    built = []
    real = setup.build_optimizer
    monkeypatch.setattr(setup, "build_optimizer", lambda cfg, groups: built.append(real(cfg, groups)) or built[-1])
    train_cfg = {"max_steps": 4, "optimizer": "adamw_schedulefree", "lr_warmup_steps": 2, "unet_lr": 1e-3}
    plain = _train(tiny_base, tiny_dataset, tmp_path / "a", train=train_cfg)
    watched = _train(
        tiny_base,
        tiny_dataset,
        tmp_path / "b",
        train=train_cfg,
        sample={"prompts": ["ohwx toy"], "every_steps": 2, "steps": 2},
        validation={"folder": str(tiny_dataset), "every_steps": 1},
    )
    assert len(list((watched.run_dir / "samples").rglob("*.png"))) == 2
    rows = [json.loads(line) for line in (watched.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("val_loss" in row for row in rows)
    assert_same_tensors(plain.adapter, watched.adapter)
    optimizer = built[-1]
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight"
    y = dict(watched.models["unet"].named_parameters())[name].detach()
    z = optimizer.state[dict(watched.models["unet"].named_parameters())[name]]["z"]
    exported = load_file(watched.diffusers_adapter)["unet." + name.replace(".default", "")]
    assert torch.equal(exported, torch.lerp(y, z, 1 - 1 / 0.9))
    assert not torch.allclose(exported, y)


def test_save_every_minutes_writes_a_checkpoint_alone_whenever_that_time_has_passed(
    tiny_base, tiny_dataset, tmp_path, monkeypatch
):
    """Every step takes 70 s on a test clock and the recipe asks for a backup every 2 minutes: steps 2 and 4 get a
    checkpoint (no intermediate adapter, no samples), and the run's end its usual one."""
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import loop, train

    clock = [0.0]
    monkeypatch.setattr(loop, "now", lambda: clock[0])
    real_step = loop.optimizer_step

    def slow_step(run):
        clock[0] += 70
        return real_step(run)

    monkeypatch.setattr(loop, "optimizer_step", slow_step)
    sections = {
        "train": {"max_steps": 5, "save_every_steps": 0, "save_every_minutes": 2, "keep_checkpoints": 10},
        "sample": {"prompts": ["ohwx toy"], "steps": 2},
    }
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", **sections)
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    checkpoints = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000004", "step-000005"]
    assert not list(result.run_dir.glob("run-*.safetensors"))  # no intermediate adapters
    assert [p.name for p in (result.run_dir / "samples").iterdir()] == ["step-000005.png"]

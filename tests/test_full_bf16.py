"""`train.full_bf16` (sd-scripts' full_bf16): the trained tensors and their gradients are bfloat16, with every
optimizer as training builds it; the run learns as a float32 adapter does and exports an ordinary adapter."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.checkpoint import check_resumable
from lorakit.errors import OutputError, RecipeError
from lorakit.memory import checkpoint_bytes
from lorakit.recipe import recipe_from_dict, recipe_to_dict
from lorakit.train import train

from .conftest import make_recipe_dict

SECTIONS = {
    "train": {
        "max_steps": 30,
        "unet_lr": 3e-3,
        "text_encoder_lr": 1e-3,
        "optimizer": "adamw",
        "mixed_precision": "bf16",
        "save_every_steps": 15,
    },
    "lora": {"rank": 8},
}


def _train(base, dataset, out, **sections):
    lines: list[str] = []
    recipe = recipe_from_dict(make_recipe_dict(base, dataset, out, **sections))
    return train(recipe, quiet=True, log=lines.append), lines


def _val_loss(result) -> float:
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["val_loss"] for row in rows if "val_loss" in row][-1]


def test_full_bf16_trains_bfloat16_tensors_that_learn_as_float32_ones_do(tiny_base, tiny_dataset, tmp_path):
    """The same bf16-autocast run with a float32 and a bfloat16 adapter: the held-out loss falls as far, the
    checkpoints hold bfloat16 weights and AdamW state, and the exported adapter is the trained one in save_dtype."""
    validation = {"folder": str(tiny_dataset), "every_steps": 30, "timesteps": [300, 600]}
    full, _ = _train(tiny_base, tiny_dataset, tmp_path / "full", validation=validation, **SECTIONS)
    half_sections = {**SECTIONS, "train": {**SECTIONS["train"], "full_bf16": True}}
    half, lines = _train(tiny_base, tiny_dataset, tmp_path / "half", validation=validation, **half_sections)
    said = [line for line in lines if line.startswith("train.full_bf16:")]
    assert len(said) == 1 and "trained tensors and their gradients are bfloat16" in said[0], lines
    assert "adamw's own state is bfloat16 too" in said[0]
    for name in ("unet", "text_encoder"):
        assert {p.dtype for p in half.models[name].parameters() if p.requires_grad} == {torch.bfloat16}
        assert {p.dtype for p in half.models[name].parameters() if not p.requires_grad} == {torch.float32}
    checkpoint = half.run_dir / "checkpoints" / "step-000030"
    assert {t.dtype for t in load_file(checkpoint / "adapter.safetensors").values()} == {torch.bfloat16}
    moments = {k: t for k, t in load_file(checkpoint / "optimizer.safetensors").items() if "exp_avg" in k}
    assert moments and {t.dtype for t in moments.values()} == {torch.bfloat16}
    # the disk estimate counts what each checkpoint holds: weights and AdamW's two moments, bfloat16 or float32
    for result, bf16 in ((full, False), (half, True)):
        folder = result.run_dir / "checkpoints" / "step-000030"
        held = [t for n in ("adapter", "optimizer") for k, t in load_file(folder / f"{n}.safetensors").items()]
        held = [t for t in held if t.dim() and t.dtype != torch.uint8]  # not the step counts, not the RNG state
        recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, **half_sections))
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, full_bf16=bf16))
        sizes = [t.numel() for k, t in load_file(folder / "adapter.safetensors").items()]
        assert sum(t.numel() * t.element_size() for t in held) == checkpoint_bytes(recipe, sizes)
    start = _val_loss(
        _train(
            tiny_base,
            tiny_dataset,
            tmp_path / "none",
            validation={**validation, "every_steps": 1},
            **{**SECTIONS, "train": {**SECTIONS["train"], "max_steps": 1, "unet_lr": 0.0, "text_encoder_lr": 0.0}},
        )[0]
    )
    trained_full, trained_half = _val_loss(full), _val_loss(half)
    assert trained_full < 0.8 * start, (start, trained_full)
    assert trained_half < 0.8 * start and abs(trained_half - trained_full) < 0.1 * (start - trained_full)
    # the exported float32 file holds the bfloat16 weights exactly (the kohya layout's names, as a float32 run's)
    exported = load_file(str(half.adapter))
    assert exported.keys() == load_file(str(full.adapter)).keys()
    trained = {k: t for k, t in load_file(checkpoint / "adapter.safetensors").items()}
    assert sum(t.numel() for t in trained.values()) == sum(t.numel() for k, t in exported.items() if "alpha" not in k)
    assert all(t.dtype == torch.float32 for t in exported.values())


def test_full_bf16_exports_adapters_that_reload_in_diffusers_as_trained(tiny_base, tiny_dataset, tmp_path):
    """The file holds the trained bfloat16 values exactly: diffusers computes with it what the trained model computes
    with the same values in float32 and without the run's bf16 autocast (which accelerate wrapped its forward in)."""
    from accelerate.utils import extract_model_from_parallel
    from diffusers import StableDiffusionPipeline

    from .test_export import _outputs

    sections = {**SECTIONS, "train": {**SECTIONS["train"], "max_steps": 4, "full_bf16": True}}
    result, _ = _train(tiny_base, tiny_dataset, tmp_path, **sections)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    base = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    models = {k: extract_model_from_parallel(m, keep_fp32_wrapper=False) for k, m in result.models.items()}
    for module in models.values():
        module.eval()
        for p in module.parameters():
            if p.requires_grad:
                assert p.dtype == torch.bfloat16
                p.data = p.data.float()
    trained = _outputs(models["unet"], models["text_encoder"], pipe.tokenizer)
    pipe.load_lora_weights(str(result.adapter))
    loaded = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    for got, want, original in zip(loaded, trained, base, strict=True):
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
        assert (want - original).abs().max() > 1e-3  # the adapter really changes the model


def test_full_bf16_needs_bf16_autocast_and_a_resume_keeps_it(tiny_base, tiny_dataset, tmp_path):
    for precision in ("no", "fp16"):
        refused = f'train.full_bf16: needs train.mixed_precision = "bf16" \\(it is "{precision}"\\)'
        with pytest.raises(RecipeError, match=refused):
            recipe_from_dict(
                make_recipe_dict(
                    tiny_base, tiny_dataset, tmp_path, train={"full_bf16": True, "mixed_precision": precision}
                )
            )
    half = recipe_from_dict(
        make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"full_bf16": True, "mixed_precision": "bf16"})
    )
    full = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"mixed_precision": "bf16"}))
    with pytest.raises(OutputError, match="--resume: train.full_bf16 changed from True to False since the checkpoint"):
        check_resumable(recipe_to_dict(half), full, lambda _: None)

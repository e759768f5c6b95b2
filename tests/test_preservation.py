"""[preservation] (differential output preservation): each caption also trains with its trigger replaced by the
class word, towards what the base without the adapter predicts; the adapter then moves the class word less."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lorakit.errors import RecipeError
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict

PROMPT = "toy, red, white background"  # a tiny-dataset caption without its trigger: the class prompt


def _train(base, dataset, out, **sections):
    lines: list[str] = []
    recipe = recipe_from_dict(make_recipe_dict(base, dataset, out, **sections))
    return train(recipe, quiet=True, log=lines.append), lines


def _class_drift(result, base) -> float:
    """How far the trained adapter moves the U-Net's prediction for the class prompt on fixed noisy latents, from
    the base's (the adapters switched off), as a mean absolute difference."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from lorakit.adapters import adapters_disabled

    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    ids = tokenizer([PROMPT] * 4, padding="max_length", return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(7)
    unet = result.models["unet"].eval()
    with torch.no_grad():
        states = encoder(ids)[0]
        noisy = torch.randn(4, unet.config.in_channels, 8, 8, generator=generator)
        timesteps = torch.tensor([100, 300, 600, 900])
        with_adapter = unet(noisy, timesteps, encoder_hidden_states=states).sample
        with adapters_disabled(unet):
            without = unet(noisy, timesteps, encoder_hidden_states=states).sample
    return (with_adapter - without).abs().mean().item()


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_preservation_keeps_the_class_prompt_nearer_the_base(tiny_base, tiny_dataset, tmp_path, train_text_encoder):
    settings = {
        "train": {"max_steps": 6, "unet_lr": 1e-2, "text_encoder_lr": 1e-2},
        "lora": {"train_text_encoder": train_text_encoder},
    }
    plain, _ = _train(tiny_base, tiny_dataset, tmp_path / "plain", **settings)
    preservation = {"class_word": "toy", "weight": 4.0}
    kept, lines = _train(tiny_base, tiny_dataset, tmp_path / "kept", preservation=preservation, **settings)
    said = next(line for line in lines if line.startswith("preservation:"))
    assert "8 of 8 captions name 'ohwx'" in said and "'toy, toy, red, white background'" in said
    assert any("cached for" in line for line in lines) == (not train_text_encoder)  # class captions in the cache
    rows = [json.loads(line) for line in (kept.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < row["preservation_loss"] < row["loss"] for row in rows)  # its weighted share of the loss
    assert "preservation_loss" not in (plain.run_dir / "metrics.jsonl").read_text()
    drift_plain, drift_kept = _class_drift(plain, tiny_base), _class_drift(kept, tiny_base)
    assert drift_kept < 0.7 * drift_plain, (drift_kept, drift_plain)


def test_adapters_disabled_is_the_base_and_leaves_what_trains_as_it_was(tiny_base, tiny_dataset, tmp_path):
    from diffusers import UNet2DConditionModel

    from lorakit.adapters import adapters_disabled

    result, _ = _train(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 2, "unet_lr": 1e-2})
    unet = result.models["unet"].eval()
    fresh = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").eval()
    inputs = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]))
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    with torch.no_grad():
        with adapters_disabled(unet):
            off = unet(*inputs, encoder_hidden_states=states).sample
        on = unet(*inputs, encoder_hidden_states=states).sample
        base = fresh(*inputs, encoder_hidden_states=states).sample
    torch.testing.assert_close(off, base)
    assert not torch.allclose(on, base)
    assert {name for name, p in unet.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"data": {"trigger": ""}}, "preservation.class_word: replaces data.trigger in each caption, and the recipe"),
        ({"data": {"trigger": "Toy"}}, "preservation.class_word: 'toy' holds data.trigger 'Toy'"),
        (
            {"preservation": {"class_word": "ohwx toy"}},
            "preservation.class_word: 'ohwx toy' holds data.trigger 'ohwx'",
        ),
        ({"preservation": {"class_word": "toy", "weight": -1}}, "preservation.weight"),
    ],
)
def test_preservation_that_cannot_work_is_refused(tiny_base, tiny_dataset, tmp_path, sections, fragment):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, preservation={"class_word": "toy"})
    for section, values in sections.items():
        recipe[section].update(values)
    with pytest.raises(RecipeError, match=fragment.replace("(", r"\(")):
        recipe_from_dict(recipe)


def test_the_plan_counts_twice_the_activations(tmp_path):
    from lorakit.memory import estimate

    recipe = {"model": {"base": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, "data": {"trigger": "ohwx man"}}
    plain = estimate(recipe_from_dict(recipe))
    kept = estimate(recipe_from_dict({**recipe, "preservation": {"class_word": "man"}}))

    def activations(result):
        return next(p.gib for p in result.parts if p.name.startswith("activations"))

    assert activations(kept) == pytest.approx(2 * activations(plain))
    assert any("x2 ([preservation])" in p.name for p in kept.parts)


def test_weight_zero_turns_preservation_off_and_fit_offers_it(tiny_base, tiny_dataset, tmp_path):
    """preservation.weight = 0 trains exactly as a recipe without the section (no doubled batch), and `plan --fit`
    sets it when the doubled activations are what does not fit."""
    from safetensors.torch import load_file

    from lorakit.memory import estimate
    from lorakit.plan import fit, plan

    plain, _ = _train(tiny_base, tiny_dataset, tmp_path / "plain", train={"max_steps": 2})
    off, lines = _train(
        tiny_base,
        tiny_dataset,
        tmp_path / "off",
        train={"max_steps": 2},
        preservation={"class_word": "toy", "weight": 0},
    )
    assert "preservation.weight = 0: output preservation is off" in lines
    ours, theirs = load_file(off.adapter), load_file(plain.adapter)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    kept = recipe_from_dict(
        {  # float8 weights already: --fit has nothing cheaper left to offer than preservation's own
            "model": {"base": "stabilityai/stable-diffusion-xl-base-1.0", "weight_dtype": "float8"},
            "data": {"trigger": "ohwx man"},
            "train": {"gradient_checkpointing": True, "mixed_precision": "fp16", "optimizer": "adamw8bit"},
            "preservation": {"class_word": "man"},
        }
    )
    before = plan(kept, arch="sdxl")
    off_recipe = dataclasses.replace(kept, preservation=dataclasses.replace(kept.preservation, weight=0.0))
    assert estimate(off_recipe, "sdxl").allocated_gib < before.memory.allocated_gib  # not doubled when off
    found = fit(before, before.memory.process_gib / 0.95 - 0.1)  # just too small for the doubled batch
    assert [key for key, *_ in found.changes] == ["preservation.weight"] and found.recipe.preservation.weight == 0

"""DoRA: trained with peft's use_dora, saved in the diffusers layout, reloaded and merged exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict
from .invoke import sd_pipeline as _pipe

runner = CliRunner()
CONV = "down_blocks.0.resnets.0.conv1"
LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def dora_run(tiny_base, tiny_dataset, tmp_path_factory):
    recipe = make_recipe_dict(
        tiny_base,
        tiny_dataset,
        tmp_path_factory.mktemp("dora"),
        lora={"use_dora": True, "target_modules": "transformer+conv", "conv_rank": 2},
        train={"max_steps": 3, "unet_lr": 1e-2, "text_encoder_lr": 1e-2},
    )
    return train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)


def _outputs(unet, text_encoder, tokenizer):
    ids = tokenizer(["ohwx toy, red"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        return hidden, unet(latents, torch.tensor([400]), encoder_hidden_states=hidden).sample


def test_dora_run_writes_the_diffusers_layout_with_trained_magnitudes(dora_run, tiny_base):
    assert dora_run.adapter == dora_run.diffusers_adapter
    assert not (dora_run.run_dir / "run.safetensors").exists()  # no kohya file: its loaders decompose differently
    with safe_open(str(dora_run.adapter), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        magnitude = f.get_tensor(f"unet.{LINEAR}.lora_magnitude_vector.weight")
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.use_dora"] is True and config["text_encoder.use_dora"] is True
    assert f"unet.{CONV}.lora_magnitude_vector.weight" in keys
    assert sum(k.endswith("lora_magnitude_vector.weight") for k in keys) == sum(
        k.endswith("lora_A.weight") for k in keys
    )
    base_weight = dict(_pipe(tiny_base).unet.named_modules())[LINEAR].weight
    # peft starts each magnitude at the row norms of the base weight; three steps at lr 1e-2 move them.
    assert (magnitude - base_weight.norm(dim=1)).abs().max() > 1e-3


def test_dora_adapter_reloads_in_diffusers_and_merges_into_the_base_exactly(dora_run, tiny_base, tmp_path):
    pipe = _pipe(tiny_base)
    models = dora_run.models
    trained = _outputs(models["unet"].eval(), models["text_encoder"].eval(), pipe.tokenizer)
    original = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    pipe.load_lora_weights(str(dora_run.adapter))
    assert pipe.unet.peft_config["default_0"].use_dora
    merged_out = tmp_path / "merged"
    result = runner.invoke(
        app, ["merge", "--lora", str(dora_run.adapter), "--base", str(tiny_base), "--out", str(merged_out)]
    )
    assert result.exit_code == 0, result.output
    merged = _pipe(merged_out)
    for loaded in (
        _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer),
        _outputs(merged.unet, merged.text_encoder, merged.tokenizer),
    ):
        for got, want, before in zip(loaded, trained, original, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert (want - before).abs().max() > 1e-3


def test_dora_renders_through_generate_from_the_run_folder(dora_run, tiny_base, tmp_path):
    args = ["generate", "a toy", "--base", str(tiny_base), "--steps", "2", "--size", "64x64", "-q"]
    plain = runner.invoke(app, [*args, "--out", str(tmp_path / "plain")])
    adapted = runner.invoke(app, [*args, "--lora", str(dora_run.run_dir), "--out", str(tmp_path / "dora")])
    assert plain.exit_code == 0 and adapted.exit_code == 0, adapted.output
    from PIL import Image

    (first,), (second,) = (
        [p for p in (tmp_path / name).glob("*.png") if p.name != "grid.png"] for name in ("plain", "dora")
    )
    assert Image.open(first).tobytes() != Image.open(second).tobytes()


def test_dora_refuses_what_cannot_be_exact(dora_run, tiny_base, tiny_dataset, tmp_path):
    for args, fragment in (
        (
            ["convert", str(dora_run.adapter), "--to", "kohya", "--out", str(tmp_path / "k.safetensors")],
            "no kohya layout",
        ),
        (
            ["resize", str(dora_run.adapter), "--rank", "2", "--out", str(tmp_path / "r.safetensors")],
            "cannot be resized",
        ),
        (["merge", "--lora", str(dora_run.adapter), "--out", str(tmp_path / "m.safetensors")], "merge it into a base"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.output, result.output
    assert not any(tmp_path.iterdir())
    shown = runner.invoke(app, ["inspect", str(dora_run.adapter)])
    assert shown.exit_code == 0 and "unet: 79 LoRA modules (18 3x3 conv, 79 DoRA)" in shown.stdout, shown.output
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "plain", lora={"init_from": str(dora_run.adapter)})
    with pytest.raises(LorakitError, match="set lora.use_dora = true"):
        train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)

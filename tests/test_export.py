"""Adapters written by `train` load in diffusers and reproduce the trained model exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict


def _outputs(unet, text_encoder, tokenizer):
    """U-Net and text-encoder outputs for a fixed prompt, latent and timestep."""
    ids = tokenizer(
        ["ohwx toy, red, white background"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        eps = unet(latents, torch.tensor([400]), encoder_hidden_states=hidden).sample
    return hidden, eps


def _pipeline(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path)


@pytest.fixture(scope="module")
def reference(trained_run, tiny_base):
    pipe = _pipeline(tiny_base)
    models = trained_run.models
    for module in models.values():
        module.eval()
    return _outputs(models["unet"], models["text_encoder"], pipe.tokenizer), _outputs(
        pipe.unet, pipe.text_encoder, pipe.tokenizer
    )


@pytest.mark.parametrize("which", ["adapter", "diffusers_adapter"])
def test_exported_file_reloads_exactly_in_diffusers(trained_run, tiny_base, reference, which):
    trained, base = reference
    pipe = _pipeline(tiny_base)
    pipe.load_lora_weights(str(getattr(trained_run, which)))
    loaded = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    for got, want, original in zip(loaded, trained, base, strict=True):
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
        assert (want - original).abs().max() > 1e-3  # the adapter really changes the model


def test_fp16_export_reloads_within_rtol(trained_run, tiny_base, reference, tmp_path):
    from lorakit.adapters import extract_lora
    from lorakit.formats.files import AdapterInfo, save_adapter_files

    state = {name: extract_lora(module) for name, module in trained_run.models.items()}
    info = AdapterInfo("sd1", str(tiny_base), "epsilon", 4, 8.0, "transformer", "half")
    kohya, diffusers_file = save_adapter_files(state, tmp_path, "half", "float16", info)
    trained, _ = reference
    for path in (kohya, diffusers_file):
        with safe_open(path, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        pipe = _pipeline(tiny_base)
        pipe.load_lora_weights(str(path))
        for got, want in zip(_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer), trained, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_kohya_file_names_alpha_and_metadata(trained_run):
    with safe_open(trained_run.adapter, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert {s.split("_")[1] for s in stems} == {"unet", "te"}
    assert len([s for s in stems if s.startswith("lora_unet_")]) == 48
    assert len([s for s in stems if s.startswith("lora_te_")]) == 12
    assert all(s.startswith("lora_te_text_model_encoder_layers_") for s in stems if s.startswith("lora_te_"))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in stems
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in stems
    assert len(keys) == 3 * len(stems)
    assert alphas == {8.0}
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_v2"] == "False" and json.loads(metadata["ss_network_args"]) == {}
    assert metadata["lorakit_steps"] == "6" and len(metadata["lorakit_recipe_sha256"]) == 64
    assert metadata["lorakit_targets"] == "transformer"
    assert json.loads(metadata["ss_tag_frequency"]) == {
        "dataset": {
            "ohwx": 8,
            "toy": 8,
            "red": 8,
            "white background": 2,
            "blue background": 2,
            "green background": 2,
            "black background": 2,
        }
    }
    assert json.loads(metadata["ss_dataset_dirs"]) == {"dataset": {"n_repeats": 1, "img_count": 8}}
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.trigger_phrase"] == "ohwx" and metadata["modelspec.resolution"] == "64x64"
    assert metadata["modelspec.prediction_type"] == "epsilon" and metadata["modelspec.sai_model_spec"] == "1.0.1"


def test_sshs_hashes_follow_the_kohya_definition(trained_run):
    import hashlib

    from safetensors.torch import load_file, save

    with safe_open(trained_run.adapter, "pt") as f:
        metadata = f.metadata()
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save(load_file(trained_run.adapter), metadata=ss_only)
    header = 8 + int.from_bytes(blob[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(blob[header:]).hexdigest()
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def test_diffusers_file_carries_alpha_in_adapter_metadata(trained_run):
    with safe_open(trained_run.diffusers_adapter, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8.0
    assert config["text_encoder.r"] == 4 and config["text_encoder.lora_alpha"] == 8.0
    assert "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)


def test_run_folder_holds_exactly_the_promised_files(trained_run):
    files = {p.name for p in trained_run.run_dir.iterdir()}
    assert files == {
        ".lorakit-run",
        "recipe.resolved.toml",
        "run.safetensors",
        "run.diffusers.safetensors",
        "metrics.jsonl",
        "tensorboard",
        "checkpoints",
    }
    (checkpoint,) = (trained_run.run_dir / "checkpoints").iterdir()
    assert checkpoint.name == "step-000006"
    assert {p.name for p in checkpoint.iterdir()} == {
        "adapter.safetensors",
        "optimizer.safetensors",
        "state.json",
        "manifest.json",
    }
    rows = [json.loads(line) for line in (trained_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"loss", "lr_unet", "lr_text_encoder", "epoch"} <= set(rows[0])
    assert not list(trained_run.run_dir.rglob("*.tmp"))


def test_resolved_recipe_reloads_to_the_same_run(trained_run, tmp_path):
    from lorakit.recipe import load_recipe

    resolved = load_recipe(trained_run.run_dir / "recipe.resolved.toml")
    assert resolved.model.prediction_type == "epsilon" and resolved.lora.train_text_encoder is True
    assert resolved.train.max_steps == 6 and resolved.lora.lora_alpha == 8.0


def test_v_prediction_base_trains_and_reloads(tiny_base_v, tiny_dataset, tmp_path):
    recipe = recipe_from_dict(
        make_recipe_dict(
            tiny_base_v, tiny_dataset, tmp_path, train={"max_steps": 2}, lora={"target_modules": "attention"}
        )
    )
    result = train(recipe, quiet=True, log=lambda _: None)
    pipe = _pipeline(tiny_base_v)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.load_lora_weights(str(result.adapter))
    want = _outputs(result.models["unet"].eval(), result.models["text_encoder"].eval(), pipe.tokenizer)
    for got, expected in zip(_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer), want, strict=True):
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    with safe_open(result.adapter, "pt") as f:
        assert not any("ff_net" in k or "proj_in" in k or "mlp" in k for k in f.keys())


def test_title_author_description_license_tags_and_comment_reach_both_files(tiny_base, tiny_dataset, tmp_path):
    words = {
        "title": "Toy Disc",
        "author": "lorakit tests",
        "description": "A red disc on grey.",
        "license": "CreativeML Open RAIL-M",
        "tags": ["object", "toy"],
        "comment": "eight photos",
    }
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 1})
    recipe["output"] |= words
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    for path in (result.adapter, result.diffusers_adapter):
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        assert {k: metadata.get(f"modelspec.{k}") for k in ("title", "author", "description", "license")} == {
            k: words[k] for k in ("title", "author", "description", "license")
        }
        assert metadata["modelspec.tags"] == "object, toy" and metadata["ss_training_comment"] == "eight photos"
    # Unset, the title is the run's name and nothing else is written.
    plain = train(
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "plain", train={"max_steps": 1})),
        quiet=True,
        log=lambda _: None,
    )
    with safe_open(str(plain.adapter), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.title"] == "run"
    assert not {"modelspec.author", "modelspec.tags", "ss_training_comment"} & metadata.keys()

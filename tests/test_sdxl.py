"""SDXL: both text encoders, size/crop micro-conditioning, exports that reload in diffusers' SDXL pipeline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from lorakit.data import Item, size_conditioning
from lorakit.errors import LorakitError
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict
from .tiny import captioned_copy


def _train(base, dataset, out, **sections):
    lines: list[str] = []
    result = train(recipe_from_dict(make_recipe_dict(base, dataset, out, **sections)), quiet=True, log=lines.append)
    return result, lines


def test_sdxl_trains_both_encoders_and_says_what_size_conditioning_assumes(sdxl_run):
    result, lines = sdxl_run
    assert set(result.models) == {"unet", "text_encoder", "text_encoder_2"}
    assert any("SDXL's size conditioning takes each as stored" in line for line in lines)
    with safe_open(str(result.adapter), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in keys}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in keys)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # train.text_encoder_2_lr: the second encoder learns at its own rate, recorded as kohya records two
    rates = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert (rates["lr_unet"], rates["lr_text_encoder"], rates["lr_text_encoder_2"]) == (1e-3, 1e-3, 2e-5)
    assert metadata["ss_text_encoder_lr"] == "[0.001, 2e-05]"


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_both_exports_reload_in_the_sdxl_pipeline_with_the_in_memory_outputs(sdxl_run, tiny_sdxl, layout):
    from diffusers import StableDiffusionXLPipeline

    from lorakit.models import encode_prompts, load_base, tokenize

    result, _ = sdxl_run
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    pipe.load_lora_weights(str(result.adapter if layout == "kohya" else result.diffusers_adapter))
    trained = load_base(str(tiny_sdxl))
    trained.unet, trained.text_encoders = (
        result.models["unet"],
        [
            result.models["text_encoder"],
            result.models["text_encoder_2"],
        ],
    )
    reloaded = load_base(str(tiny_sdxl))
    reloaded.unet, reloaded.text_encoders = pipe.unet, [pipe.text_encoder, pipe.text_encoder_2]
    for model in (trained, reloaded):
        model.unet.eval()
    outputs = []
    for model in (trained, reloaded):
        with torch.no_grad():
            conditioning = encode_prompts(model, tokenize(model, ["ohwx toy on a table"]))
            pooled = conditioning.pop("pooled")
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
            outputs.append(
                model.unet(
                    sample,
                    torch.tensor([500]),
                    **conditioning,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                ).sample
            )
            outputs.append(conditioning["encoder_hidden_states"])
    base = load_base(str(tiny_sdxl))
    with torch.no_grad():
        untouched = encode_prompts(base, tokenize(base, ["ohwx toy on a table"]))["encoder_hidden_states"]
    torch.testing.assert_close(outputs[2], outputs[0], atol=1e-5, rtol=1e-4)  # U-Net
    torch.testing.assert_close(outputs[3], outputs[1], atol=1e-5, rtol=1e-4)  # both text encoders
    assert (outputs[1] - untouched).abs().max() > 1e-4  # the adapters changed the text conditioning


def test_micro_conditioning_equals_diffusers_pipeline(tiny_sdxl):
    """Non-square photo, distinct non-zero crops, flipped and not: the values diffusers' SDXL pipeline computes."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    item = Item(
        path=None,
        caption="",
        sha256="",
        size=(96, 64),
        bucket=(96, 64),
        original_size=(1200, 700),  # resized to cover 96 x 64: 110 x 64 (scale 64 / 700 -> width 109.7)
        crop=(3, 0),
    )
    item_tall = Item(
        path=None, caption="", sha256="", size=(64, 96), bucket=(64, 96), original_size=(500, 900), crop=(0, 5)
    )
    projection = pipe.text_encoder_2.config.projection_dim
    for it, flip, expected_left in ((item, False, 3), (item, True, 110 - 3 - 96), (item_tall, False, 0)):
        ours = size_conditioning(it, flip)
        width, height = it.original_size
        top = it.crop[1]
        theirs = pipe._get_add_time_ids(
            (height, width), (top, expected_left), (it.bucket[1], it.bucket[0]), torch.float32, projection
        )
        assert torch.equal(torch.tensor([ours], dtype=torch.float32), theirs), (ours, theirs)
    assert size_conditioning(item, True)[3] != size_conditioning(item, False)[3]
    assert size_conditioning(item_tall, False)[:4] == (900, 500, 5, 0)  # height first: a swap cannot pass


def test_size_conditioning_without_prepare_metadata_is_the_centre_crop():
    item = Item(path=None, caption="", sha256="", size=(100, 64), bucket=(64, 64))
    assert size_conditioning(item, False) == (64, 100, 0, 18, 64, 64)
    assert size_conditioning(item, True) == (64, 100, 0, 100 - 18 - 64, 64, 64)


def test_sdxl_resumes_bit_exactly(tiny_sdxl, tiny_dataset, tmp_path):
    sections = {"train": {"max_steps": 4, "save_every_steps": 2}}
    straight, _ = _train(tiny_sdxl, tiny_dataset, tmp_path / "a", **sections)
    recipe = make_recipe_dict(tiny_sdxl, tiny_dataset, tmp_path / "b", train={"max_steps": 2, "save_every_steps": 2})
    train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    recipe["train"]["max_steps"] = 4
    resumed = train(recipe_from_dict(recipe), resume="latest", quiet=True, log=lambda _: None)
    a = {n: p for n, p in straight.models["unet"].named_parameters() if "lora_" in n}
    b = {n: p for n, p in resumed.models["unet"].named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_sdxl_with_frozen_encoders_caches_both_and_the_pooled_embedding(tiny_sdxl, tiny_dataset, tmp_path):
    result, lines = _train(tiny_sdxl, tiny_dataset, tmp_path, train={"max_steps": 2})
    assert set(result.models) == {"unet"}  # SDXL trains the U-Net only unless asked
    assert any("Text encoder outputs cached" in line for line in lines)


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"model": {"clip_skip": 2}}, "model.clip_skip: 2 is not defined for SDXL"),
        ({"train": {"text_encoder_2_lr": 1e-5}}, "train.text_encoder_2_lr: the text encoders are not trained"),
    ],
)
def test_sdxl_refuses_what_it_does_not_define(tiny_sdxl, tiny_dataset, tmp_path, sections, fragment):
    with pytest.raises(LorakitError, match=fragment):
        _train(tiny_sdxl, tiny_dataset, tmp_path, **sections)


def test_sdxl_kohya_names_on_the_real_architecture():
    """The transformer preset on the real SDXL U-Net: 722 modules, every one named with the original blocks."""
    from lorakit.adapters import PRESETS, matching_modules
    from lorakit.architectures import build_on_meta
    from lorakit.formats.kohya import kohya_name

    unet = build_on_meta("sdxl", "unet")
    names = {kohya_name("unet", n, sdxl=True) for n in matching_modules(unet, PRESETS["transformer"]["unet"])}
    assert len(names) == 722
    assert all(
        n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for n in names
    )
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_unet_output_blocks_2_1_proj_out" in names
    te2 = build_on_meta("sdxl", "text_encoder_2")
    te2_names = {
        kohya_name("text_encoder_2", n, sdxl=True)
        for n in matching_modules(te2, PRESETS["transformer"]["text_encoder"])
    }
    assert len(te2_names) == 192 and "lora_te2_text_model_encoder_layers_31_mlp_fc2" in te2_names


def test_prepared_dataset_carries_its_cut_into_training(tiny_sdxl, tmp_path):
    """A dataset written by prepare records original size and crop; training reads them (no assumption said)."""
    from lorakit.prepare import PrepareOptions, prepare

    from .messy import textured

    src = tmp_path / "photos"
    src.mkdir()
    for index in range(2):
        textured(160, 100, index).save(src / f"p{index}.png")
    prepare(src, tmp_path / "data", PrepareOptions(resolution=64, bucket_step=16, workers=1), quiet=True, log=print)
    rows = [json.loads(line) for line in (tmp_path / "data" / "metadata.jsonl").read_text().splitlines()]
    assert rows[0]["original_width"] == 160
    _, lines = _train(tiny_sdxl, tmp_path / "data", tmp_path / "out", train={"max_steps": 1, "batch_size": 1})
    assert not any("size conditioning takes each as stored" in line for line in lines)
    shutil.rmtree(tmp_path / "out")


def test_an_sdxl_adapter_on_an_sd1_base_is_refused_naming_both(sdxl_run, tiny_base, tiny_dataset, tmp_path):
    result, _ = sdxl_run
    with pytest.raises(LorakitError) as err:
        _train(tiny_base, tiny_dataset, tmp_path, lora={"init_from": str(result.diffusers_adapter)})
    message = str(err.value)
    assert "\n" not in message and "SDXL adapter" in message and "SD 1.x model" in message


def test_an_sd1_adapter_on_an_sdxl_base_is_refused_naming_both(trained_run, tiny_sdxl, tiny_dataset, tmp_path):
    with pytest.raises(LorakitError) as err:
        _train(tiny_sdxl, tiny_dataset, tmp_path, lora={"init_from": str(trained_run.adapter)})
    assert "SD 1.x adapter" in str(err.value) and "SDXL model" in str(err.value)


def test_sdxl_samples_render_with_the_sdxl_pipeline(tiny_sdxl, tiny_dataset, tmp_path):
    result, lines = _train(
        tiny_sdxl, tiny_dataset, tmp_path, train={"max_steps": 1}, sample={"prompts": ["ohwx toy"], "steps": 2}
    )
    assert (result.run_dir / "samples" / "step-000001.png").is_file()
    assert any(line.startswith("SDXL: latents are encoded in float32 with the base's VAE") for line in lines)


def test_v_prediction_sdxl_with_zero_terminal_snr_trains_to_the_last_timestep(tmp_path, tiny_dataset):
    from .tiny import save_tiny_sdxl_pipeline

    base = save_tiny_sdxl_pipeline(tmp_path / "vpred", prediction_type="v_prediction")
    result, _ = _train(
        base,
        tiny_dataset,
        tmp_path / "out",
        model={"zero_terminal_snr": True},
        train={"max_steps": 2, "min_timestep": 998, "min_snr_gamma": 5.0},
    )
    # min-SNR weighs pure noise (SNR 0) by min(SNR, g) / (SNR + 1) = 0 for v: finite, not NaN
    assert torch.isfinite(torch.tensor(result.final_loss)) and result.final_loss >= 0
    lora = [p for n, p in result.models["unet"].named_parameters() if "lora_" in n]
    assert all(torch.isfinite(p).all() for p in lora)
    with safe_open(str(result.adapter), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"
    eps = save_tiny_sdxl_pipeline(tmp_path / "eps")
    with pytest.raises(LorakitError, match="model.zero_terminal_snr"):
        _train(eps, tiny_dataset, tmp_path / "x", model={"zero_terminal_snr": True})


@pytest.mark.parametrize("name", ["sdxl-character", "sdxl-character-8gb"])
def test_the_shipped_sdxl_recipe_trains_through_the_cli(tiny_sdxl, tiny_dataset, tmp_path, name):
    from typer.testing import CliRunner

    from lorakit.cli import app

    overrides = [
        f"model.base={tiny_sdxl}",
        f"data.folder={tiny_dataset}",
        "data.resolution=64",
        "train.max_steps=1",
        f"output.folder={tmp_path}",
    ]
    args = ["train", f"recipes/{name}.toml", "--quiet"] + [x for o in overrides for x in ("--set", o)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / name / f"{name}.safetensors").is_file()


def test_the_sdxl_kohya_file_reads_back_to_diffusers_paths(sdxl_run):
    from lorakit.formats.read import read_adapter_file

    result, _ = sdxl_run
    kohya, diffusers = read_adapter_file(result.adapter), read_adapter_file(result.diffusers_adapter)
    assert kohya.family == diffusers.family == "sdxl"
    assert {c: sorted(m) for c, m in kohya.state.items()} == {c: sorted(m) for c, m in diffusers.state.items()}
    for component, modules in kohya.state.items():
        for path, lora in modules.items():
            other = diffusers.state[component][path]
            torch.testing.assert_close(
                lora.up @ lora.down * lora.alpha / lora.rank, other.up @ other.down * other.alpha / other.rank
            )


def test_sdxl_block_names_round_trip_on_the_real_architecture():
    from lorakit.architectures import build_on_meta
    from lorakit.formats.kohya import sdxl_diffusers_path, sdxl_unet_path

    unet = build_on_meta("sdxl", "unet")
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(names) > 700 and all(sdxl_diffusers_path(sdxl_unet_path(n)) == n for n in names)
    assert sdxl_unet_path("down_blocks.0.resnets.1.conv1") == "input_blocks.2.0.in_layers.2"
    assert sdxl_unet_path("up_blocks.1.upsamplers.0.conv") == "output_blocks.5.2.conv"
    assert sdxl_unet_path("down_blocks.1.downsamplers.0.conv") == "input_blocks.6.0.op"


def test_convert_resize_and_merge_sdxl_adapters(sdxl_run, tmp_path):
    from lorakit.convert import convert_adapter, inspect_adapter
    from lorakit.formats.read import read_adapter_file
    from lorakit.merge import merge, resize

    result, _ = sdxl_run
    there = convert_adapter(result.adapter, "diffusers", tmp_path / "a.diffusers.safetensors")
    back = convert_adapter(there, "kohya", tmp_path / "b.safetensors")
    with safe_open(str(back), "pt") as f:
        assert set(f.keys()) == set(safe_open(str(result.adapter), "pt").keys())
    assert inspect_adapter(back)["architecture"] == "sdxl"
    small, _ = resize(back, 2, out=tmp_path / "r.safetensors", log=lambda _: None)
    assert {lora.rank for m in read_adapter_file(small).state.values() for lora in m.values()} == {2}
    merged = merge([(str(back), 0.5), (str(there), 0.5)], tmp_path / "m.safetensors", log=lambda _: None)
    assert read_adapter_file(merged.out).family == "sdxl"


def test_generate_renders_with_an_sdxl_run_folder(sdxl_run, tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from lorakit.cli import app

    result, _ = sdxl_run
    fast = ["--size", "64x64", "--steps", "2", "--quiet"]
    out = CliRunner().invoke(
        app,
        ["generate", "ohwx toy", "--lora", str(result.run_dir), "--compare-scales", "0,1", "--out", str(tmp_path)]
        + fast,
    )
    assert out.exit_code == 0, out.output
    with Image.open(tmp_path / "000-seed0-x0.png") as base, Image.open(tmp_path / "001-seed0-x1.png") as adapted:
        assert base.size == (64, 64) and not np.array_equal(np.asarray(base), np.asarray(adapted))
    again = CliRunner().invoke(
        app,
        [
            "generate",
            "ohwx toy",
            "--lora",
            str(result.run_dir),
            "--init",
            str(tmp_path / "000-seed0-x0.png"),
            "--out",
            str(tmp_path / "i2i"),
        ]
        + fast,
    )
    assert again.exit_code == 0, again.output


def test_merge_into_an_sdxl_base_equals_the_trained_model(sdxl_run, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from lorakit.merge import merge

    result, _ = sdxl_run
    merge([(str(result.adapter), 1.0)], tmp_path / "merged", base=str(tiny_sdxl), log=lambda _: None)
    merged = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "merged"))
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(1, 77, 80, generator=torch.Generator().manual_seed(2))
    added = {"text_embeds": torch.randn(1, 16), "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with torch.no_grad():
        ours = result.models["unet"](
            sample, torch.tensor([300]), encoder_hidden_states=hidden, added_cond_kwargs=added
        )
        theirs = merged.unet(sample, torch.tensor([300]), encoder_hidden_states=hidden, added_cond_kwargs=added)
    torch.testing.assert_close(theirs.sample, ours.sample, atol=1e-4, rtol=1e-4)


def test_sdxl_encodes_long_captions_in_kohyas_chunks_and_trains_on_them(tiny_sdxl, tiny_dataset, tmp_path):
    from lorakit.models import chunk_ids, encode_prompts, load_base, tokenize
    from lorakit.toy.text import make_clip_tokenizer

    second, _ = make_clip_tokenizer()
    second.pad_token = "!"  # as SDXL's OpenCLIP tokenizer pads: not with the end token
    eos, pad = second.eos_token_id, second.pad_token_id
    assert pad != eos
    words = "red hat " * 40  # 80 tokens
    ids = second([words, "red hat"], padding="max_length", max_length=152, truncation=True, return_tensors="pt")
    full, empty = chunk_ids(second, ids.input_ids)
    assert full[0, -1] == eos and full[0, -2] not in (eos, pad)  # text ran to the chunk's end: it gets the end
    assert empty[1, 1] == eos and set(empty[1, 2:].tolist()) == {pad}  # a chunk of padding starts with the end
    base = load_base(str(tiny_sdxl))
    long = encode_prompts(base, tokenize(base, [words], 150))
    short = encode_prompts(base, tokenize(base, [words], 75))
    assert long["encoder_hidden_states"].shape[1] == 152
    torch.testing.assert_close(long["encoder_hidden_states"][:, :76], short["encoder_hidden_states"][:, :76])
    torch.testing.assert_close(long["pooled"], short["pooled"])  # the first chunk's, as kohya takes it
    # and training reads captions of up to 150 tokens, caching the frozen encoders' outputs
    data = captioned_copy(tmp_path / "data", words, tiny_dataset)
    result, lines = _train(tiny_sdxl, data, tmp_path / "out", train={"max_steps": 1}, data={"max_token_length": 150})
    assert not any("truncated" in line for line in lines)
    assert any("Text encoder outputs cached" in line for line in lines) and result.adapter.is_file()


def test_sdxl_trains_with_kohyas_block_lists(tiny_sdxl, tiny_dataset, tmp_path):
    from lorakit.adapters import unet_block_count
    from lorakit.plan import plan

    config = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    blocks = unet_block_count(config)
    ranks = [0, *[4] * blocks, 2, 8, 2, *[4] * blocks, 0]  # kohya's SDXL layout: 2 x blocks + 5 values
    sections = {
        "lora": {"block_ranks": ranks},
        "train": {"max_steps": 1, "mid_lr_weight": [1.0, 0.5, 1.0]},
    }
    result, lines = _train(tiny_sdxl, tiny_dataset, tmp_path, **sections)
    assert any(line.startswith("lora.block_ranks: ") and "ranks 4, 8" in line for line in lines), lines
    with safe_open(str(result.adapter), "pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys() if "middle_block_1" in k and "down" in k}
    assert shapes and {shape[0] for shape in shapes.values()} == {8}  # the middle block's attention at its rank
    # what plan counts is what training made
    trained = sum(p.numel() for m in result.models.values() for n, p in m.named_parameters() if "lora_" in n)
    recipe = recipe_from_dict(make_recipe_dict(tiny_sdxl, tiny_dataset, tmp_path / "p", **sections))
    assert sum(plan(recipe, vram=8).memory.trainable) == trained

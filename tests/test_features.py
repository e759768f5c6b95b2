"""The knobs people bring from kohya recipes, and what training does besides the loop."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.errors import LorakitError, RecipeError
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict
from .tiny import captioned_copy


def _run(base, dataset, out, **sections):
    lines: list[str] = []
    recipe = recipe_from_dict(make_recipe_dict(base, dataset, out, **sections))
    return train(recipe, quiet=True, log=lines.append), lines


def _metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_samples_are_rendered_as_grids_with_parameters(tiny_base, tiny_dataset, tmp_path):
    from PIL import Image

    result, _ = _run(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 4},
        sample={"prompts": ["ohwx toy", "a red disc"], "every_steps": 2, "steps": 2, "seed": 5},
    )
    grids = sorted(p.name for p in (result.run_dir / "samples").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]
    with Image.open(result.run_dir / "samples" / "step-000004.png") as grid:
        assert grid.size == (128, 64)
        parameters = grid.text["parameters"]
    assert parameters.startswith("ohwx toy | a red disc\n") and "Seed: 5" in parameters and "Steps: 2" in parameters


def test_samples_at_first_show_the_base_and_leave_training_as_it_was(tiny_base, tiny_dataset, tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from lorakit.cli import app

    sample = {"prompts": ["ohwx toy"], "every_steps": 2, "steps": 2, "seed": 5}
    result, _ = _run(
        tiny_base, tiny_dataset, tmp_path / "first", train={"max_steps": 2}, sample={**sample, "at_first": True}
    )
    grids = sorted(p.name for p in (result.run_dir / "samples").iterdir())
    assert grids == ["step-000000.png", "step-000002.png"]
    # before any step the adapter adds nothing: the grid is what the base alone draws
    out = tmp_path / "base"
    args = ["generate", "ohwx toy", "--base", str(tiny_base), "--seed", "5", "--steps", "2", "--size", "64x64"]
    said = CliRunner().invoke(app, [*args, "--out", str(out), "--quiet"])
    assert said.exit_code == 0, said.output
    with Image.open(result.run_dir / "samples" / "step-000000.png") as grid, Image.open(out / "000-seed5.png") as own:
        first, base = np.asarray(grid.convert("RGB"), dtype=np.int16), np.asarray(own.convert("RGB"), dtype=np.int16)
    assert first.shape == base.shape and np.abs(first - base).max() <= 1
    # and rendering it changes nothing in training
    plain, _ = _run(tiny_base, tiny_dataset, tmp_path / "plain", train={"max_steps": 2}, sample=sample)
    assert load_file(str(plain.adapter)).keys() == load_file(str(result.adapter)).keys()
    for key, tensor in load_file(str(plain.adapter)).items():
        assert torch.equal(tensor, load_file(str(result.adapter))[key]), key
    with pytest.raises(LorakitError, match="sample.at_first: there are no sample.prompts"):
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, sample={"at_first": True}))


def test_validation_loss_uses_fixed_noise(tiny_base, tiny_dataset, tmp_path):
    result, _ = _run(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 4, "unet_lr": 0.0, "text_encoder_lr": 0.0},
        validation={"folder": str(tiny_dataset), "every_steps": 2, "timesteps": [200, 800]},
    )
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert values[0] == values[1] > 0  # nothing trained (lr 0), so fixed noise gives the same number


def test_validation_split_holds_out_the_same_images_and_trains_without_them(tiny_base, tiny_dataset, tmp_path):
    from safetensors import safe_open

    settings = {"train": {"max_steps": 4, "unet_lr": 0.0, "text_encoder_lr": 0.0}}
    split = {"split": 0.25, "every_steps": 2, "timesteps": [300]}
    first, lines = _run(tiny_base, tiny_dataset, tmp_path / "a", validation=split, **settings)
    again, lines_again = _run(tiny_base, tiny_dataset, tmp_path / "b", validation=split, **settings)
    said = [line for line in lines if line.startswith("validation.split: ")]
    assert said == [line for line in lines_again if line.startswith("validation.split: ")]
    assert said[0].startswith("validation.split: 2 of 8 images held out for val_loss: ")
    with safe_open(str(first.adapter), "pt") as handle:
        assert handle.metadata()["ss_num_train_images"] == "6"  # the held-out two are not trained on
    rows = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4] and values[0] == values[1] > 0


def test_validation_at_epoch_ends_with_its_own_seed(tiny_base, tiny_dataset, tmp_path):
    split = {"split": 0.25, "every_steps": 0, "every_epochs": 1, "timesteps": [300]}
    settings = {"max_epochs": 2, "save_every_steps": 0}
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "a", validation=split, train=settings)
    del recipe["train"]["max_steps"]
    lines: list[str] = []
    result = train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val_loss" in r] == [1.0, 2.0]  # at each epoch's end, not by steps
    held_out = {line for line in lines if line.startswith("validation.split: ")}
    # validation.seed (kohya's validation_seed) picks other images than train.seed does, the same ones every time
    others = []
    for name in ("b", "c"):
        own = make_recipe_dict(
            tiny_base, tiny_dataset, tmp_path / name, validation={**split, "seed": 3}, train={"max_steps": 1}
        )
        said: list[str] = []
        train(recipe_from_dict(own), quiet=True, log=said.append)
        others.append({line for line in said if line.startswith("validation.split: ")})
    assert others[0] == others[1] != held_out
    with pytest.raises(LorakitError, match="validation.seed: chooses the images validation.split holds out"):
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, validation={"folder": "x", "seed": 3}))


@pytest.mark.parametrize(
    ("validation", "fragment"),
    [
        ({"split": 0.2, "folder": "x"}, "validation: give folder (a held-out dataset folder) or split"),
        ({"every_steps": 5}, "validation: give folder (a held-out dataset folder) or split"),
    ],
)
def test_a_validation_that_holds_out_nothing_or_everything_is_refused(
    tiny_base, tiny_dataset, tmp_path, validation, fragment
):
    from .conftest import write_recipe
    from .invoke import fails

    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", validation=validation)
    fails(["train", str(write_recipe(tmp_path / "r.toml", recipe)), "--quiet"], fragment)
    assert not (tmp_path / "out" / "run").exists()


def test_a_split_that_leaves_nothing_to_train_on_is_refused(tiny_dataset):
    from lorakit.data import load_items, split_held_out
    from lorakit.errors import DatasetError
    from lorakit.recipe import DataSection

    items = load_items(DataSection(folder=str(tiny_dataset), resolution=64), 8)
    kept, held = split_held_out(items, 0.9, 0)
    assert (len(kept), len(held)) == (1, 7) and not {i.path for i in kept} & {i.path for i in held}
    with pytest.raises(DatasetError, match="validation.split: 0.1 of 1 images holds out 1, leaving none to train on"):
        split_held_out(items[:1], 0.1, 0)


def test_text_encoder_cache_matches_encoding_every_step(tiny_base, tiny_dataset, tmp_path):
    dataset = captioned_copy(tmp_path / "data", ["ohwx red toy"] * 4 + ["ohwx toy on white"] * 4, tiny_dataset)
    frozen = {"train_text_encoder": False}
    cached, lines = _run(tiny_base, dataset, tmp_path / "a", lora=frozen, train={"max_steps": 3})
    assert "Text encoder outputs cached for 2 captions (the text encoder is frozen)" in lines
    # Tag shuffling turns the cache off; with one tag per caption it changes nothing else.
    direct, lines = _run(
        tiny_base, dataset, tmp_path / "b", lora=frozen, train={"max_steps": 3}, data={"shuffle_tags": True}
    )
    assert not any(line.startswith("Text encoder outputs cached") for line in lines)
    for key, tensor in load_file(cached.adapter).items():
        torch.testing.assert_close(tensor, load_file(direct.adapter)[key], rtol=1e-5, atol=1e-6)


def test_prior_preservation_renders_missing_class_images_and_trains_on_them(tiny_base, tiny_dataset, tmp_path):
    from PIL import Image

    from lorakit.render import parse_a1111_parameters

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for index in range(3):
        Image.new("RGB", (64, 64), (30 * index, 90, 160)).save(class_dir / f"c{index}.png")
    prior = {"class_dir": str(class_dir), "class_prompt": "a toy", "num_class_images": 4}
    result, lines = _run(
        tiny_base, tiny_dataset, tmp_path / "b", prior=prior, train={"max_steps": 2}, sample={"steps": 2}
    )
    assert f"prior: {class_dir} holds 3 of 4 class images; rendering 1 with the base" in lines
    with Image.open(class_dir / "class-00003.png") as rendered:
        assert rendered.size == (64, 64)
        assert parse_a1111_parameters(rendered.text["parameters"])["prompt"] == "a toy"
    assert any(line.startswith("prior: 4 class images") for line in lines)
    # 8 instance images once each, 4 class images repeated round(8 / 4) = 2 times each.
    assert _metadata(result.adapter)["ss_num_train_images"] == "16"
    _, again = _run(tiny_base, tiny_dataset, tmp_path / "c", prior=prior, train={"max_steps": 1})
    assert not any("rendering" in line for line in again)  # kept in the folder, rendered once


def test_prior_with_a_list_of_class_prompts_captions_each_image(tiny_base, tiny_dataset, tmp_path):
    prior = {"class_dir": str(tmp_path / "class"), "class_prompt": ["a red toy", "a blue toy"], "num_class_images": 3}
    _run(tiny_base, tiny_dataset, tmp_path / "out", prior=prior, train={"max_steps": 1}, sample={"steps": 2})
    captions = [(tmp_path / "class" / f"class-{i:05d}.txt").read_text().strip() for i in range(3)]
    assert captions == ["a red toy", "a blue toy", "a red toy"]


def test_several_dataset_folders_with_their_own_repeats(tiny_base, tiny_dataset, tmp_path):
    second = captioned_copy(tmp_path / "second", ["ohwx toy"] * 2, tiny_dataset)
    result, _ = _run(
        tiny_base,
        tiny_dataset,
        tmp_path / "out",
        train={"max_steps": 1},
        data={"folder": [str(tiny_dataset), str(second)], "num_repeats": [1, 3]},
    )
    assert _metadata(result.adapter)["ss_num_train_images"] == str(8 + 2 * 3)


def test_locon_adapts_convolutions_and_reloads_exactly(tiny_base, tiny_dataset, tmp_path):
    from .invoke import assert_unet_reloads_exactly

    result, _ = _run(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 2},
        lora={"target_modules": "transformer+conv", "conv_rank": 2, "conv_alpha": 1.0},
    )
    tensors = load_file(result.adapter)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 4
    assert json.loads(_metadata(result.adapter)["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert_unet_reloads_exactly(result, tiny_base)


def test_init_from_starts_at_an_existing_adapter(tiny_base, tiny_dataset, tmp_path):
    first, _ = _run(tiny_base, tiny_dataset, tmp_path / "a", train={"max_steps": 2})
    for source in (first.adapter, first.diffusers_adapter):
        frozen, lines = _run(
            tiny_base,
            tiny_dataset,
            tmp_path / source.stem,
            lora={"init_from": str(source)},
            train={"max_steps": 1, "unet_lr": 0.0, "text_encoder_lr": 0.0, "weight_decay": 0.0},
        )
        assert any(line.startswith(f"lora.init_from: started from {source} (60 of 60 modules)") for line in lines)
        for key, tensor in load_file(first.adapter).items():
            assert torch.equal(load_file(frozen.adapter)[key], tensor), key


def test_init_from_another_architecture_is_refused(tiny_base, tiny_dataset, tmp_path):
    first, _ = _run(
        tiny_base, tiny_dataset, tmp_path / "a", train={"max_steps": 1}, lora={"target_modules": "transformer+conv"}
    )
    with pytest.raises(LorakitError, match="down_blocks.0.downsamplers.0.conv is not adapted in this model"):
        _run(tiny_base, tiny_dataset, tmp_path / "b", lora={"init_from": str(first.adapter)})
    (tmp_path / "old.ckpt").write_bytes(b"not opened")
    with pytest.raises(LorakitError, match="pickles"):
        _run(tiny_base, tiny_dataset, tmp_path / "c", lora={"init_from": str(tmp_path / "old.ckpt")})


def test_clip_skip_changes_the_conditioning_and_is_recorded(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    import lorakit.train.loop as loop
    from lorakit.models import encode_prompts, load_base, tokenize

    base = load_base(str(tiny_base))
    ids = tokenize(base, ["ohwx toy"])
    last = encode_prompts(base, ids, clip_skip=1)["encoder_hidden_states"]
    penultimate = encode_prompts(base, ids, clip_skip=2)["encoder_hidden_states"]
    assert last.shape == penultimate.shape and not torch.allclose(last, penultimate)
    used = []
    monkeypatch.setattr(
        loop, "encode_prompts", lambda b, i, clip_skip: used.append(clip_skip) or encode_prompts(b, i, clip_skip)
    )
    result, _ = _run(tiny_base, tiny_dataset, tmp_path, model={"clip_skip": 2}, train={"max_steps": 1})
    assert used and set(used) == {2}  # the training step encodes with the recipe's clip skip
    assert _metadata(result.adapter)["ss_clip_skip"] == "2"


def test_long_captions_are_counted_or_chunked(tiny_base, tiny_dataset, tmp_path):
    from lorakit.models import encode_prompts, load_base, tokenize

    long_caption = ", ".join(["ohwx red toy on a white background"] * 9)  # 108 tokens
    dataset = captioned_copy(tmp_path / "data", [long_caption] + ["ohwx toy"] * 3, tiny_dataset)
    _, lines = _run(tiny_base, dataset, tmp_path / "a", train={"max_steps": 1})
    assert (
        "data: 1 of 4 captions are longer than 75 tokens and are truncated; set data.max_token_length = 150 "
        "or 225 to keep them" in lines
    )
    _, lines = _run(tiny_base, dataset, tmp_path / "b", train={"max_steps": 1}, data={"max_token_length": 150})
    assert not any("truncated" in line for line in lines)
    base = load_base(str(tiny_base))
    hidden = encode_prompts(base, tokenize(base, [long_caption], 150))["encoder_hidden_states"]
    short = encode_prompts(base, tokenize(base, [long_caption], 75))["encoder_hidden_states"]
    assert hidden.shape == (1, 152, 32)
    torch.testing.assert_close(hidden[:, :76], short[:, :76])  # the first chunk is the truncated caption


def test_custom_vae_and_half_precision_frozen_weights(tiny_base, tiny_dataset, tmp_path):
    from diffusers import AutoencoderKL

    # another VAE than the base's (same architecture, other weights): the run must encode with it
    vae = AutoencoderKL.from_pretrained(tiny_base / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(0.5)
    vae.save_pretrained(tmp_path / "other-vae")
    dataset = tmp_path / "data"
    shutil.copytree(tiny_dataset, dataset, ignore=shutil.ignore_patterns(".cache"))
    precision = {"max_steps": 1, "mixed_precision": "bf16"}
    _, lines = _run(tiny_base, dataset, tmp_path / "own", train=precision, model={"weight_dtype": "bfloat16"})
    assert any("(8 newly encoded)" in line for line in lines)  # the base's own VAE fills the cache
    result, lines = _run(
        tiny_base,
        dataset,
        tmp_path / "a",
        train=precision,
        model={"vae": str(tmp_path / "other-vae"), "weight_dtype": "bfloat16"},
    )
    assert any("(8 newly encoded)" in line for line in lines)  # another VAE: nothing reused, all encoded again
    unet = result.models["unet"]
    assert unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if "lora_" in n)
    with pytest.raises(LorakitError, match=r"model.weight_dtype: bfloat16 weights need train.mixed_precision"):
        _run(tiny_base, tiny_dataset, tmp_path / "b", model={"weight_dtype": "bfloat16"})
    with pytest.raises(LorakitError, match="model.vae: .* is not a diffusers VAE folder"):
        _run(tiny_base, tiny_dataset, tmp_path / "c", model={"vae": str(tmp_path)})


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_robust_losses_train(tiny_base, tiny_dataset, tmp_path, loss_type):
    import lorakit.train.loop as loop

    seen = []
    real = loop.objective.diffusion_loss

    def recording(prediction, target, weights, kind, huber_c, pixel_weights=None):
        seen.append(kind)
        return real(prediction, target, weights, kind, huber_c, pixel_weights)

    train_section = {"max_steps": 2, "min_timestep": 100, "max_timestep": 900}
    l2, _ = _run(tiny_base, tiny_dataset, tmp_path / "l2", train=train_section)
    loop.objective.diffusion_loss = recording
    try:
        robust, _ = _run(tiny_base, tiny_dataset, tmp_path / "r", train={**train_section, "loss_type": loss_type})
    finally:
        loop.objective.diffusion_loss = real
    assert seen == [loss_type, loss_type] and torch.isfinite(torch.tensor(robust.final_loss))
    assert robust.final_loss != l2.final_loss  # same seed, same batches: only the loss function differs


def test_sample_prompts_take_kohyas_inline_options(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    from PIL import Image

    import lorakit.train.images as images

    calls = []
    real = images.render

    def recording(pipe, prompts, seeds, settings, advance=None):
        calls.append((prompts, seeds, settings))
        return real(pipe, prompts, seeds, settings, advance)

    monkeypatch.setattr(images, "render", recording)
    prompts = ["ohwx toy --n blue, blurry --w 64 --h 32 --d 9 --s 1 --l 3.5", "a red disc"]
    result, _ = _run(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 2},
        sample={"prompts": prompts, "every_steps": 2, "steps": 2, "seed": 5, "negative_prompt": "grey"},
    )
    (first, first_seeds, own), (second, second_seeds, plain) = calls
    assert first == ["ohwx toy"] and first_seeds == [9]
    assert (own.negative_prompt, own.width, own.height, own.steps, own.guidance) == ("blue, blurry", 64, 32, 1, 3.5)
    assert second == ["a red disc"] and second_seeds == [6]  # the [sample] section's seed + its index
    assert (plain.negative_prompt, plain.width, plain.height, plain.steps) == ("grey", 64, 64, 2)
    with Image.open(result.run_dir / "samples" / "step-000002.png") as grid:
        assert grid.size == (128, 64)  # the 64x32 image sits in a 64x64 cell


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        ("ohwx toy --ar 16:9", "sample.prompts[0]: --ar is not a sample prompt option; use --n (negative prompt)"),
        ("ohwx toy --w 100", "sample.prompts[0]: --w 100 is not a multiple of 8"),
        ("ohwx toy --s many", "sample.prompts[0]: --s 'many' is not a whole number"),
        ("--n blurry", "sample.prompts[0]: the prompt before its options is empty"),
    ],
)
def test_bad_inline_sample_options_are_named(tiny_base, tiny_dataset, tmp_path, prompt, fragment):
    from lorakit.errors import RecipeError
    from lorakit.recipe import recipe_from_dict

    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, sample={"prompts": [prompt]})
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(recipe)
    assert fragment in str(caught.value)


def test_extra_resolutions_train_every_image_at_each(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    """data.extra_resolutions: each training image also appears in a bucket of each extra resolution, an image
    held out by validation.split is held out at all of them, and the plan sizes memory by the largest."""
    import lorakit.train.loop as loop
    from lorakit.memory import largest_bucket

    seen: set[tuple[str, int]] = set()
    real = loop.unet_conditioning

    def recording(run, captions, items, flips):
        seen.update((item.path.name, item.bucket[0] * item.bucket[1]) for item in items)
        return real(run, captions, items, flips)

    monkeypatch.setattr(loop, "unet_conditioning", recording)
    split = {"split": 0.25, "every_steps": 0, "timesteps": [300]}
    result, lines = _run(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 8},
        data={"extra_resolutions": [32]},
        validation=split,
    )
    said = next(line for line in lines if line.startswith("data.extra_resolutions: "))
    assert "every image also trains at 32 px (12 items in" in said and "an epoch shows 2x as many" in said
    held_out = next(line for line in lines if line.startswith("validation.split: ")).split(": ", 2)[2].split(", ")
    areas = {}
    for name, area in seen:
        areas.setdefault(name, set()).add("small" if area <= 48 * 48 else "large")
    assert {name for name, sizes in areas.items() if sizes == {"small", "large"}} == set(areas) - set(held_out)
    assert all(areas[name] == {"large"} for name in held_out)  # only val_loss saw them, at data.resolution
    assert _metadata(result.adapter)["ss_num_train_images"] == "12"
    recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, data={"extra_resolutions": [96]}))
    (width, height), how = largest_bucket(recipe)
    assert width * height > 80 * 80 and "at data.extra_resolutions 96" in how
    with pytest.raises(RecipeError, match=r"data.extra_resolutions: \[64\] repeats a resolution"):
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, data={"extra_resolutions": [64]}))


def test_the_caption_warm_up_grows_each_caption_from_its_first_tags_as_kohya_does():
    """kohya's token warm-up: after the kept tags, floor(step * (n - min) / warm-up) + min of the rest, in order
    (before shuffling); the trigger always stays; from the warm-up's last step on, the whole caption."""
    import random

    from lorakit.data import transform_caption, warmup_steps
    from lorakit.recipe.sections import DataSection

    data = DataSection(keep_tokens=1, caption_warmup_steps=4, caption_warmup_min=1, trigger="ohwx")
    caption = "ohwx, a, b, c, d"
    grown = [transform_caption(caption, data, random.Random(0), None, (step, 4)) for step in range(6)]
    assert grown == ["ohwx, a", "ohwx, a", "ohwx, a, b", "ohwx, a, b, c", caption, caption]
    late = DataSection(caption_warmup_steps=4, caption_warmup_min=0, trigger="ohwx")
    assert transform_caption("a, b, ohwx", late, random.Random(0), None, (0, 4)) == "ohwx"  # the trigger stays
    assert warmup_steps(DataSection(caption_warmup_steps=0.25), 100) == 25 and warmup_steps(data, 100) == 4
    assert data.tags_vary  # no text-encoder cache while captions grow


def test_a_run_with_a_caption_warm_up_encodes_short_captions_first(
    tiny_base, tiny_dataset, tmp_path, conditioning_calls
):
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    from .tiny import captioned_copy

    data = captioned_copy(tmp_path / "data", "ohwx, red, disc, studio, soft light", tiny_dataset)
    sections = {"data": {"folder": str(data), "caption_warmup_steps": 0.5}, "train": {"max_steps": 4}}
    sections["lora"] = {"train_text_encoder": False}  # frozen encoders: the warm-up must keep their cache off
    train(recipe_from_dict(make_recipe_dict(tiny_base, data, tmp_path / "out", **sections)), quiet=True, log=print)
    tags = [len(call.captions[0].split(", ")) for call in conditioning_calls]
    assert tags == [1, 3, 5, 5]  # floor(step * (5 - 1) / 2) + 1 tags over the two warm-up steps, then all five

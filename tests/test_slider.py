"""Concept sliders ([slider]): a LoRA learned from prompts alone at strengths +1 and -1, which loads everywhere as a
LoRA and draws one end of the slider at a positive strength and the other at a negative one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lorakit.adapters import adapters_disabled, adapters_scaled
from lorakit.errors import RecipeError
from lorakit.recipe import recipe_from_dict
from lorakit.recipe.prompts import parse_sample_prompt
from lorakit.slider import SampleStrengths, partial_denoise, sided_targets
from lorakit.train import train

from .conftest import write_recipe
from .invoke import fails, ok

SLIDER = {"target_class": "a toy", "positive": "a red toy", "negative": "a blue toy", "denoise_steps": 6}
# Two targets, each with its own ends (ai-toolkit's list of targets): one drawn for each latent.
TWO_TARGETS = {
    "target_class": ["a toy", "a disc"],
    "positive": ["a red toy", "a large disc"],
    "negative": ["a blue toy", "a small disc"],
    "denoise_steps": 6,
}


def slider_recipe(base, out, **sections) -> dict:
    """A small slider recipe for the tiny bases: no [data] but the resolution, as a slider reads no images."""
    recipe = {
        "model": {"base": str(base)},
        "data": {"resolution": 32},
        "lora": {"rank": 4, "lora_alpha": 4.0},
        "train": {"max_steps": 4, "batch_size": 2, "unet_lr": 1e-3, "optimizer": "adamw", "seed": 0},
        "output": {"folder": str(out), "name": "slider", "save_dtype": "float32"},
        "slider": dict(SLIDER),
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def _train(recipe: dict, **options):
    lines: list[str] = []
    return train(recipe_from_dict(recipe), quiet=True, log=lines.append, **options), lines


@pytest.fixture(scope="module")
def slider_run(tiny_base, tmp_path_factory, monkeypatch_module):
    """A short slider run on the tiny SD base, saving at step 2 too, with samples at both ends; run from an empty
    folder, to see that it writes nothing outside its run folder."""
    work = tmp_path_factory.mktemp("slider-cwd")
    monkeypatch_module.chdir(work)
    sample = {"prompts": ["a toy --m -2", "a toy", "a toy --m 2"], "steps": 2}
    recipe = slider_recipe(tiny_base, work / "runs", train={"save_every_steps": 2}, sample=sample)
    result, lines = _train(recipe)
    return result, lines, work


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_a_slider_trains_from_prompts_alone_and_says_what_it_learns(slider_run):
    result, lines, work = slider_run
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # no dataset folder, no latent cache
    said = next(line for line in lines if line.startswith("slider: "))
    assert "'a toy' towards 'a red toy' at strength +1 and towards 'a blue toy' at -1" in said
    assert "Text encoder outputs cached for 4 prompts" in "\n".join(lines)
    assert result.steps == 4 and set(result.models) == {"unet"}  # the U-Net alone, unless asked
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and all(row["loss"] > 0 for row in rows)
    factors = load_file(result.adapter)
    assert any(k.endswith("lora_up.weight") and factors[k].abs().max() > 0 for k in factors)
    from safetensors import safe_open

    with safe_open(result.adapter, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["lorakit_slider_positive"] == "a red toy" and metadata["lorakit_slider_negative"] == "a blue toy"
    assert metadata["ss_num_train_images"] == "0" and metadata["ss_network_train_unet_only"] == "True"
    shown = ok(["inspect", str(result.adapter)]).stdout
    assert "  slider: a concept slider: positive strengths draw 'a toy' towards 'a red toy', negative ones" in shown


def test_the_slider_file_loads_in_diffusers_and_draws_as_trained_at_every_strength(slider_run, tiny_base):
    from diffusers import StableDiffusionPipeline

    result = slider_run[0]
    unet = result.models["unet"].eval()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    pipe.load_lora_weights(str(result.adapter), adapter_name="slider")
    drawn = {}
    for strength in (-2.0, -1.0, 0.5, 2.0):
        with torch.no_grad(), adapters_scaled([unet], strength):
            want = unet(latents, torch.tensor([300]), encoder_hidden_states=hidden).sample
        pipe.set_adapters(["slider"], adapter_weights=[strength])
        with torch.no_grad():
            drawn[strength] = pipe.unet(latents, torch.tensor([300]), encoder_hidden_states=hidden).sample
        torch.testing.assert_close(drawn[strength], want, rtol=0, atol=1e-5)
    with torch.no_grad(), adapters_disabled(unet):
        plain = unet(latents, torch.tensor([300]), encoder_hidden_states=hidden).sample
    # the two ends move the base's output in opposite directions
    up, down = drawn[2.0] - plain, drawn[-2.0] - plain
    assert up.abs().max() > 1e-4
    assert torch.nn.functional.cosine_similarity(up.flatten(), down.flatten(), dim=0) < -0.9


def test_generate_draws_a_negative_strength_from_a_prompt_tag_as_from_lora(slider_run, tiny_base, tmp_path):
    from .invoke import generate, pixels

    result = slider_run[0]
    common = ["--base", str(tiny_base), "--size", "32x32", "--steps", "2", "--seed", "0"]
    generate("a toy <lora:slider:-2>", "--lora-dir", str(result.run_dir), *common, "--out", str(tmp_path / "tag"))
    generate("a toy", "--lora", f"{result.adapter}:-2", *common, "--out", str(tmp_path / "option"))
    generate("a toy", "--lora", f"{result.adapter}:2", *common, "--out", str(tmp_path / "up"))
    (tagged,), (given,), (up,) = (sorted((tmp_path / d).glob("000-*.png")) for d in ("tag", "option", "up"))
    assert (pixels(tagged) == pixels(given)).all()
    assert (pixels(given) != pixels(up)).any()


def test_the_samples_show_both_ends_of_the_slider(slider_run):
    from PIL import Image

    result = slider_run[0]
    with Image.open(result.run_dir / "samples" / "step-000004.png") as grid:
        assert grid.size[0] == 3 * grid.size[1]  # three cells: --m -2, 1 and 2
        cells = [grid.crop((i * grid.size[1], 0, (i + 1) * grid.size[1], grid.size[1])) for i in range(3)]
    import numpy as np

    low, middle, high = (np.asarray(cell, dtype=np.int16) for cell in cells)
    assert np.abs(low - high).max() > 0 and np.abs(middle - high).max() > 0


def test_a_resumed_slider_run_equals_a_straight_one(slider_run, tiny_base, tmp_path):
    straight = slider_run[0]
    resumed_dir = tmp_path / "runs" / "slider"
    shutil.copytree(straight.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-000004")
    sample = {"prompts": ["a toy --m -2", "a toy", "a toy --m 2"], "steps": 2}
    recipe = slider_recipe(tiny_base, tmp_path / "runs", train={"save_every_steps": 2}, sample=sample)
    resumed, lines = _train(recipe, resume="latest")
    assert resumed.steps == 4 and any("Resumed from" in line and "step 2" in line for line in lines)
    a, b = load_file(straight.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_recomputes_each_half_at_its_strength(tiny_base, tmp_path):
    """Checkpointed blocks run forward again during the backward pass: at the same strengths, or the gradients
    of the -1 half would be those of +1."""
    plain, _ = _train(slider_recipe(tiny_base, tmp_path / "a", train={"max_steps": 2}))
    checkpointed, _ = _train(
        slider_recipe(tiny_base, tmp_path / "b", train={"max_steps": 2, "gradient_checkpointing": True})
    )
    a, b = load_file(plain.adapter), load_file(checkpointed.adapter)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_strengths_scale_each_sample_of_the_batch_as_a_strength_scales_the_adapter():
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(2), torch.nn.Linear(16, 5))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    model = inject_adapter_in_model(config, model)
    x = torch.randn(1, 3, 4, 4)
    strengths = SampleStrengths([model])
    with torch.no_grad():
        alone = {s: _at(model, x, s) for s in (1.0, -1.0, 0.0, 2.5)}
        strengths.set(torch.tensor([1.0, -1.0, 0.0, 2.5]))
        together = model(torch.cat([x] * 4))
        strengths.clear()
        torch.testing.assert_close(model(x), alone[1.0])
    for index, strength in enumerate((1.0, -1.0, 0.0, 2.5)):
        torch.testing.assert_close(together[index : index + 1], alone[strength], rtol=0, atol=1e-6)
    assert not torch.allclose(alone[1.0], alone[-1.0])
    strengths.set(torch.tensor([1.0, -1.0]))
    with pytest.raises(RuntimeError, match="2 strengths for a batch of 1"):
        model(x)


def _at(model, x, strength):
    with adapters_scaled([model], strength):
        return model(x)


@pytest.mark.parametrize("section", [SLIDER, TWO_TARGETS], ids=["one-target", "two-targets"])
def test_the_slider_learns_its_direction_at_both_ends(tiny_base, tmp_path, section):
    """After training, the adapter's prediction at +1 is nearer the base's prediction moved along positive -
    negative than the base's own is, and at -1 nearer the one moved back, on latents it never trained on; with two
    targets, each along its own ends."""
    from diffusers import DDIMScheduler

    from lorakit.models import encode_prompts, load_base, tokenize
    from lorakit.recipe.sections import SliderSection

    recipe = slider_recipe(tiny_base, tmp_path, train={"max_steps": 40, "unet_lr": 1e-2}, slider=section)
    targets = SliderSection(**{k: v for k, v in section.items() if k != "denoise_steps"}).targets
    result, _ = _train(recipe)
    unet = result.models["unet"].eval()
    base = load_base(str(tiny_base))

    def predict(latents, t, prompt):
        hidden = encode_prompts(base, tokenize(base, [prompt] * latents.shape[0]))["encoder_hidden_states"]
        return unet(latents, torch.full((latents.shape[0],), int(t)), encoder_hidden_states=hidden).sample

    def guided(latents, t, target_class):
        hidden = encode_prompts(base, tokenize(base, [""] + [target_class]))["encoder_hidden_states"]
        return unet(latents, torch.full((2,), int(t)), encoder_hidden_states=hidden).sample

    for target_class, positive_prompt, negative_prompt in targets:
        errors = {1.0: [], -1.0: [], "base": []}
        for seed in range(100, 106):  # seeds no training step drew
            noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad(), adapters_disabled(unet):
                scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
                latents, t = partial_denoise(
                    lambda x, step, prompt=target_class: guided(x, step, prompt), scheduler, noise, 6, 1 + seed % 4
                )
                neutral, positive, negative = (
                    predict(latents, t, prompt) for prompt in (target_class, positive_prompt, negative_prompt)
                )
            wanted = sided_targets(neutral, positive, negative, 1.0).chunk(2)
            with torch.no_grad():
                for strength, target in zip((1.0, -1.0), wanted, strict=True):
                    with adapters_scaled([unet], strength):
                        errors[strength].append(
                            torch.nn.functional.mse_loss(predict(latents, t, target_class), target)
                        )
                errors["base"].append(torch.nn.functional.mse_loss(neutral, wanted[0]))  # the distance to either end
        base_error = torch.stack(errors["base"]).mean()
        for strength in (1.0, -1.0):
            ratio = torch.stack(errors[strength]).mean() / base_error
            assert ratio < 0.7, (target_class, strength, ratio)


def test_shuffle_draws_each_latent_its_own_order_of_the_prompts_parts(tiny_base, tmp_path, monkeypatch):
    import lorakit.train.loop as loop

    seen: list[str] = []
    real = loop.text_conditioning

    def recording(run, captions):
        seen.extend(captions)
        return real(run, captions)

    monkeypatch.setattr(loop, "text_conditioning", recording)
    section = {"positive": "red, shiny, large", "negative": "blue, dull, small", "target_class": "", "shuffle": True}
    _, lines = _train(slider_recipe(tiny_base, tmp_path, slider=section, train={"max_steps": 3}))
    assert not any("Text encoder outputs cached" in line for line in lines)  # encoded every step instead
    positives = {text for text in seen if "red" in text}
    assert all(sorted(text.split(", ")) == ["large", "red", "shiny"] for text in positives)
    assert len(positives) >= 3  # several of the six orders in 3 steps of 2 latents
    assert any(sorted(text.split(", ")) == ["blue", "dull", "small"] for text in seen)


def test_each_latent_draws_one_of_several_targets_whole(tiny_base, tmp_path, monkeypatch):
    import lorakit.train.loop as loop

    seen: list[list[str]] = []
    real = loop.text_conditioning

    def recording(run, captions):
        seen.append(list(captions))
        return real(run, captions)

    monkeypatch.setattr(loop, "text_conditioning", recording)
    result, lines = _train(slider_recipe(tiny_base, tmp_path, slider=TWO_TARGETS, train={"max_steps": 4}))
    said = next(line for line in lines if line.startswith("slider: "))
    assert said.startswith("slider: 2 targets, one drawn for each latent: 'a toy' towards 'a red toy' at strength +1")
    assert "; 'a disc' towards 'a large disc' at strength +1 and towards 'a small disc' at -1" in said
    # each step encodes its latents' target classes, then (target, positive, negative) of each latent: whole rows
    rows = set()
    for captions in seen:
        if len(captions) == 6:  # 2 latents x (target class, positive, negative)
            rows |= set(zip(captions[0:2], captions[2:4], captions[4:6], strict=True))
    assert rows == {("a toy", "a red toy", "a blue toy"), ("a disc", "a large disc", "a small disc")}
    from safetensors import safe_open

    with safe_open(result.adapter, "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["lorakit_slider_positive"]) == ["a red toy", "a large disc"]
    assert "'a disc' towards 'a large disc', negative ones towards 'a small disc'" in metadata["lorakit_slider_note"]


def test_each_target_weighs_its_latents_loss(tiny_base, tmp_path, monkeypatch):
    """slider.weight: each latent's loss at +1 and at -1 counts by its target's weight (ai-toolkit's target weight)."""
    import lorakit.train.loop as loop

    seen: list[tuple[list[str], list[float]]] = []
    captions: list[list[str]] = []
    real_loss, real_text = loop.objective.diffusion_loss, loop.text_conditioning

    def recording_text(run, texts):
        captions.append(list(texts))
        return real_text(run, texts)

    def recording_loss(predicted, target, weights, *args, **kwargs):
        seen.append((captions[-1], weights.tolist()))
        return real_loss(predicted, target, weights, *args, **kwargs)

    monkeypatch.setattr(loop, "text_conditioning", recording_text)
    monkeypatch.setattr(loop.objective, "diffusion_loss", recording_loss)
    section = {**TWO_TARGETS, "weight": [1.0, 0.25]}
    _, lines = _train(slider_recipe(tiny_base, tmp_path, slider=section, train={"max_steps": 4}))
    said = next(line for line in lines if line.startswith("slider: "))
    assert "at -1 (loss weight 1); 'a disc'" in said and "at -1 (loss weight 0.25), learned" in said
    expected = {"a toy": 1.0, "a disc": 0.25}
    drawn = set()
    for texts, weights in seen:  # the trained pass encodes each latent's target class, at +1 then at -1
        assert weights == [expected[text] for text in texts], (texts, weights)
        drawn |= set(texts)
    assert drawn == set(expected)
    with pytest.raises(RecipeError, match="slider.weight: 3 weights for 2 targets"):
        recipe_from_dict(slider_recipe(tiny_base, tmp_path, slider={**TWO_TARGETS, "weight": [1.0, 1.0, 1.0]}))


def test_a_prompt_cut_short_is_said(tiny_base, tmp_path):
    long = ", ".join(["a red toy"] * 40)
    _, lines = _train(slider_recipe(tiny_base, tmp_path, slider={"positive": long}, train={"max_steps": 1}))
    said = [line for line in lines if line.startswith("slider.positive:")]
    assert len(said) == 1 and "the rest is cut off" in said[0] and "data.max_token_length = 150" in said[0]
    assert not any(line.startswith(("slider.negative:", "slider.target_class:")) for line in lines)


def test_extra_resolutions_draw_each_step_at_one_of_the_sizes(tiny_base, tmp_path, monkeypatch):
    import lorakit.slider as slider_module
    from lorakit.plan import plan

    sides: list[int] = []
    real = slider_module.partial_denoise

    def recording(predict, scheduler, latents, steps, taken):
        sides.append(latents.shape[-1])
        return real(predict, scheduler, latents, steps, taken)

    monkeypatch.setattr(slider_module, "partial_denoise", recording)
    recipe = slider_recipe(tiny_base, tmp_path, data={"extra_resolutions": [64]}, train={"max_steps": 6})
    _, lines = _train(recipe)
    assert set(sides) == {8, 16} and len(sides) == 6  # 32 and 64 px (the tiny VAE halves twice)
    assert any("learned from prompts at 32, 64 px square" in line for line in lines)
    assert plan(recipe_from_dict(recipe)).memory.bucket == (64, 64)


def test_an_sdxl_slider_trains_the_unet_with_its_size_conditioning(tiny_sdxl, tmp_path):
    result, lines = _train(slider_recipe(tiny_sdxl, tmp_path, train={"max_steps": 2}))
    assert set(result.models) == {"unet"}
    factors = load_file(result.adapter)
    assert factors and all(k.startswith("lora_unet_") for k in factors)
    assert any(k.endswith("lora_up.weight") and factors[k].abs().max() > 0 for k in factors)


def test_a_slider_may_train_the_text_encoder_too(tiny_base, tmp_path):
    result, lines = _train(slider_recipe(tiny_base, tmp_path, lora={"train_text_encoder": True}))
    assert set(result.models) == {"unet", "text_encoder"}
    assert not any("Text encoder outputs cached" in line for line in lines)
    factors = load_file(result.adapter)
    assert any(
        k.startswith("lora_te_") and k.endswith("lora_up.weight") and factors[k].abs().max() > 0 for k in factors
    )


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"slider": {"positive": "a toy", "negative": " a toy"}}, "slider.positive: the same as slider.negative"),
        ({"slider": {"positive": "", "negative": ""}}, "(both empty)"),
        (
            {"lora": {"type": "lokr"}},
            'lora.type: a slider is a LoRA whose strength -1 is the opposite of +1; set lora.type = "lora"',
        ),
        ({"lora": {"use_dora": True}}, "lora.use_dora: DoRA's magnitude does not flip with the strength"),
        ({"data": {"folder": "photos"}}, "data.folder: a [slider] trains from its prompts, with no images"),
        ({"data": {"flip": True}}, "data.flip: a [slider] trains from its prompts"),
        ({"train": {"max_epochs": 3}}, "train.max_epochs: not with [slider]: it has no images to count epochs of"),
        ({"train": {"timestep_bias": "later"}}, "train.timestep_bias: not with [slider]: its timestep is where"),
        ({"train": {"adaptive_noise_scale": 0.01, "noise_offset": 0.05}}, "train.adaptive_noise_scale: not with"),
        ({"prior": {"class_dir": "c", "class_prompt": "a toy"}}, "prior: a [slider] trains from its prompts"),
        ({"preservation": {"class_word": "toy"}}, "preservation: a [slider] trains from its prompts"),
        ({"sample": {"every_epochs": 1}}, "sample.every_epochs: a [slider] has no epochs"),
        ({"slider": {"denoise_steps": 2}}, "slider.denoise_steps"),
        ({"slider": {"negative": "<lora:other:1> a toy"}}, "slider.negative: the webui tag <lora:other:1> would be"),
        ({"slider": {"guidance": 0}}, "slider.guidance"),
        ({"slider": {**TWO_TARGETS, "negative": ["a"]}}, "slider: lists of target_class 2, positive 2, negative 1"),
        ({"slider": {"positive": []}}, "slider.positive: the list is empty; give one prompt per target"),
        (
            {"slider": {**TWO_TARGETS, "negative": ["a blue toy", "a large disc"]}},
            "slider.positive: target 2 ('a disc'): the same as slider.negative",
        ),
    ],
)
def test_settings_a_slider_cannot_use_are_refused_by_name(tiny_base, tmp_path, sections, fragment):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(slider_recipe(tiny_base, tmp_path, **sections))
    assert fragment in str(err.value)


def test_a_bad_slider_recipe_exits_2_with_its_message(tiny_base, tmp_path):
    path = write_recipe(tmp_path / "slider.toml", slider_recipe(tiny_base, tmp_path, lora={"type": "loha"}))
    fails(["train", str(path)], "lora.type: a slider is a LoRA")
    assert not (tmp_path / "slider").exists()


def test_the_strength_of_a_sample_prompt_is_read_and_checked():
    assert parse_sample_prompt("a toy --m -2.5 --d 3").strength == -2.5
    assert parse_sample_prompt("a toy").strength is None
    for text, message in [("a toy --m x", "--m 'x' is not a number"), ("a toy --m 101", "--m 101 is outside -100")]:
        with pytest.raises(ValueError, match=message):
            parse_sample_prompt(text)


def test_the_planner_counts_both_strengths_and_no_images(tiny_base, tmp_path):
    from lorakit.plan import plan, plan_lines

    path = write_recipe(tmp_path / "slider.toml", slider_recipe(tiny_base, tmp_path))
    lines = "\n".join(ok(["plan", str(path), "--vram", "8"]).stdout.splitlines())
    assert "a [slider] draws its latents at data.resolution, square" in lines
    assert "activations, batch 2 x2 ([slider]: +1 and -1) at 32x32" in lines
    assert "latent caching" not in lines and "latent cache 0.0 MiB" in lines
    assert "a [slider] step is about 4.7 plain steps' work" in lines  # 2 + (6 + 2) / 3
    sliding = plan(recipe_from_dict(slider_recipe(tiny_base, tmp_path)), vram=8)
    plain = dict(slider_recipe(tiny_base, tmp_path))
    del plain["slider"]
    unsliding = plan(recipe_from_dict(plain), vram=8)
    assert sliding.seconds_per_step() == pytest.approx(unsliding.seconds_per_step() * (2 + 8 / 3))
    checkpointed = slider_recipe(tiny_base, tmp_path, train={"gradient_checkpointing": True})
    assert "about 4.0 plain steps' work" in "\n".join(plan_lines(plan(recipe_from_dict(checkpointed))))
    assert "  text caching" in "\n".join(plan_lines(sliding))  # fixed prompts: encoded once, the encoders leave
    shuffling = plan(recipe_from_dict(slider_recipe(tiny_base, tmp_path, slider={"shuffle": True})), vram=8)
    shuffled_lines = "\n".join(plan_lines(shuffling))
    assert "  text caching" not in shuffled_lines and "resident: slider prompts shuff" in shuffled_lines


@pytest.mark.slow
def test_a_background_slider_on_the_toy_world_draws_each_end_and_keeps_the_base_at_0(tmp_path):
    """On the real toy base (built once per machine, ~8 min): a slider from white to black backgrounds, learned from
    prompts alone, turns gray-background prompts black at +2 and white at -2 (README: measured 1.00 and 1.00)."""
    from lorakit.toy.build import build_toy_base
    from lorakit.toy.evaluate import slider_backgrounds

    base = build_toy_base(quiet=True, log=lambda _: None)
    recipe = {
        "model": {"base": str(base)},
        "data": {"resolution": 16},
        "lora": {"rank": 4, "lora_alpha": 4.0},
        "train": {"max_steps": 60, "batch_size": 4, "unet_lr": 1e-3, "optimizer": "adamw", "save_every_steps": 0},
        "output": {"folder": str(tmp_path), "name": "background", "save_dtype": "float32"},
        "slider": {"positive": "black background", "negative": "white background", "denoise_steps": 20},
    }
    result, _ = _train(recipe)
    shares = slider_backgrounds(base, result.adapter, (-2.0, 0.0, 2.0))
    assert shares[0.0]["gray"] >= 0.9 and shares[0.0]["colour kept"] >= 0.9, shares
    assert shares[2.0]["black"] >= 0.9 and shares[2.0]["colour kept"] >= 0.9, shares
    assert shares[-2.0]["white"] >= 0.9, shares


# ---- image sliders: data.adapter_strength ----------------------------------------------------------------------


def test_a_folder_at_strength_minus_1_trains_the_mirror_image_of_the_same_folder_at_plus_1(
    tiny_base, tiny_dataset, tmp_path
):
    """At -1 the adapter's output is negated, so every gradient of the up projections is too, and AdamW's steps
    (decay included) with them: the run at -1 ends with the same down projections and negated up projections, bit for
    bit, of the run at +1."""
    from .conftest import make_recipe_dict

    plain = train(recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "a")), quiet=True, log=print)
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "b", data={"adapter_strength": -1.0})
    lines: list[str] = []
    mirrored = train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    a, b = load_file(plain.adapter), load_file(mirrored.adapter)
    assert a.keys() == b.keys() and any(k.startswith("lora_te_") for k in a)
    for key in a:
        if key.endswith("lora_up.weight"):
            assert torch.equal(b[key], -a[key]) and a[key].abs().max() > 0, key
        else:
            assert torch.equal(b[key], a[key]), key
    assert "data.adapter_strength: the adapter trains at -1 on" in "\n".join(lines)


def test_each_image_trains_at_its_folders_strength(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    from lorakit.slider import SampleStrengths

    from .conftest import make_recipe_dict

    second = tmp_path / "before"
    shutil.copytree(tiny_dataset, second, ignore=shutil.ignore_patterns(".cache"))
    seen: list[list[float]] = []
    real = SampleStrengths.set

    def recording(self, values):
        seen.append(values.tolist())
        real(self, values)

    monkeypatch.setattr(SampleStrengths, "set", recording)
    data = {"folder": [str(tiny_dataset), str(second)], "adapter_strength": [1.0, -1.0]}
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", data=data, train={"max_steps": 6})
    lines: list[str] = []
    result = train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    count = len((tiny_dataset / "metadata.jsonl").read_text().splitlines())
    assert f"data.adapter_strength: the adapter trains at -1 on {count} images, +1 on {count} images" in lines
    assert len(seen) == 6 and {v for batch in seen for v in batch} == {1.0, -1.0}
    from safetensors import safe_open

    with safe_open(result.adapter, "pt") as handle:
        recorded = json.loads(handle.metadata()["lorakit_adapter_strengths"])
    assert recorded == {tiny_dataset.name: 1.0, "before": -1.0}
    shown = ok(["inspect", str(result.adapter)]).stdout
    assert "  image slider: trained at these strengths by folder: {" in shown


@pytest.mark.parametrize(
    ("data", "sections", "fragment"),
    [
        ({"adapter_strength": [1.0, -1.0]}, {}, "data.adapter_strength: 2 values for 1 folders"),
        ({"adapter_strength": 0.0}, {}, "data.adapter_strength: 0 switches the adapter off"),
        ({"adapter_strength": -1.0}, {"lora": {"type": "lokr"}}, "which LoKr does not have as one factor"),
        ({"adapter_strength": -1.0}, {"lora": {"use_dora": True}}, "which DoRA does not have as one factor"),
        ({"adapter_strength": -1.0}, {"preservation": {"class_word": "toy"}}, "not with [preservation]"),
        ({"adapter_strength": 101.0}, {}, "data.adapter_strength"),
        (
            {"adapter_strength": -1.0},
            {"embedding": {"token": "ohwx", "only": True}, "lora": {}, "train": {"unet_lr": 1e-4}},
            "data.adapter_strength: sets the strength of a LoRA, and embedding.only trains none",
        ),
    ],
)
def test_adapter_strengths_that_cannot_train_are_refused(tiny_base, tiny_dataset, tmp_path, data, sections, fragment):
    from .conftest import make_recipe_dict

    with pytest.raises(RecipeError) as err:
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, data=data, **sections))
    assert fragment in str(err.value)


def _paired_folders(tiny_dataset, tmp_path):
    """The tiny dataset and a copy of it under another folder name: every photo has its namesake."""
    second = tmp_path / "without"
    shutil.copytree(tiny_dataset, second, ignore=shutil.ignore_patterns(".cache"), dirs_exist_ok=True)
    return [str(tiny_dataset), str(second)]


def _paired_recipe(tiny_base, tiny_dataset, tmp_path, out, **data):
    from .conftest import make_recipe_dict

    folders = _paired_folders(tiny_dataset, tmp_path)
    data = {"folder": folders, "adapter_strength": [1.0, -1.0], "pairs": True, "flip": True, **data}
    return make_recipe_dict(
        tiny_base, tiny_dataset, out, data=data, train={"max_steps": 4, "batch_size": 4, "save_every_steps": 2}
    )


def test_a_pair_trains_side_by_side_with_one_noise_timestep_and_flip(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    import lorakit.train.loop as loop
    from lorakit.data import LatentCache
    from lorakit.files import photo_stem

    drawn, read, strengths, runs = [], [], [], []
    real_target, real_get, real_set = loop.objective.training_target, LatentCache.get, SampleStrengths.set
    real_step = loop.optimizer_step

    def recording_target(scheduler, latents, noise, timesteps, prediction_type):
        drawn.append((noise.clone(), timesteps.clone()))
        return real_target(scheduler, latents, noise, timesteps, prediction_type)

    def recording_get(self, index, flip):
        read.append((runs[-1].items[index], flip))
        return real_get(self, index, flip)

    monkeypatch.setattr(loop.objective, "training_target", recording_target)
    monkeypatch.setattr(LatentCache, "get", recording_get)
    monkeypatch.setattr(loop, "optimizer_step", lambda run: runs.append(run) or real_step(run))
    monkeypatch.setattr(SampleStrengths, "set", lambda self, v: strengths.append(v.tolist()) or real_set(self, v))
    recipe = _paired_recipe(tiny_base, tiny_dataset, tmp_path, tmp_path / "runs")
    result, lines = _train(recipe)
    count = len((tiny_dataset / "metadata.jsonl").read_text().splitlines())
    assert any(line.startswith(f"data.pairs: {count} pairs of namesakes, +1 from ") for line in lines), lines
    sizes = [len(values) for values in strengths]  # a bucket with an odd number of pairs ends in a batch of one
    assert len(sizes) == 4 and all(values == [1.0, -1.0] * (len(values) // 2) for values in strengths)
    assert 4 in sizes
    for noise, timesteps in drawn:
        assert torch.equal(noise[0::2], noise[1::2]) and torch.equal(timesteps[0::2], timesteps[1::2])
        assert len(noise) == 2 or not torch.equal(noise[0], noise[2])  # two pairs, two draws
    pairs = [(read[i], read[i + 1]) for i in range(0, len(read), 2)]
    assert len(read) == sum(sizes) and {flip for (_, flip), _ in pairs} == {True, False}
    for (first, flip), (second, second_flip) in pairs:
        assert photo_stem(first.path) == photo_stem(second.path) and flip == second_flip
        assert first.folder == str(tiny_dataset) and second.folder == str(tmp_path / "without")
    # resumed from step 2, the run takes the same pairs, noise and steps as the straight one
    resumed_dir = tmp_path / "resumed" / "run"
    shutil.copytree(result.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-000004")
    read.clear()
    resumed, _ = _train(_paired_recipe(tiny_base, tiny_dataset, tmp_path, tmp_path / "resumed"), resume="latest")
    tail = [item for pair in pairs[sum(sizes[:2]) // 2 :] for item, _ in pair]  # steps 3 and 4
    assert len(read) == len(tail) == sum(sizes[2:])
    assert [photo_stem(item.path) for item, _ in read] == [photo_stem(item.path) for item in tail]
    a, b = load_file(result.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_photo_without_its_namesake_is_named_and_exits_2(tiny_base, tiny_dataset, tmp_path):
    recipe = _paired_recipe(tiny_base, tiny_dataset, tmp_path, tmp_path / "runs")
    metadata = tmp_path / "without" / "metadata.jsonl"
    rows = metadata.read_text().splitlines()
    metadata.write_text("\n".join(rows[1:]) + "\n")
    name = json.loads(rows[0])["file_name"].split("/")[-1]
    path = write_recipe(tmp_path / "r.toml", recipe)
    fails(["train", str(path)], f"data.pairs: {name} in {tiny_dataset} has no photo of the same name")
    assert not (tmp_path / "runs" / "run").exists()


@pytest.mark.parametrize(
    ("data", "sections", "fragment"),
    [
        ({"folder": "ONE"}, {}, "data.pairs: pairs the photos of two folders, and data.folder names 1"),
        ({"adapter_strength": [1.0, 1.0]}, {}, "data.pairs: both folders train at the same adapter strength"),
        ({"num_repeats": [1, 2]}, {}, "data.pairs: data.num_repeats [1, 2] would show one photo of a pair"),
        ({}, {"train": {"batch_size": 3}}, "data.pairs: train.batch_size 3 cannot hold whole pairs"),
        ({}, {"validation": {"split": 0.2}}, "data.pairs: validation.split would hold out one photo of a pair"),
        ({}, {"prior": {"class_dir": "x", "class_prompt": "toy"}}, "data.pairs: [prior]'s class images have no pair"),
    ],
)
def test_pairs_that_cannot_train_are_refused(tiny_base, tiny_dataset, tmp_path, data, sections, fragment):
    recipe = _paired_recipe(tiny_base, tiny_dataset, tmp_path, tmp_path / "runs")
    if data.get("folder") == "ONE":
        data = {"folder": str(tiny_dataset), "adapter_strength": -1.0}
    recipe["data"].update(data)
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(recipe)
    assert fragment in str(err.value)


def test_an_epoch_of_pairs_shows_every_pair_its_repeats_as_neighbours():
    from pathlib import Path

    from lorakit.data import Item, epoch_batches

    def item(folder, name, bucket=(64, 64)):
        return Item(Path(folder) / f"images/{name}_0123abcd.png", "", "", bucket, bucket, 2, folder=folder)

    items = [item("a", f"p{i}", (64, 64) if i % 2 else (80, 48)) for i in range(5)]
    items += [item("b", f"p{i}", (64, 64) if i % 2 else (80, 48)) for i in range(5)]
    partners = {i: i + 5 for i in range(5)}
    batches = epoch_batches(items, batch_size=4, seed=3, epoch=1, partners=partners)
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == sorted(list(range(10)) * 2)  # each image its two repeats
    for batch in batches:
        assert len(batch) in (2, 4) and len({items[i].bucket for i in batch}) == 1
        assert all(partners[batch[k]] == batch[k + 1] for k in range(0, len(batch), 2))
    assert epoch_batches(items, batch_size=4, seed=3, epoch=2, partners=partners) != batches


@pytest.mark.slow
@pytest.mark.parametrize(("pairs", "red", "blue"), [(False, 0.6, 0.45), (True, 0.5, 0.5)], ids=["unpaired", "pairs"])
def test_an_image_slider_on_the_toy_world_draws_one_colour_at_plus_1_and_the_other_at_minus_1(
    tmp_path, pairs, red, blue
):
    """On the real toy base: the same 12 scenes with a red ball at +1 and a blue one at -1, captioned alike ("a
    ball on the left, white background"); "a ball" then draws red at +1 and blue at -1, where the base draws mostly
    yellow (README: measured red 0.71 and blue 0.54 of 24 pictures, base red 0.12, blue 0.00; with data.pairs red
    0.62 and blue 0.71)."""
    from lorakit.prepare import PrepareOptions, prepare
    from lorakit.toy import write_slider_pairs
    from lorakit.toy.build import build_toy_base
    from lorakit.toy.evaluate import render_set, toy_pipeline
    from lorakit.toy.world import BACKGROUNDS, SIDES, caption, detect

    base = build_toy_base(quiet=True, log=lambda _: None)
    folders = []
    for photos in write_slider_pairs(tmp_path / "photos"):
        options = PrepareOptions(resolution=16, bucket_step=4, workers=1, keep_duplicates=True)
        prepare(photos, tmp_path / "data" / photos.name, options, quiet=True, log=lambda _: None)
        folders.append(str(tmp_path / "data" / photos.name))
    recipe = {
        "model": {"base": str(base)},
        "data": {
            "folder": folders,
            "resolution": 16,
            "adapter_strength": [1.0, -1.0],
            "num_repeats": 4,
            "pairs": pairs,
        },
        "lora": {"rank": 4, "lora_alpha": 4.0, "train_text_encoder": False},
        "train": {"max_steps": 200, "batch_size": 4, "unet_lr": 1e-3, "optimizer": "adamw", "save_every_steps": 0},
        "output": {"folder": str(tmp_path / "runs"), "name": "colour", "save_dtype": "float32"},
    }
    result, _ = _train(recipe)
    prompts = [caption("", side, background, subject="a ball") for side in SIDES for background in BACKGROUNDS]
    shares = {}
    for strength in (-1.0, 0.0, 1.0):
        pipe = toy_pipeline(base, result.adapter if strength else None, strength=strength)
        found = [detect(image)["colour"] for image in render_set(pipe, prompts, [0, 1, 2, 3])]
        shares[strength] = {colour: found.count(colour) / len(found) for colour in ("red", "blue")}
    assert shares[0.0]["red"] <= 0.2 and shares[0.0]["blue"] == 0, shares
    assert shares[1.0]["red"] >= red and shares[1.0]["blue"] == 0, shares
    assert shares[-1.0]["blue"] >= blue and shares[-1.0]["red"] == 0, shares


def test_toy_pairs_are_the_same_scenes_in_two_colours_and_never_overwrite(tmp_path):
    import numpy as np
    from PIL import Image

    from lorakit.toy.world import detect

    red, blue = (tmp_path / "pairs" / name for name in ("red", "blue"))
    assert ok(["toy", "pairs", str(tmp_path / "pairs"), "--count", "4"]).stdout.split() == [str(red), str(blue)]
    for index in range(4):
        name = f"photo_{index:03d}"
        assert (red / f"{name}.txt").read_text() == (blue / f"{name}.txt").read_text()
        assert (red / f"{name}.txt").read_text().startswith("a ball on the")
        with Image.open(red / f"{name}.png") as a, Image.open(blue / f"{name}.png") as b:
            assert (detect(a)["colour"], detect(b)["colour"]) == ("red", "blue")
            assert (detect(a)["side"], detect(a)["background"]) == (detect(b)["side"], detect(b)["background"])
            changed = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max(axis=2) > 0
            assert 0 < changed.mean() < 0.5  # the ball changed, the background did not
    fails(["toy", "pairs", str(tmp_path / "pairs")], "pairs/red: exists")
    assert len(list(red.iterdir())) == 8

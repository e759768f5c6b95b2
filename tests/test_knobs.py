"""Each kohya-style knob changes what training does, checked where it acts (so removing one fails a test)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lorakit.data import transform_caption
from lorakit.recipe import DataSection, recipe_from_dict
from lorakit.train import train
from lorakit.trigger import contains_trigger, with_trigger

from .conftest import make_recipe_dict
from .tiny import captioned_copy

CAPTION = "ohwx person, red shirt, smiling, outdoors, portrait"


def _many(section: DataSection, n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [transform_caption(CAPTION, section, rng) for _ in range(n)]


def test_caption_dropout_empties_about_that_share_of_captions():
    dropped = _many(DataSection(caption_dropout=0.25)).count("")
    assert 70 < dropped < 130  # 25 % of 400, give or take
    assert _many(DataSection(caption_dropout=0.0)).count("") == 0


def test_shuffle_tags_keeps_the_first_keep_tokens_in_place():
    shuffled = _many(DataSection(shuffle_tags=True, keep_tokens=1))
    assert all(c.startswith("ohwx person, ") for c in shuffled)  # the trigger stays first
    assert len(set(shuffled)) > 10  # the rest moves
    assert all(sorted(c.split(", ")) == sorted(CAPTION.split(", ")) for c in shuffled)  # nothing lost
    assert len({c.split(", ")[0] for c in _many(DataSection(shuffle_tags=True, keep_tokens=0))}) > 1
    assert set(_many(DataSection(shuffle_tags=False))) == {CAPTION}


def test_tag_dropout_leaves_out_each_tag_at_its_rate_but_never_the_trigger_or_kept_tags():
    section = DataSection(caption_dropout_tags=0.3, trigger="ohwx person", keep_tokens=0)
    captions = _many(section)
    assert all(contains_trigger(c, "ohwx person") for c in captions)  # the trigger is never dropped
    for tag in ("red shirt", "smiling", "outdoors", "portrait"):
        kept = sum(tag in c.split(", ") for c in captions)
        assert 240 < kept < 320, tag  # 70 % of 400, give or take
    assert all(c.split(", ")[0] == "ohwx person" for c in captions)  # no shuffle asked: order kept
    kept_first = _many(DataSection(caption_dropout_tags=0.9, keep_tokens=2))
    assert all(c.startswith("ohwx person, red shirt") for c in kept_first)
    assert set(_many(DataSection(caption_dropout_tags=0.0))) == {CAPTION}


def test_tag_dropout_keeps_the_text_encoders_out_of_the_text_cache(tiny_base, tiny_dataset, tmp_path):
    lines: list[str] = []
    recipe = make_recipe_dict(
        tiny_base,
        tiny_dataset,
        tmp_path / "out",
        data={"caption_dropout_tags": 0.5},
        lora={"train_text_encoder": False},
        train={"max_steps": 1},
    )
    train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert not any(line.startswith("Text encoder outputs cached") for line in lines)  # captions change every step
    lines.clear()
    recipe["data"]["caption_dropout_tags"] = 0.0
    train(recipe_from_dict(recipe), overwrite=True, quiet=True, log=lines.append)
    assert any(line.startswith("Text encoder outputs cached") for line in lines)


def test_keep_tokens_separator_fixes_the_front_and_the_end_and_disappears():
    from lorakit.data import split_fixed_tags

    raw = "1girl, red hair ||| smiling, outdoors, hat, scarf ||| best quality, masterpiece"
    caption, fixed = split_fixed_tags(with_trigger(raw, "ohwx"), "|||")
    assert caption == "ohwx, 1girl, red hair, smiling, outdoors, hat, scarf, best quality, masterpiece"
    assert fixed == (3, 2)
    assert split_fixed_tags("ohwx, smiling", "|||") == ("ohwx, smiling", None)  # keep_tokens applies there
    section = DataSection(trigger="ohwx", shuffle_tags=True, caption_dropout_tags=0.3, keep_tokens=1)
    rng = random.Random(0)
    seen = [transform_caption(caption, section, rng, fixed).split(", ") for _ in range(300)]
    assert all(
        tags[:3] == ["ohwx", "1girl", "red hair"] and tags[-2:] == ["best quality", "masterpiece"] for tags in seen
    )
    middles = {tuple(tags[3:-2]) for tags in seen}
    assert len(middles) > 20 and any(len(m) < 4 for m in middles)  # the middle shuffles and drops out
    assert not any("|||" in ", ".join(tags) for tags in seen)


def test_keep_tokens_separator_reaches_the_training_captions(tiny_base, tiny_dataset, tmp_path, monkeypatch):

    import lorakit.train.loop as loop

    data = captioned_copy(tmp_path / "data", "toy ||| red, round, small, plain ||| photo", tiny_dataset)
    captions = []
    real = loop.transform_caption
    monkeypatch.setattr(loop, "transform_caption", lambda *a: captions.append(real(*a)) or captions[-1])
    recipe = make_recipe_dict(
        tiny_base,
        data,
        tmp_path / "out",
        train={"max_steps": 6},
        data={"keep_tokens_separator": "|||", "shuffle_tags": True},
    )
    train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    assert len(captions) >= 6 and len(set(captions)) > 2  # 6 steps of batches of 1 or 2
    assert all(c.startswith("ohwx, toy, ") and c.endswith(", photo") and "|||" not in c for c in captions)


def test_secondary_separator_moves_and_drops_its_tags_together_and_becomes_a_comma():
    from lorakit.data import steady_caption

    caption = "ohwx, red hair;;;long hair, smiling, outdoors, hat"
    section = DataSection(trigger="ohwx", shuffle_tags=True, caption_dropout_tags=0.3, secondary_separator=";;;")
    rng = random.Random(0)
    seen = [transform_caption(caption, section, rng) for _ in range(300)]
    assert not any(";;;" in c for c in seen)
    for tags in ([t.strip() for t in c.split(",")] for c in seen):  # both there, in this order, or both dropped
        assert ("red hair" in tags) == ("long hair" in tags)
        assert "red hair" not in tags or tags.index("long hair") == tags.index("red hair") + 1
    assert 0 < sum("red hair" in c for c in seen) < 300 and len(set(seen)) > 20
    plain = DataSection(secondary_separator=";;;")
    assert transform_caption(caption, plain, random.Random(0)) == caption.replace(";;;", ",")
    assert steady_caption(caption, plain) == caption.replace(";;;", ",")


def test_secondary_separator_reaches_the_text_encoder_and_its_cache(
    tiny_base, tiny_dataset, tmp_path, conditioning_calls
):
    data = captioned_copy(tmp_path / "data", "toy, red;;;round, small", tiny_dataset)
    # a frozen text encoder and fixed tags: the captions are encoded once, into the cache, with the commas
    recipe = make_recipe_dict(
        tiny_base,
        data,
        tmp_path / "out",
        train={"max_steps": 2},
        lora={"train_text_encoder": False},
        data={"secondary_separator": ";;;"},
    )
    lines: list[str] = []
    train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    encoded = [caption for call in conditioning_calls for caption in call.captions]
    assert set(encoded) == {"ohwx, toy, red,round, small"}
    assert any(line.startswith("Text encoder outputs cached for 1 captions") for line in lines)


@pytest.mark.parametrize("separator", [" ", ",,"])
def test_a_keep_tokens_separator_that_cannot_mark_tags_is_refused(separator):
    from lorakit.errors import RecipeError

    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({"model": {"base": "x/y"}, "data": {"keep_tokens_separator": separator}})
    assert "data.keep_tokens_separator: " in str(caught.value) and 'such as "|||"' in str(caught.value)


def test_the_trigger_rule_is_whole_words():
    assert contains_trigger("a photo of SKS, red", "sks")
    assert not contains_trigger("tasks and sksx", "sks")
    assert with_trigger("photo of tasks", "sks") == "sks, photo of tasks"
    assert with_trigger("a sks ball", "sks") == "a sks ball"
    assert with_trigger("", "sks") == "sks"


def _step_gradients(base, dataset, out, monkeypatch, **train_section):
    """The gradient of the first U-Net LoRA tensor just before each optimizer step."""
    seen = []
    real_step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["params"][0].grad.clone())
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    recipe = make_recipe_dict(base, dataset, out, train={"max_steps": 2, **train_section})
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    monkeypatch.undo()
    return seen, result


def test_max_grad_norm_clips_the_gradient(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    free, _ = _step_gradients(tiny_base, tiny_dataset, tmp_path / "a", monkeypatch, max_grad_norm=0.0)
    clipped, _ = _step_gradients(tiny_base, tiny_dataset, tmp_path / "b", monkeypatch, max_grad_norm=1e-6)
    assert free[1].norm() > 1e-5 and clipped[1].norm() < free[1].norm() / 10


def test_lr_warmup_starts_the_learning_rate_low(tiny_base, tiny_dataset, tmp_path):
    import json

    recipe = make_recipe_dict(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 3, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2, "unet_lr": 1e-3},
    )
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_unet"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_flip_mirrors_about_half_the_images(tiny_base, tiny_dataset, tmp_path, conditioning_calls):
    train(
        recipe_from_dict(
            make_recipe_dict(tiny_base, tiny_dataset, tmp_path, data={"flip": True}, train={"max_steps": 8})
        ),
        quiet=True,
        log=lambda _: None,
    )
    flips = [flip for call in conditioning_calls for flip in call.flips]
    assert 0 < sum(flips) < len(flips)


def test_prior_loss_weight_scales_the_class_images_loss(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    import lorakit.train.loop as loop

    weights = []
    real = loop.objective.diffusion_loss

    def recording(prediction, target, weight, *args):
        weights.extend(weight.tolist())
        return real(prediction, target, weight, *args)

    monkeypatch.setattr(loop.objective, "diffusion_loss", recording)
    recipe = make_recipe_dict(
        tiny_base,
        tiny_dataset,
        tmp_path / "out",
        train={"max_steps": 6},
        prior={
            "class_dir": str(tmp_path / "class"),
            "class_prompt": "a toy",
            "num_class_images": 2,
            "prior_loss_weight": 0.25,
        },
        sample={"steps": 1},
    )
    train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    assert set(weights) == {1.0, 0.25}  # instance images at 1, class images at the prior weight


def test_the_ema_follows_its_formula_step_by_step(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    """The exported EMA equals shadow_k = shadow_(k-1) + (1 - d_k)(p_k - shadow_(k-1)), d_k = min(decay, (1+k)/(10+k)),
    from the zero-initialised up factor, over the weights each optimizer step left."""
    from safetensors.torch import load_file

    import lorakit.train.loop as loop

    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight"
    trajectory = []
    real_step = loop.optimizer_step

    def recording(run):
        loss = real_step(run)
        trajectory.append(dict(run.unwrapped()["unet"].named_parameters())[name].detach().clone())
        return loss

    monkeypatch.setattr(loop, "optimizer_step", recording)
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 3, "ema_decay": 0.9})
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    shadow = torch.zeros_like(trajectory[0])
    for step, weights in enumerate(trajectory, start=1):
        decay = min(0.9, (1 + step) / (10 + step))
        shadow = shadow + (1 - decay) * (weights - shadow)
    exported = load_file(result.diffusers_adapter)["unet." + name.replace(".default", "")]
    assert shadow.abs().sum() > 0
    torch.testing.assert_close(exported, shadow, atol=1e-6, rtol=1e-5)


def test_the_noise_knobs_reach_the_training_step(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    """Multi-resolution noise, input perturbation and the debiased weights are each used by the step: the U-Net's
    input is noised with the perturbed noise, while the target is the unperturbed one."""
    import json

    from diffusers import DDPMScheduler

    import lorakit.train.loop as loop

    seen: dict = {}
    real_noise, real_perturbed = loop.objective.sample_noise, loop.objective.perturbed_noise
    real_target, real_weights = loop.objective.training_target, loop.objective.loss_weights
    real_add_noise = DDPMScheduler.add_noise

    def noise(shape, offset, generator, iterations, discount, **offset_options):
        seen["multires"] = (iterations, discount)
        return real_noise(shape, offset, generator, iterations, discount, **offset_options)

    def perturbed(noise, gamma, generator, random_strength):
        seen["random_strength"] = random_strength
        seen["perturbed"] = (noise, real_perturbed(noise, gamma, generator, random_strength))
        return seen["perturbed"][1]

    def target(scheduler, latents, noise, timesteps, prediction_type):
        seen["target_noise"] = noise
        return real_target(scheduler, latents, noise, timesteps, prediction_type)

    def weights(scheduler, timesteps, gamma, prediction_type, debiased, v_like_noise, v_like_loss):
        seen["debiased"], seen["v_like_loss"] = debiased, v_like_loss
        return real_weights(scheduler, timesteps, gamma, prediction_type, debiased, v_like_noise, v_like_loss)

    def add_noise(self, latents, noise, timesteps):
        seen["noised_with"] = noise
        return real_add_noise(self, latents, noise, timesteps)

    for name, function in [
        ("sample_noise", noise),
        ("perturbed_noise", perturbed),
        ("training_target", target),
        ("loss_weights", weights),
    ]:
        monkeypatch.setattr(loop.objective, name, function)
    monkeypatch.setattr(DDPMScheduler, "add_noise", add_noise)
    knobs = {"multires_noise_iterations": 4, "multires_noise_discount": 0.2, "ip_noise_gamma": 0.1}
    knobs |= {"ip_noise_gamma_random_strength": True, "v_pred_like_loss": 0.3}
    recipe = make_recipe_dict(
        tiny_base, tiny_dataset, tmp_path, train={"max_steps": 1, "debiased_estimation": True, **knobs}
    )
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    assert seen["multires"] == (4, 0.2) and seen["debiased"] is True and seen["v_like_loss"] == 0.3
    original, noised_with = seen["perturbed"]
    assert seen["noised_with"] is noised_with and seen["target_noise"] is original
    assert seen["random_strength"] is True and 0 < float((noised_with - original).std()) < 0.1
    from safetensors import safe_open

    with safe_open(str(result.adapter), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_multires_noise_iterations"] == "4" and metadata["ss_ip_noise_gamma"] == "0.1"
    assert metadata["ss_debiased_estimation"] == "True" and metadata["ss_ip_noise_gamma_random_strength"] == "True"
    assert json.loads(metadata["ss_network_args"]) == {}


def test_multires_noise_and_offset_noise_are_not_combined(tiny_base, tiny_dataset, tmp_path):
    from lorakit.errors import RecipeError

    recipe = make_recipe_dict(
        tiny_base, tiny_dataset, tmp_path, train={"noise_offset": 0.1, "multires_noise_iterations": 6}
    )
    with pytest.raises(RecipeError, match="train.multires_noise_iterations: not together with train.noise_offset"):
        recipe_from_dict(recipe)


def test_cap_update_norms_scales_only_the_modules_above_the_cap_and_keeps_their_direction():
    from lorakit.adapters import cap_update_norms, extract_lora, inject_lora

    model = torch.nn.Sequential()
    model.add_module("attn", torch.nn.Module())
    model.attn.to_q = torch.nn.Linear(8, 8)
    model.attn.to_k = torch.nn.Linear(8, 8)
    inject_lora(model, "unet", rank=2, lora_alpha=4.0, dropout=0.0, target_modules=["to_q", "to_k"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        model.attn.to_k.lora_B["default"].weight.mul_(1e-3)  # a small update, under the cap

    def updates():
        return {path: (lora.up @ lora.down) * (lora.alpha / lora.rank) for path, lora in extract_lora(model).items()}

    before = updates()
    norms = {path: float(u.norm()) for path, u in before.items()}
    assert norms["attn.to_q"] > 1.0 > norms["attn.to_k"]
    scaled, largest = cap_update_norms({"unet": model}, 1.0)
    assert scaled == 1 and largest == pytest.approx(norms["attn.to_q"], rel=1e-5)
    after = updates()
    assert float(after["attn.to_q"].norm()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(after["attn.to_q"], before["attn.to_q"] / norms["attn.to_q"], rtol=1e-5, atol=1e-7)
    assert torch.equal(after["attn.to_k"], before["attn.to_k"])


def test_scale_weight_norms_caps_every_exported_module(tiny_base, tiny_dataset, tmp_path):
    import json

    from safetensors import safe_open

    from lorakit.adapters import delta_weight
    from lorakit.formats.read import read_adapter_file

    cap = 1e-3
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 3, "scale_weight_norms": cap})
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(row["keys_scaled"] > 0 and row["max_key_norm"] > cap for row in rows)  # the cap had work to do
    state = read_adapter_file(result.adapter).state
    norms = [float(delta_weight(m, m.shape).norm()) for modules in state.values() for m in modules.values()]
    assert max(norms) <= cap * 1.001
    with safe_open(str(result.adapter), "pt") as f:
        assert f.metadata()["ss_scale_weight_norms"] == "0.001"


@pytest.mark.parametrize(
    ("lora", "fragment"),
    [
        ({"type": "lokr"}, "train.scale_weight_norms: caps a LoRA module's update through its two factors; LoKr"),
        ({"use_dora": True}, "train.scale_weight_norms: DoRA sets each row's size with its own magnitude"),
    ],
)
def test_scale_weight_norms_is_refused_where_it_bounds_nothing(tiny_base, tiny_dataset, tmp_path, lora, fragment):
    from lorakit.errors import RecipeError

    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, lora=lora, train={"scale_weight_norms": 1.0})
    with pytest.raises(RecipeError, match=fragment):
        recipe_from_dict(recipe)


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_unet_blocks_are_the_ldm_blocks_kohya_counts(architecture):
    """Every module the adapters can reach is placed in the input / middle / output block whose number the original
    (LDM) checkpoint names give it: 12 + 12 blocks for SD 1.5, 9 + 9 for SDXL."""
    import re

    from lorakit.adapters import matching_modules, resolve_targets, unet_block, unet_block_count
    from lorakit.architectures import build_on_meta
    from lorakit.formats.kohya import sdxl_unet_path
    from lorakit.formats.single_file import unet_to_ldm

    unet = build_on_meta(architecture, "unet")
    config = dict(unet.config)
    assert unet_block_count(config) == {"sd15": 12, "sdxl": 9}[architecture]
    seen = set()
    for path in matching_modules(unet, resolve_targets("transformer+conv", "unet")):
        if architecture == "sdxl":
            ldm = sdxl_unet_path(path)
        else:
            (ldm,) = unet_to_ldm({f"{path}.weight": None}, config)
            ldm = ldm.removeprefix("model.diffusion_model.")
        if ldm.startswith("middle_block."):
            expected = ("mid", 0)
        else:
            side, number = re.match(r"(input|output)_blocks\.(\d+)\.", ldm).groups()
            expected = ("down" if side == "input" else "up", int(number))
        assert unet_block(path, config["layers_per_block"]) == expected, (path, ldm)
        seen.add(expected)
    blocks = unet_block_count(config)
    assert {i for kind, i in seen if kind == "down"} == set(range(1, blocks))  # IN00 is conv_in: no adapter
    assert {i for kind, i in seen if kind == "up"} == set(range(blocks))


def test_block_wise_rates_group_the_unet_and_leave_blocks_at_zero_out(tiny_base, tiny_dataset, tmp_path):
    import json

    from lorakit.formats.read import read_adapter_file

    # the tiny U-Net: 2 resolutions of 1 layer, so 4 input blocks (attention in IN01) and 4 output ones (OUT02-03)
    weights = {"down_lr_weight": [1, 0, 1, 1], "mid_lr_weight": 0.5, "up_lr_weight": [1, 1, 1, 2]}
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 2, **weights})
    lines: list[str] = []
    result = train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert any(line.startswith("Block-wise rates: ") and "in blocks at 0 and get no adapter" in line for line in lines)
    modules = read_adapter_file(result.adapter).state["unet"]
    assert not any(path.startswith("down_blocks.0.attentions.") for path in modules)
    assert any(path.startswith("mid_block.") for path in modules) and any(
        p.startswith("up_blocks.1.") for p in modules
    )
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["lr_unet@2"] == pytest.approx(2e-3) and row["lr_unet@0.5"] == pytest.approx(5e-4)
    assert row["lr_unet"] == pytest.approx(1e-3)  # OUT02 at factor 1


def test_block_ranks_give_each_block_its_rank_and_alpha_and_reload_exactly(tiny_base, tiny_dataset, tmp_path):
    import json

    from safetensors import safe_open

    from lorakit.formats.read import read_adapter_file
    from lorakit.plan import plan

    from .invoke import assert_unet_reloads_exactly

    # IN00-IN03, M00, OUT00-OUT03 of the tiny U-Net: attention in IN01 (at 0 here), the middle, OUT02 and OUT03
    lora = {"block_ranks": [4, 0, 4, 4, 8, 4, 4, 2, 6], "block_alphas": [4, 4, 4, 4, 16, 4, 4, 1, 3]}
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 2, "unet_lr": 1e-2}, lora=lora)
    lines: list[str] = []
    result = train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert any(line.startswith("lora.block_ranks: ") and "in blocks at 0 get no adapter" in line for line in lines)
    state = read_adapter_file(result.diffusers_adapter).state
    ranks = {path: module.down.shape[0] for path, module in state["unet"].items()}
    assert not any(path.startswith("down_blocks.0.attentions.") for path in ranks)
    assert {r for p, r in ranks.items() if p.startswith("mid_block.attentions.")} == {8}
    assert {r for p, r in ranks.items() if p.startswith("up_blocks.1.attentions.0.")} == {2}
    assert {r for p, r in ranks.items() if p.startswith("up_blocks.1.attentions.1.")} == {6}
    assert {module.down.shape[0] for module in state["text_encoder"].values()} == {4}  # lora.rank
    # what plan counts is what training made
    trained = sum(p.numel() for m in result.models.values() for n, p in m.named_parameters() if "lora_" in n)
    assert sum(plan(recipe_from_dict(recipe), vram=8).memory.trainable) == trained
    with safe_open(str(result.adapter), "pt") as handle:
        args = json.loads(handle.metadata()["ss_network_args"])
    assert args == {"block_dims": "4,0,4,4,8,4,4,2,6", "block_alphas": "4,4,4,4,16,4,4,1,3"}
    # both files draw what the trained U-Net draws (each module's own alpha / rank)
    assert_unet_reloads_exactly(result, tiny_base)


def test_conv_block_ranks_give_each_blocks_convolutions_their_rank_and_alpha(tiny_base, tiny_dataset, tmp_path):
    """kohya's conv_block_dims / conv_block_alphas: the 3x3 convolutions of each block at their own rank and alpha
    (0: none), beside block_ranks for the rest; what plan counts is what training made, and the file says them."""
    import json

    from safetensors import safe_open

    from lorakit.formats.read import read_adapter_file
    from lorakit.plan import plan

    from .invoke import assert_unet_reloads_exactly

    # IN00-IN03, M00, OUT00-OUT03: ResNets in IN01 and IN03, the downsampler in IN02, the middle, OUT00-OUT03
    lora = {
        "target_modules": "transformer+conv",
        "conv_rank": 2,
        "block_ranks": [4, 0, 4, 4, 4, 4, 4, 4, 4],  # IN01 at 0: its attention, but not its ResNet (conv ranks)
        "conv_block_ranks": [0, 3, 0, 5, 2, 0, 1, 6, 6],
        "conv_block_alphas": [1, 3, 1, 2, 2, 1, 1, 6, 3],
    }
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 2, "unet_lr": 1e-2}, lora=lora)
    lines: list[str] = []
    result = train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert any(line.startswith("lora.conv_block_ranks: ") for line in lines)
    state = read_adapter_file(result.diffusers_adapter).state["unet"]
    convs = {p: m for p, m in state.items() if m.down.dim() == 4 and m.down.shape[2:] != (1, 1)}
    ranks = {p: m.down.shape[0] for p, m in convs.items()}
    assert {r for p, r in ranks.items() if p.startswith("down_blocks.0.resnets.0.")} == {3}  # IN01
    assert not any(p.startswith("down_blocks.0.downsamplers.") for p in ranks)  # IN02 at 0
    assert {r for p, r in ranks.items() if p.startswith("down_blocks.1.resnets.0.")} == {5}  # IN03
    assert {r for p, r in ranks.items() if p.startswith("mid_block.resnets.")} == {2}
    assert not any(p.startswith("up_blocks.0.resnets.0.") for p in ranks)  # OUT00 at 0
    assert {r for p, r in ranks.items() if p.startswith("up_blocks.1.resnets.")} == {6}  # OUT02, OUT03
    scaling = {n: m.scaling["default"] for n, m in result.models["unet"].named_modules() if hasattr(m, "scaling")}
    assert scaling["down_blocks.1.resnets.0.conv1"] == pytest.approx(2 / 5)  # IN03: conv alpha 2 over rank 5
    assert scaling["up_blocks.1.resnets.0.conv1"] == pytest.approx(6 / 6)
    assert not any(p.startswith("down_blocks.0.attentions.") for p in state)  # block_ranks' 0 still holds there
    trained = sum(p.numel() for m in result.models.values() for n, p in m.named_parameters() if "lora_" in n)
    assert sum(plan(recipe_from_dict(recipe), vram=8).memory.trainable) == trained
    with safe_open(str(result.adapter), "pt") as handle:
        args = json.loads(handle.metadata()["ss_network_args"])
    assert (args["conv_block_dims"], args["conv_block_alphas"]) == ("0,3,0,5,2,0,1,6,6", "1,3,1,2,2,1,1,6,3")
    assert_unet_reloads_exactly(result, tiny_base)


@pytest.mark.parametrize(
    ("lora", "fragment"),
    [
        ({"conv_block_ranks": [4] * 9}, "lora.conv_block_ranks: ranks for the 3x3 convolutions, which only"),
        (
            {"target_modules": "transformer+conv", "conv_block_ranks": [4] * 25},
            "lora.conv_block_ranks: 25 values, but this U-Net has 9 blocks",
        ),
        ({"conv_block_alphas": [1.0] * 9}, "lora.conv_block_alphas: gives the alphas of lora.conv_block_ranks"),
        ({"block_ranks": [4] * 25}, "lora.block_ranks: 25 values, but this U-Net has 9 blocks (IN00 to IN03, M00"),
        ({"block_ranks": [0] * 9}, "lora.block_ranks: every block is at 0"),
        ({"block_alphas": [1.0] * 9}, "lora.block_alphas: gives the alphas of lora.block_ranks"),
        ({"block_ranks": [4] * 9, "block_alphas": [1.0] * 8}, "lora.block_alphas: 8 values for 9 block ranks"),
        ({"type": "lokr", "block_ranks": [4] * 9}, "lora.block_ranks: per-block ranks are for LoRA"),
    ],
)
def test_block_ranks_that_do_not_fit_are_refused(tiny_base, tiny_dataset, tmp_path, lora, fragment):
    from .conftest import write_recipe
    from .invoke import fails

    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 1}, lora=lora)
    fails(["train", str(write_recipe(tmp_path / "recipe.toml", recipe)), "--quiet"], fragment)
    assert not (tmp_path / "out" / "run").exists()


def test_block_wise_rates_of_the_wrong_length_name_the_blocks(tiny_base, tiny_dataset, tmp_path):
    from lorakit.errors import RecipeError

    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"down_lr_weight": [1.0] * 12})
    with pytest.raises(
        RecipeError, match=r"train.down_lr_weight: 12 values, but this U-Net has 4 input blocks \(IN00"
    ):
        train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    zero = make_recipe_dict(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"down_lr_weight": [0] * 4, "mid_lr_weight": 0, "up_lr_weight": [0] * 4},
    )
    with pytest.raises(RecipeError, match="every U-Net block the adapters reach is at 0"):
        train(recipe_from_dict(zero), quiet=True, log=lambda _: None)
    for value, message in (
        ([1, float("nan")], "is not a list of finite numbers"),
        ([1, 200], "200 is outside 0..100"),
    ):
        bad = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"up_lr_weight": value})
        with pytest.raises(RecipeError, match=f"train.up_lr_weight: .*{message}"):
            recipe_from_dict(bad)


@pytest.mark.parametrize("key", ["train.loraplus_lr_ratio", "train.up_lr_weight"])
def test_a_resume_refuses_a_change_of_the_optimizers_groups(tiny_base, tiny_dataset, tmp_path, key):
    from lorakit.checkpoint import check_resumable
    from lorakit.errors import OutputError
    from lorakit.recipe import recipe_to_dict

    section, name = key.split(".")
    before = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path))
    after = recipe_from_dict(
        make_recipe_dict(
            tiny_base, tiny_dataset, tmp_path, **{section: {name: [1.0] * 4 if "weight" in name else 16.0}}
        )
    )
    with pytest.raises(OutputError, match=f"--resume: {key} changed"):
        check_resumable(recipe_to_dict(before), after, lambda _: None)


def test_plan_counts_no_adapters_in_blocks_at_zero():
    from lorakit.adapters import inject_lora, named_lora_parameters
    from lorakit.architectures import build_on_meta
    from lorakit.memory import adapter_sizes
    from lorakit.recipe import LoraSection, TrainSection

    lora = LoraSection(rank=16, lora_alpha=16.0)
    only_up = TrainSection(down_lr_weight=[0.0] * 12, mid_lr_weight=0.0, up_lr_weight=[1.0] * 12)
    unet = build_on_meta("sd15", "unet")
    inject_lora(unet, "unet", rank=16, lora_alpha=16.0, dropout=0.0, target_modules="transformer")
    expected = sum(p.numel() for n, p in named_lora_parameters(unet).items() if n.startswith("up_blocks."))
    assert sum(adapter_sizes("sd15", "unet", lora, train=only_up)) == expected
    assert sum(adapter_sizes("sd15", "unet", lora, train=TrainSection())) > expected


def test_a_second_text_encoder_rate_is_refused_on_a_base_with_one(tiny_base, tiny_dataset, tmp_path):
    from lorakit.errors import RecipeError
    from lorakit.train import train

    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"text_encoder_2_lr": 1e-5})
    with pytest.raises(RecipeError, match=r"train.text_encoder_2_lr: .* has one text encoder, so it would do nothing"):
        train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_from_kohya_reads_two_text_encoder_rates():
    from pathlib import Path

    from lorakit.errors import LorakitError
    from lorakit.kohya_config import convert

    result = convert({"text_encoder_lr": [1e-4, 2e-5]}, Path("."))
    assert (result.recipe["train"]["text_encoder_lr"], result.recipe["train"]["text_encoder_2_lr"]) == (1e-4, 2e-5)
    assert convert({"text_encoder_lr": "3e-5"}, Path(".")).recipe["train"] == {
        "text_encoder_lr": 3e-5,
        "optimizer": "adamw",
    }
    with pytest.raises(LorakitError, match="one rate, or two for SDXL's two text encoders"):
        convert({"text_encoder_lr": [1e-4, 2e-5, 3e-5]}, Path("."))


def test_from_kohya_reads_base_weights_with_their_multipliers():
    from pathlib import Path

    from lorakit.errors import LorakitError
    from lorakit.kohya_config import convert

    result = convert(
        {"base_weights": ["style.safetensors", "light.safetensors"], "base_weights_multiplier": [0.8, 1]}, Path(".")
    )
    assert result.recipe["model"]["merged_adapters"] == ["style.safetensors:0.8", "light.safetensors"]
    assert result.mapped == ["base_weights", "base_weights_multiplier"]
    assert convert({"base_weights": "a.safetensors"}, Path(".")).recipe["model"]["merged_adapters"] == [
        "a.safetensors"
    ]
    with pytest.raises(LorakitError, match=r"base_weights_multiplier = \[0.5, 0.5\]: one per base_weights file \(1\)"):
        convert({"base_weights": "a.safetensors", "base_weights_multiplier": [0.5, 0.5]}, Path("."))


def test_wildcards_choose_one_option_per_step_and_the_first_for_validation(
    tiny_base, tiny_dataset, tmp_path, conditioning_calls
):
    from lorakit.data import pick_wildcards

    assert pick_wildcards("ohwx, {red | blue} shirt, {a} b, {{c}}", None) == "ohwx, red shirt, a b, {c}"  # as kohya
    section = DataSection(wildcards=True, shuffle_tags=True, keep_tokens=1)
    seen = {
        transform_caption("ohwx, {red|blue|green} shirt, smiling, hat", section, random.Random(s)) for s in range(60)
    }
    assert {c.split(", ")[0] for c in seen} == {"ohwx"} and {c for c in seen if "{" in c} == set()
    assert {w for c in seen for w in ("red shirt", "blue shirt", "green shirt") if w in c} == {
        "red shirt",
        "blue shirt",
        "green shirt",
    }
    assert len({tuple(c.split(", ")[1:]) for c in seen}) > 6  # chosen, then shuffled

    data = captioned_copy(tmp_path / "data", "toy, {red|blue} ball", tiny_dataset)
    rows = (data / "metadata.jsonl").read_text().splitlines()
    recipe = make_recipe_dict(
        tiny_base,
        data,
        tmp_path / "out",
        train={"max_steps": 8},
        data={"wildcards": True},
        validation={"split": 0.25, "every_steps": 100, "timesteps": [500]},
    )
    lines: list[str] = []
    train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    held_out = int(next(line.split()[1] for line in lines if line.startswith("validation.split:")))
    kept = len(rows) - held_out
    assert f"data.wildcards: {kept} of {kept} captions choose among {{a|b}} options at every step" in lines
    encoded = [caption for call in conditioning_calls for caption in call.captions]
    trained, validated = encoded[:-held_out], encoded[-held_out:]  # the last step's validation comes last
    assert set(trained) == {"ohwx, toy, red ball", "ohwx, toy, blue ball"}
    assert set(validated) == {"ohwx, toy, red ball"}
    # without data.wildcards the choices are read as written, and the log says how to turn them on
    lines.clear()
    recipe = make_recipe_dict(tiny_base, data, tmp_path / "plain", train={"max_steps": 1})
    train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert (
        f"data: {len(rows)} of {len(rows)} captions have {{a|b}} choices, which are read as written; set "
        "data.wildcards = true to pick one option per step" in lines
    )


def test_validation_encodes_captions_without_building_a_graph(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    """The trained text encoder runs with gradients in training steps, and without them for val_loss."""
    import lorakit.train.loop as loop

    seen: list[bool] = []
    real = loop.encode_prompts
    monkeypatch.setattr(loop, "encode_prompts", lambda *a: seen.append(torch.is_grad_enabled()) or real(*a))
    recipe = make_recipe_dict(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 2},
        validation={"split": 0.25, "every_steps": 100, "timesteps": [500]},
    )
    train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    assert seen[:2] == [True, True] and seen[2:] and not any(seen[2:])  # 2 steps, then the held-out images


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_caption_dropout_every_n_epochs_empties_those_epochs(
    tiny_base, tiny_dataset, tmp_path, conditioning_calls, train_text_encoder
):
    recipe = make_recipe_dict(
        tiny_base,
        tiny_dataset,
        tmp_path / "out",
        train={"max_epochs": 3, "save_every_steps": 0},
        lora={"train_text_encoder": train_text_encoder},  # the frozen encoder's cache holds the empty caption too
        data={"caption_dropout_every_epochs": 2},
    )
    del recipe["train"]["max_steps"]
    train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    by_epoch: dict[int, set[str]] = {}
    for call in conditioning_calls:
        by_epoch.setdefault(call.epoch, set()).update(call.captions)
    assert sorted(by_epoch) == [0, 1, 2]
    assert by_epoch[1] == {""}  # the second epoch, counted from 1 as kohya does
    assert "" not in by_epoch[0] | by_epoch[2] and all(c.startswith("ohwx") for c in by_epoch[0])


def test_kohyas_sdxl_block_lists_count_the_middle_blocks_three_parts():
    """kohya's SDXL lists: block_dims of 23 (time embedding, IN00-IN08, the middle block's ResNet, attention and
    ResNet, OUT00-OUT08, output layer) and mid_lr_weight of 3, on the real SDXL U-Net."""
    from lorakit.adapters import block_lr_weight, block_ranks, checked_block_weights
    from lorakit.architectures import build_on_meta
    from lorakit.errors import RecipeError

    unet = build_on_meta("sdxl", "unet")
    ours = list(range(1, 20))  # IN00-IN08 1..9, M00 10, OUT00-OUT08 11..19
    kohya = [0, *ours[:9], 10, 10, 10, *ours[10:], 0]
    for targets in ("transformer", "transformer+conv"):
        assert block_ranks(unet, targets, kohya, None, 8.0) == block_ranks(unet, targets, ours, None, 8.0)
    parts = [0, *ours[:9], 20, 21, 22, *ours[10:], 0]
    ranks, _ = block_ranks(unet, "transformer+conv", parts, None, 8.0)
    mid = {path: rank for path, rank in ranks.items() if path.startswith("mid_block.")}
    assert {r for p, r in mid.items() if p.startswith("mid_block.resnets.0.")} == {20}
    assert {r for p, r in mid.items() if p.startswith("mid_block.attentions.0.")} == {21}
    assert {r for p, r in mid.items() if p.startswith("mid_block.resnets.1.")} == {22}
    assert ranks["up_blocks.0.attentions.0.proj_in"] == 11 and ranks["down_blocks.1.attentions.0.proj_in"] == 5
    weights = (None, [0.5, 2.0, 3.0], None)
    assert checked_block_weights(weights, dict(unet.config)) == 2
    assert block_lr_weight("mid_block.resnets.0.conv1", weights) == 0.5
    assert block_lr_weight("mid_block.attentions.0.proj_in", weights) == 2.0
    assert block_lr_weight("mid_block.resnets.1.conv2", weights) == 3.0
    with pytest.raises(RecipeError, match="train.mid_lr_weight: 2 values; give one .or three, kohya's SDXL"):
        checked_block_weights((None, [1.0, 2.0], None), dict(unet.config))
    with pytest.raises(RecipeError, match="train.mid_lr_weight: 3 values; give one$"):
        checked_block_weights((None, [1.0, 2.0, 3.0], None), dict(build_on_meta("sd15", "unet").config))


def test_from_kohya_reads_sdxl_middle_block_weights():
    from lorakit.kohya_config import convert

    result = convert({"pretrained_model_name_or_path": "x", "mid_lr_weight": "1,0.5,1"}, Path("."))
    assert result.recipe["train"]["mid_lr_weight"] == [1.0, 0.5, 1.0]
    assert (
        convert({"pretrained_model_name_or_path": "x", "mid_lr_weight": 0.5}, Path(".")).recipe["train"][
            "mid_lr_weight"
        ]
        == 0.5
    )


def test_kohyas_block_rate_curves_and_zero_threshold():
    import math

    from lorakit.adapters import block_lr_weight, resolve_block_weights, zero_rate_modules
    from lorakit.architectures import build_on_meta
    from lorakit.errors import RecipeError
    from lorakit.recipe import TrainSection, block_curve

    sine = block_curve("sine", 12)
    assert sine[0] == 0.0 and sine[-1] == pytest.approx(1.0) and sine[6] == pytest.approx(math.sin(math.pi * 6 / 22))
    assert block_curve("cosine", 12) == sine[::-1]
    assert block_curve("linear+0.5", 3) == [0.5, 1.0, 1.5] and block_curve("reverse_linear", 3) == [1.0, 0.5, 0.0]
    assert block_curve("zeros+0.25", 9) == [0.25] * 9
    unet = build_on_meta("sd15", "unet")
    config = dict(unet.config)
    train = TrainSection(down_lr_weight="linear", up_lr_weight="sine+0.5", block_lr_zero_threshold=0.2)
    given = (train.down_lr_weight, train.mid_lr_weight, train.up_lr_weight)
    down, mid, up = resolve_block_weights(given, train.block_lr_zero_threshold, config)
    assert down[:3] == [0.0, 0.0, 0.0] and down[3] == pytest.approx(3 / 11) and mid is None  # at or below 0.2: 0
    assert up == pytest.approx([s + 0.5 for s in sine])
    assert block_lr_weight("down_blocks.1.attentions.0.proj_in", (down, mid, up)) == pytest.approx(4 / 11)  # IN04
    skipped = zero_rate_modules(unet, "transformer", (down, mid, up), 2)
    assert skipped and all(path.startswith("down_blocks.0.") for path in skipped)  # IN01, IN02: below the threshold
    for bad, fragment in [
        ({"down_lr_weight": "wave"}, "train.down_lr_weight: 'wave' is not one of kohya's curves"),
        ({"block_lr_zero_threshold": 0.1}, "train.block_lr_zero_threshold: acts on block-wise rates"),
    ]:
        with pytest.raises(RecipeError, match=fragment):
            recipe_from_dict({"model": {"base": "x/y"}, "train": bad})


def test_training_and_plan_read_block_rate_curves(tiny_base, tiny_dataset, tmp_path):
    import json

    from lorakit.kohya_config import convert
    from lorakit.plan import plan

    converted = convert(
        {
            "pretrained_model_name_or_path": "x",
            "down_lr_weight": "zeros+0.5",
            "network_args": ["block_lr_zero_threshold=0.1"],
        },
        Path("."),
    )
    assert converted.recipe["train"]["down_lr_weight"] == "zeros+0.5"
    assert converted.recipe["train"]["block_lr_zero_threshold"] == 0.1
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 1, "up_lr_weight": "zeros"})
    recipe["train"]["down_lr_weight"] = "zeros+0.5"
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["lr_unet@0.5"] == pytest.approx(0.5e-3)  # the input blocks at half the rate
    assert not any(n.startswith("up_blocks.") and "lora_" in n for n, _ in result.models["unet"].named_parameters())
    trained = sum(p.numel() for m in result.models.values() for n, p in m.named_parameters() if "lora_" in n)
    assert sum(plan(recipe_from_dict(recipe), vram=8).memory.trainable) == trained

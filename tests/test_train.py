"""The training loop: it learns, caches, accumulates, and explains what it does differently."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict


def _run(base, dataset, out, **sections):
    lines: list[str] = []
    result = train(recipe_from_dict(make_recipe_dict(base, dataset, out, **sections)), quiet=True, log=lines.append)
    return result, lines


def _fixed_noise_loss(unet, text_encoder, base_path, dataset) -> float:
    """Mean denoising loss over the dataset at fixed noise and timesteps (a held-still yardstick)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTokenizer

    from lorakit.data import load_items, load_pixels
    from lorakit.recipe import DataSection

    vae = AutoencoderKL.from_pretrained(base_path, subfolder="vae")
    tokenizer = CLIPTokenizer.from_pretrained(base_path, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(base_path, subfolder="scheduler")
    generator = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        for item in load_items(DataSection(folder=str(dataset), resolution=64, trigger="ohwx"), 8):
            latents = vae.encode(load_pixels(item, False)[None]).latent_dist.mean * vae.config.scaling_factor
            for t in (100, 300, 500, 700, 900):
                noise = torch.randn(latents.shape, generator=generator)
                ids = tokenizer([item.caption], padding="max_length", max_length=77, return_tensors="pt").input_ids
                noisy = scheduler.add_noise(latents, noise, torch.tensor([t]))
                pred = unet(noisy, torch.tensor([t]), encoder_hidden_states=text_encoder(ids)[0]).sample
                losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return sum(losses) / len(losses)


def test_training_lowers_the_denoising_loss_on_its_photos(tiny_base, tiny_dataset, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    before = _fixed_noise_loss(
        UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet"),
        CLIPTextModel.from_pretrained(tiny_base, subfolder="text_encoder"),
        tiny_base,
        tiny_dataset,
    )
    result, _ = _run(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 40, "unet_lr": 3e-3},
        lora={"rank": 8, "lora_alpha": 8.0},
    )
    after = _fixed_noise_loss(
        result.models["unet"].eval(), result.models["text_encoder"].eval(), tiny_base, tiny_dataset
    )
    assert after < 0.9 * before, (before, after)


def _fresh_copy(dataset, folder):
    import shutil

    shutil.copytree(dataset, folder, ignore=shutil.ignore_patterns(".cache"))
    return folder


def test_latents_are_cached_once_and_reused(tiny_base, tiny_dataset, tmp_path):
    dataset = _fresh_copy(tiny_dataset, tmp_path / "data")
    _, first = _run(tiny_base, dataset, tmp_path / "a", train={"max_steps": 1}, data={"flip": True})
    _, second = _run(tiny_base, dataset, tmp_path / "b", train={"max_steps": 1}, data={"flip": True})
    cached = [line for line in first + second if line.startswith("Latents:")]
    assert len(cached) == 2
    assert "16 cached (16 newly encoded)" in cached[0] and "16 cached (0 newly encoded)" in cached[1]
    assert len(list((dataset / ".cache" / "latents").glob("*.safetensors"))) == 16


def test_without_the_cache_training_still_runs_and_writes_nothing_to_it(tiny_base, tiny_dataset, tmp_path):
    dataset = _fresh_copy(tiny_dataset, tmp_path / "data")
    result, lines = _run(tiny_base, dataset, tmp_path / "out", train={"max_steps": 2, "cache_latents": False})
    assert result.steps == 2 and not (dataset / ".cache").exists()
    assert not any(line.startswith("Latents:") for line in lines)


def test_gradient_accumulation_consumes_more_batches_per_step(tiny_base, tiny_dataset, tmp_path):
    # 8 images in 3 buckets (3 + 3 + 2) with batch_size 2 make 5 micro-batches per epoch.
    plain, _ = _run(tiny_base, tiny_dataset, tmp_path / "a", train={"max_steps": 5})
    accumulated, _ = _run(
        tiny_base, tiny_dataset, tmp_path / "b", train={"max_steps": 5, "gradient_accumulation_steps": 2}
    )
    last = [json.loads((r.run_dir / "metrics.jsonl").read_text().splitlines()[-1]) for r in (plain, accumulated)]
    assert [row["step"] for row in last] == [5, 5]
    assert [row["epoch"] for row in last] == [1, 2]


def test_fp16_on_cpu_says_so_and_runs_float32(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    """fp16 autocast does nothing on a CPU; bf16 only where the CPU computes it, else float32 (never silently)."""
    import lorakit.train.setup as setup

    if torch.cuda.is_available():
        pytest.skip("on CUDA fp16 is honoured")
    chosen = []
    real = setup._accelerator
    monkeypatch.setattr(
        setup,
        "_accelerator",
        lambda precision, folder, trackers: chosen.append(precision) or real(precision, folder, trackers),
    )
    monkeypatch.setattr(setup, "cpu_has_native_bf16", lambda: False)
    result, lines = _run(tiny_base, tiny_dataset, tmp_path / "a", train={"max_steps": 1, "mixed_precision": "fp16"})
    assert any(line.endswith("only emulates bf16 (slow); training in float32") for line in lines)
    assert chosen == ["no"] and result.models["unet"].conv_in.weight.dtype == torch.float32
    monkeypatch.setattr(setup, "cpu_has_native_bf16", lambda: True)
    _, lines = _run(
        tiny_base,
        tiny_dataset,
        tmp_path / "b",
        train={"max_steps": 1, "mixed_precision": "fp16"},
        model={"weight_dtype": "float16"},
    )
    assert any(line.endswith("this CPU computes bf16, training in bf16") for line in lines) and chosen[-1] == "bf16"


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        ("adamw8bit", "AdamW8bit"),
        ("adafactor", "Adafactor"),
        ("prodigy", "Prodigy"),
        ("lion8bit", "Lion8bit"),
        ("lion", "Lion"),
        ("adamw_schedulefree", "AdamWScheduleFree"),
        ("ademamix8bit", "AdEMAMix8bit"),
    ],
)
def test_each_optimizer_trains(tiny_base, tiny_dataset, tmp_path, monkeypatch, optimizer, expected):
    import lorakit.train.setup as setup

    built = []
    real = setup.build_optimizer
    monkeypatch.setattr(setup, "build_optimizer", lambda cfg, groups: built.append(real(cfg, groups)) or built[-1])
    lr = 1.0 if optimizer == "prodigy" else 1e-3
    result, _ = _run(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 2, "optimizer": optimizer, "unet_lr": lr, "text_encoder_lr": lr},
    )
    assert result.steps == 2 and [type(o).__name__ for o in built] == [expected]
    assert all(built[0].state[p] for g in built[0].param_groups for p in g["params"])  # it stepped every tensor
    b = [p for n, p in result.models["unet"].named_parameters() if ".lora_B." in n]
    assert any(p.abs().sum() > 0 for p in b)  # the zero-initialised up factors moved


def test_unet_only_when_the_text_encoder_is_not_trained(tiny_base, tiny_dataset, tmp_path):
    from safetensors import safe_open

    result, _ = _run(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 1},
        lora={"train_text_encoder": False, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
    )
    assert set(result.models) == {"unet"}
    with safe_open(result.adapter, "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())
        assert f.metadata()["ss_network_train_unet_only"] == "True"


def test_epoch_batches_are_single_bucket_reproducible_and_complete(tiny_base, tiny_dataset):
    from lorakit.data import epoch_batches, load_items
    from lorakit.recipe import DataSection

    items = load_items(DataSection(folder=str(tiny_dataset), resolution=64, num_repeats=3), 8)
    batches = epoch_batches(items, batch_size=2, seed=1, epoch=0)
    assert batches == epoch_batches(items, batch_size=2, seed=1, epoch=0)
    assert batches != epoch_batches(items, batch_size=2, seed=1, epoch=1)
    assert all(len({items[i].bucket for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == sorted(list(range(len(items))) * 3)


@pytest.mark.parametrize(("batch_size", "accumulation"), [(2, 1), (1, 2)])
def test_accumulated_micro_batches_give_the_gradient_of_one_batch(
    tiny_base, tiny_dataset, tmp_path, monkeypatch, batch_size, accumulation
):
    """An optimizer step's gradient is the mean over every image of the step, however the images are split
    into micro-batches: with a per-image loss c_i * sum(p), the gradient of p is mean(c_i) everywhere."""
    import lorakit.train.loop as loop

    consumed, gradients = [], []

    def per_image_loss(run, batch):
        consumed.extend(batch)
        first = run.optimizer.param_groups[0]["params"][0]
        weights = torch.tensor([float(index + 1) for index in batch])
        return (weights * first.sum()).mean()

    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        gradients.append((list(consumed), self.param_groups[0]["params"][0].grad.clone()))
        consumed.clear()
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(loop, "_micro_batch_loss", per_image_loss)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    _run(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={
            "max_steps": 3,
            "batch_size": batch_size,
            "gradient_accumulation_steps": accumulation,
            "max_grad_norm": 0,
        },
    )
    assert len(gradients) == 3 and any(len(images) == 2 for images, _ in gradients)
    for images, gradient in gradients:
        expected = sum(index + 1 for index in images) / len(images)
        torch.testing.assert_close(gradient, torch.full_like(gradient, expected))


def test_optimizer_settings_reach_the_optimizer_and_a_resume_applies_changed_ones(
    tiny_base, tiny_dataset, tmp_path, monkeypatch
):
    import lorakit.train.setup as setup

    built = []
    real = setup.build_optimizer
    monkeypatch.setattr(setup, "build_optimizer", lambda cfg, groups: built.append(real(cfg, groups)) or built[-1])
    settings = {
        "max_steps": 1,
        "optimizer": "prodigy",
        "unet_lr": 1.0,
        "text_encoder_lr": 1.0,
        "betas": [0.8, 0.95],
        "prodigy_d_coef": 2.0,
        "prodigy_use_bias_correction": True,
    }
    _run(tiny_base, tiny_dataset, tmp_path, train=settings)
    group = built[-1].param_groups[0]
    assert (group["betas"], group["d_coef"], group["use_bias_correction"]) == ((0.8, 0.95), 2.0, True)
    # A checkpoint's optimizer state brings its old settings back; the recipe's are put over them.
    changed = {**settings, "max_steps": 2, "weight_decay": 0.5, "betas": [0.7, 0.9]}
    lines: list[str] = []
    recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train=changed))
    train(recipe, resume="latest", quiet=True, log=lines.append)
    assert "--resume: train.weight_decay changed from 0.01 to 0.5" in lines
    assert all(g["weight_decay"] == 0.5 and g["betas"] == (0.7, 0.9) for g in built[-1].param_groups)
    assert built[-1].param_groups[0]["d_coef"] == 2.0


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ({"betas": [0.9, 0.99, 0.999]}, "train.betas: 3 values; give two, e.g. betas = [0.9, 0.999]"),
        ({"optimizer": "adafactor", "betas": [0.9, 0.99]}, "train.betas: Adafactor keeps no momentum here"),
        (
            {"optimizer": "adamw", "prodigy_d_coef": 2.0},
            "train.prodigy_d_coef: a Prodigy setting (this recipe has optimizer 'adamw'); set train.optimizer = "
            '"prodigy" or remove it',
        ),
        ({"betas": [0.9, 1.0]}, "train.betas: 1.0 is outside 0..0.9999"),
        (
            {"optimizer": "adamw_schedulefree", "lr_scheduler": "cosine"},
            "train.lr_scheduler: 'cosine', but schedule-free AdamW needs no schedule; set lr_scheduler = \"constant\"",
        ),
        (
            {"optimizer": "adamw_schedulefree", "ema_decay": 0.9},
            "train.ema_decay: schedule-free AdamW saves a running",
        ),
        ({"optimizer": "adamw_schedulefree", "scale_weight_norms": 1.0}, "train.scale_weight_norms: schedule-free"),
    ],
)
def test_optimizer_settings_the_optimizer_lacks_are_refused(keys, fragment):
    from lorakit.errors import RecipeError

    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({"model": {"base": "x/y"}, "train": keys})
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "sections",
    [
        {"embedding": {"token": "ohwx", "vectors": 2, "init_words": "toy", "lr": 1e-2}},
        {"data": {"weighted_captions": True, "trigger": "(ohwx:1.2)"}},
        {"train": {"optimizer": "adamw_schedulefree"}},
        {"preservation": {"class_word": "toy"}, "lora": {"train_text_encoder": True}},
    ],
    ids=["pivotal", "weighted-captions", "schedule-free", "preservation"],
)
def test_half_precision_weights_and_autocast_train(tiny_base, tiny_dataset, tmp_path, sections):
    """What a GPU run does in fp16, here in bfloat16 (the half precision a CPU computes): frozen weights in half
    precision under autocast, with the new token vectors, weighted captions, schedule-free AdamW and
    preservation each in the loop. The steps are finite and so is what is written."""
    from safetensors.torch import load_file

    merged = {"train": {"max_steps": 2, "mixed_precision": "bf16"}, "model": {"weight_dtype": "bfloat16"}}
    for section, values in sections.items():
        merged[section] = {**merged.get(section, {}), **values}
    result, _ = _run(tiny_base, tiny_dataset, tmp_path, **merged)
    assert result.steps == 2 and math.isfinite(result.final_loss)
    for path in [result.adapter, result.embedding]:
        if path is not None:
            assert all(torch.isfinite(t).all() for t in load_file(path).values())


@pytest.mark.parametrize(
    "optimizer",
    ["adamw", "adamw8bit", "lion", "lion8bit", "adafactor", "prodigy", "adamw_schedulefree", "ademamix8bit"],
)
def test_text_encoder_until_stops_the_text_encoders_adapters_and_the_unets_goes_on(
    tiny_base, tiny_dataset, tmp_path, optimizer
):
    """Half of four steps: the text encoder's adapter is the same at step 2 and at the end, bit for bit (weight decay
    included); the U-Net's moved; the logged rate says 0 from then on."""
    import json

    from safetensors.torch import load_file

    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    sections = {
        "train": {"max_steps": 4, "save_every_steps": 2, "text_encoder_until": 0.5, "optimizer": optimizer},
        "lora": {"train_text_encoder": True},
    }
    lines = []
    result = train(recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, **sections)), log=lines.append)
    halfway, end = (
        load_file(result.run_dir / "checkpoints" / s / "adapter.safetensors") for s in ("step-000002", "step-000004")
    )
    text = [k for k in end if "text_encoder" in k or "lora_te" in k]
    unet = [k for k in end if k not in text]
    assert text and unet
    assert all(torch.equal(halfway[k], end[k]) for k in text)
    assert not all(torch.equal(halfway[k], end[k]) for k in unet)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_text_encoder"] for r in rows] == [1e-3, 0.0, 0.0, 0.0] and rows[-1]["lr_unet"] == 1e-3
    assert any("learn for the first 2 of 4 steps" in line for line in lines)


def test_text_encoder_until_without_a_trained_text_encoder_is_refused(tiny_base, tiny_dataset, tmp_path):
    from .conftest import write_recipe
    from .invoke import fails

    sections = {"train": {"text_encoder_until": 0.5}, "lora": {"train_text_encoder": False}}
    recipe = write_recipe(tmp_path / "r.toml", make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", **sections))
    fails(["train", str(recipe)], "train.text_encoder_until: 0.5 stops the text encoders' adapters, but")

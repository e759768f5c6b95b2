"""The memory planner: exact parts on the real architectures (meta device), bitsandbytes' 8-bit state byte for byte,
the published tier-A SDXL readings within 15 % (or 1 GiB), and `lorakit plan` end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import typing

import pytest
import torch
from typer.testing import CliRunner

from lorakit.architectures import build_on_meta
from lorakit.cli import app
from lorakit.errors import RecipeError
from lorakit.memory import GIB, estimate, find_gpu, optimizer_state_bytes
from lorakit.recipe import load_recipe, recipe_from_dict, recipe_to_dict
from lorakit.recipe.sections import Optimizer

from .conftest import allocation_peak, write_recipe

runner = CliRunner()


def _recipe(**sections) -> object:
    recipe = {
        "model": {"base": "stabilityai/stable-diffusion-xl-base-1.0", "weight_dtype": "float16"},
        "data": {"folder": "no-dataset-yet", "resolution": 1024},
        "lora": {"rank": 32, "lora_alpha": 32.0, "train_text_encoder": False},
        "train": {"optimizer": "adamw8bit", "mixed_precision": "fp16", "batch_size": 1},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe_from_dict(recipe)


@pytest.mark.parametrize(
    ("architecture", "component", "parameters"),
    [
        ("sd15", "unet", 859_520_964),
        ("sd15", "text_encoder", 123_060_480),
        ("sd15", "vae", 83_653_863),
        ("sdxl", "unet", 2_567_463_684),
        ("sdxl", "text_encoder_2", 694_659_840),
    ],
)
def test_frozen_weights_are_counted_on_the_real_architectures(architecture, component, parameters):
    recipe = _recipe(model={"base": "x", "weight_dtype": "float32"}, lora={"train_text_encoder": False})
    plan = estimate(recipe, architecture)
    assert sum(p.numel() for p in build_on_meta(architecture, component).parameters()) == parameters
    unet = next(p for p in plan.parts if p.phase == "training step" and p.name.startswith("U-Net weights"))
    if component == "unet":
        assert unet.gib * GIB == parameters * 4


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_loading_holds_the_unet_and_text_encoders_in_their_dtype_and_the_vae_in_float32(architecture):
    def count(component: str) -> int:
        return sum(p.numel() for p in build_on_meta(architecture, component).parameters())

    encoders = ["text_encoder", "text_encoder_2"] if architecture == "sdxl" else ["text_encoder"]
    plan = estimate(_recipe(model={"base": "x", "weight_dtype": "float16"}), architecture)
    assert {name: gib * GIB for name, gib in plan.loaded.items()} == {
        "U-Net float16": count("unet") * 2,
        "text encoders float16": sum(count(c) for c in encoders) * 2,
        "VAE float32": count("vae") * 4,  # load_base never halves a VAE: SD VAEs overflow in float16
    }
    vae = next(p for p in plan.parts if p.name.startswith("VAE weights"))
    assert vae.name == "VAE weights (float32)" and vae.gib * GIB == count("vae") * 4


def test_lora_parameters_are_those_of_every_targeted_linear_layer():
    recipe = _recipe(lora={"rank": 16, "lora_alpha": 16.0})
    plan = estimate(recipe, "sdxl")
    from lorakit.adapters import matching_modules, resolve_targets

    unet = build_on_meta("sdxl", "unet")
    names = matching_modules(unet, resolve_targets("transformer", "unet"))
    expected = sum(16 * (m.in_features + m.out_features) for n, m in unet.named_modules() if n in names)
    assert sum(plan.trainable) == expected


# Around bitsandbytes' 8-bit threshold (4,096 elements), and well above it.
STATE_SIZES = [100, 4095, 4096, 70_000, 300_000]


def _bnb_state(kind: str, lr: float) -> list[torch.Tensor]:
    """The state tensors bitsandbytes' optimizer `kind` keeps for STATE_SIZES after one step, without its step
    counter and quantization maps (qmap1/qmap2: one pair shared by every parameter, 2 KiB in all, not per tensor)."""
    bnb = pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(n)) for n in STATE_SIZES]
    built = getattr(bnb.optim, kind)(params, lr=lr)
    for p in params:
        p.grad = torch.randn_like(p)
    built.step()
    ignored = ("step", "qmap1", "qmap2")
    return [t for p in params for k, t in built.state[p].items() if torch.is_tensor(t) and k not in ignored]


def _bytes(state: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state)


def test_eight_bit_adamw_state_is_predicted_byte_for_byte():
    state = _bnb_state("AdamW8bit", 1e-3)
    assert any(t.dtype == torch.uint8 for t in state), "no 8-bit state: the test would not be about 8-bit AdamW"
    assert _bytes(state) == optimizer_state_bytes("adamw8bit", STATE_SIZES)


@pytest.mark.parametrize(("optimizer", "kind"), [("lion8bit", "Lion8bit"), ("lion", "Lion")])
def test_lion_state_is_predicted_byte_for_byte(optimizer, kind):
    state = _bnb_state(kind, 1e-4)
    assert any(t.dtype == torch.uint8 for t in state) == (optimizer == "lion8bit")
    assert _bytes(state) == optimizer_state_bytes(optimizer, STATE_SIZES)


def test_ademamix_state_is_predicted_byte_for_byte():
    """Three 8-bit states (fast and slow momentum, second moment) with their block scales; float32 under 4,096."""
    state = _bnb_state("AdEMAMix8bit", 1e-4)
    assert any(t.dtype == torch.uint8 for t in state)
    assert _bytes(state) == optimizer_state_bytes("ademamix8bit", STATE_SIZES)


@pytest.mark.parametrize("optimizer", typing.get_args(Optimizer))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_optimizers_state_is_predicted_for_float32_and_full_bf16_weights(optimizer, dtype):
    """train.full_bf16 makes the trained tensors bfloat16: AdamW's, schedule-free AdamW's and Prodigy's state follows
    them, bitsandbytes' (8-bit, or float32 under 4,096 values) and Adafactor's (float32) do not. The optimizers are
    built as training builds them; step counters and bitsandbytes' shared quantization maps are left out."""
    from lorakit.optim import build_optimizer

    rate = 1.0 if optimizer == "prodigy" else 1e-4
    train = _recipe(train={"optimizer": optimizer, "unet_lr": rate, "text_encoder_lr": rate}).train
    params = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in STATE_SIZES]
    built = build_optimizer(train, [{"params": params, "lr": rate}])
    for p in params:
        p.grad = torch.randn_like(p)
    built.step()
    ignored = ("step", "qmap1", "qmap2", "RMS")  # RMS: Adafactor's one number per tensor
    state = [t for p in params for k, t in built.state[p].items() if torch.is_tensor(t) and k not in ignored]
    assert params[0].dtype == dtype  # no optimizer changed the weights' dtype
    assert _bytes(state) == optimizer_state_bytes(optimizer, STATE_SIZES, dtype.itemsize)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_schedulefree"])
def test_adamw_state_is_two_float32_tensors_per_parameter(optimizer):
    params = [torch.nn.Parameter(torch.randn(n)) for n in (10, 5000)]
    if optimizer == "adamw":
        built = torch.optim.AdamW(params)
    else:
        from schedulefree import AdamWScheduleFree

        built = AdamWScheduleFree(params)
        built.train()
    for p in params:
        p.grad = torch.randn_like(p)
    built.step()
    state = [t for p in params for k, t in built.state[p].items() if torch.is_tensor(t) and k != "step"]
    assert all(t.dtype == torch.float32 for t in state)
    assert sum(t.numel() * 4 for t in state) == optimizer_state_bytes(optimizer, [10, 5000])


# Tier A of ../shared/memory-readings.md: SDXL, 1024 px, U-Net LoRA on the transformer blocks' linear layers,
# 8-bit AdamW, latents cached, both text encoders resident in fp16 (tag shuffling keeps them so here), GiB per
# process. Left out: the row the table marks as an outlier. The "full bf16" rows are train.full_bf16 (which needs bf16
# autocast, as in sd-scripts) rounded to nearest, as sd-scripts rounds; the "fp8 base" rows, which the table calls
# implementation-dependent, are held below against model.weight_dtype = "float8".
TIER_A = [  # rank, gradient checkpointing, batch, full bf16, published GiB
    (32, False, 1, False, 17.4),
    (32, False, 4, False, 47.7),
    (32, True, 1, False, 9.4),
    (128, False, 1, False, 20.5),
    (128, False, 3, False, 41.7),
    (128, True, 1, False, 12.0),
    (32, False, 1, True, 16.7),
    (32, True, 1, True, 9.1),
    (128, False, 1, True, 18.3),
    (128, False, 4, True, 47.8),
    (128, True, 1, True, 10.3),
    (128, True, 4, True, 15.0),
]


@pytest.mark.parametrize(("rank", "checkpointing", "batch", "full_bf16", "published"), TIER_A)
def test_the_estimate_lands_on_the_published_sdxl_readings(rank, checkpointing, batch, full_bf16, published):
    half = {
        "model": {"weight_dtype": "bfloat16"},
        "train": {"mixed_precision": "bf16", "full_bf16": True, "stochastic_rounding": False},
    }
    recipe = _recipe(
        model=half["model"] if full_bf16 else {},
        lora={"rank": rank, "lora_alpha": float(rank)},
        data={"shuffle_tags": True},
        train={
            "gradient_checkpointing": checkpointing,
            "batch_size": batch,
            **(half["train"] if full_bf16 else {}),
        },
    )
    plan = estimate(recipe, "sdxl")
    assert plan.peak_phase == "training step"
    assert abs(plan.process_gib - published) <= max(0.15 * published, 1.0), (plan.process_gib, published)
    if full_bf16:  # 2 bytes less per LoRA value for the weights and for the gradients; 8-bit AdamW's state as it was
        trained = sum(plan.trainable)
        parts = {p.name: p.gib for p in plan.parts if p.phase == "training step"}
        assert parts[f"LoRA weights (bfloat16, {trained:,} parameters)"] == pytest.approx(2 * trained / GIB)
        plain = estimate(dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, full_bf16=False)), "sdxl")
        assert plain.allocated_gib - plan.allocated_gib == pytest.approx(4 * trained / GIB)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw", "prodigy"])
def test_stochastic_rounding_lifts_at_most_a_chunk_of_a_large_adapter(optimizer):
    """An SDXL LoRA of rank 128 (341 million values) with gradient checkpointing: rounding its full-bf16 steps
    stochastically adds float32 copies of 16.8 million values at a time, so the training step still sets the peak;
    Prodigy, which lifts every tensor at once, adds them all."""
    from lorakit.memory import ROUNDING_CHUNK, STATE_IN_PARAMETER_DTYPE

    def plan(rounding: bool):
        train = {"gradient_checkpointing": True, "optimizer": optimizer, "mixed_precision": "bf16"}
        train |= {"full_bf16": True, "stochastic_rounding": rounding}
        if optimizer == "prodigy":
            train |= {"unet_lr": 1.0, "text_encoder_lr": 1.0}
        return estimate(_recipe(lora={"rank": 128, "lora_alpha": 128.0}, train=train), "sdxl")

    rounded, nearest = plan(True), plan(False)
    added = (rounded.phase_gib("optimizer step") - nearest.phase_gib("optimizer step")) * GIB
    values = sum(rounded.trainable)
    state = STATE_IN_PARAMETER_DTYPE.get(optimizer, 0)
    at_once = values if optimizer == "prodigy" else ROUNDING_CHUNK
    update = 4 * at_once - 2 * values if optimizer == "adamw" else 0  # AdamW's update: float32, a chunk at a time
    assert values > 300e6 and added == pytest.approx(at_once * (4 + 2 * (1 + state)) + update, rel=0.01)
    assert rounded.phase_gib("training step") == nearest.phase_gib("training step")
    if optimizer != "prodigy":
        assert rounded.peak_phase == "training step" and rounded.allocated_gib == nearest.allocated_gib


@pytest.mark.parametrize(("rank", "published"), [(32, 6.4), (128, 9.9)])
def test_a_float8_base_lands_on_the_published_fp8_base_readings(rank, published):
    """sd-scripts' fp8_base rows (gradient checkpointing, batch 1) against model.weight_dtype = "float8": U-Net and
    text encoders stored in float8, as sd-scripts stores them. Ours: 6.3 and 8.8 GiB."""
    recipe = _recipe(
        model={"weight_dtype": "float8"},
        lora={"rank": rank, "lora_alpha": float(rank)},
        data={"shuffle_tags": True},
        train={"gradient_checkpointing": True},
    )
    plan = estimate(recipe, "sdxl")
    assert plan.peak_phase == "training step"
    assert abs(plan.process_gib - published) <= max(0.15 * published, 1.0), (plan.process_gib, published)
    parts = {p.name: p.gib for p in plan.parts if p.phase == "training step"}
    assert parts["U-Net weights (float8 + float16)"] == pytest.approx(2.40, abs=0.005)  # float16: 4.78
    largest = 1280 * 2560 * 3 * 3 * 2 / GIB  # an output block's first 3x3 convolution, in float16
    assert parts["float8: the largest stored weight, dequantized for its layer"] == pytest.approx(largest)


def test_plan_prints_the_breakdown_verdict_disk_and_time(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.toml",
        {
            "model": {"base": "stabilityai/stable-diffusion-xl-base-1.0", "weight_dtype": "float16"},
            "data": {"folder": str(tmp_path / "data"), "resolution": 1024},
            "lora": {"rank": 16, "lora_alpha": 16.0},
            "train": {"optimizer": "adamw8bit", "mixed_precision": "fp16", "gradient_checkpointing": True},
        },
    )
    result = runner.invoke(app, ["plan", str(recipe), "--gpu", "RTX 3060 12GB"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "SDXL" in text and "1024x1024 assumed (no prepared dataset yet" in text
    assert "latent caching" in text and "training step" in text and "optimizer state (adamw8bit)" in text
    assert "fits a 12 GiB card on linux" in text and "Disk: about" in text and "Time for 1000 steps" in text
    assert "Load: 6.62 GiB of system memory holds the frozen weights" in text  # 2.57 + 0.82 G x 2 B, 0.08 G x 4 B
    small = runner.invoke(app, ["plan", str(recipe), "--vram", "4", "--os", "windows", "--json"])
    facts = json.loads(small.output)
    assert facts["card"] == {"name": "4 GiB (--vram)", "gib": 4.0, "system": "windows", "fits": False}
    assert facts["memory"]["peak_phase"] == "training step"
    phases = facts["memory"]["phases"]  # SDXL's text encoders are frozen here: encoded once, then parked
    assert list(phases) == ["latent caching", "text caching", "training step", "optimizer step"]
    # the optimizer step holds what the training step does, less the activations
    activations = next(p["gib"] for p in facts["memory"]["parts"] if p["name"].startswith("activations"))
    assert phases["optimizer step"] == pytest.approx(phases["training step"] - activations, abs=0.002)


def test_plan_reads_the_largest_bucket_of_the_prepared_dataset(tiny_dataset, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.toml",
        {"model": {"base": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, "data": {"folder": str(tiny_dataset)}},
    )
    result = runner.invoke(app, ["plan", str(recipe), "--json"])
    facts = json.loads(result.output)
    # 64x64, 80x48 and 48x80 photos: at 512 px the square ones train at 512x512, the others at 640x384 / 384x640
    # (less area), so the largest bucket is the square one, found in the data
    assert facts["memory"]["bucket"] == [512, 512]
    assert facts["memory"]["bucket_source"] == "the largest of 8 images of the dataset at data.resolution 512"
    assert facts["architecture"] == "sd15" and facts["card"]["fits"] is None
    smaller = runner.invoke(app, ["plan", str(recipe), "--json", "--set", "data.resolution=256"])
    assert json.loads(smaller.output)["memory"]["bucket"] == [256, 256]


def test_an_unknown_gpu_lists_the_close_names():
    with pytest.raises(RecipeError, match=r"--gpu 'RTX 3060': .*close: RTX 3060 12GB, RTX 3060 Ti 8GB"):
        find_gpu("RTX 3060")
    assert find_gpu("rtx 4090 24gb") == 24


def test_fit_applies_the_cheapest_changes_first_and_writes_the_fitted_recipe(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.toml",
        {
            "model": {"base": "stabilityai/stable-diffusion-xl-base-1.0"},
            "data": {"folder": str(tmp_path / "data"), "resolution": 1024},
            "lora": {"rank": 64, "lora_alpha": 64.0},
            "train": {"optimizer": "adamw", "mixed_precision": "fp16", "batch_size": 2},
        },
    )
    out = tmp_path / "fitted.toml"
    result = runner.invoke(app, ["plan", str(recipe), "--fit", "12GB", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    changed = [line.split(":")[0].strip() for line in lines if line.startswith("  ") and "->" in line]
    order = [
        "train.cache_latents",
        "data.shuffle_tags",
        "data.caption_dropout_tags",
        "train.gradient_checkpointing",
        "train.optimizer",
        "model.weight_dtype",
        "train.full_bf16",
        "lora.train_text_encoder",
        "lora.rank",
        "data.resolution",
        "train.batch_size",
    ]
    assert changed and changed == sorted(changed, key=order.index)  # cheapest first
    assert changed[0] == "train.gradient_checkpointing"
    fitted = estimate(load_recipe(out), "sdxl")
    assert fitted.verdict(12, "linux")[0] and not estimate(load_recipe(recipe), "sdxl").verdict(12, "linux")[0]
    assert any(
        line.startswith("  lorakit train ") and "--set train.gradient_checkpointing=true" in line for line in lines
    )
    assert "+gradient_checkpointing = true" in result.output


def test_the_fitted_command_and_the_fitted_recipe_are_the_same_valid_recipe(tmp_path):
    """Changes that set two keys (half-precision weights need their autocast; a halved rank halves its alpha) are
    all in the printed command, and both it and the written recipe pass train's checks."""
    from lorakit.plan import fit, plan
    from lorakit.train.setup import _precision

    recipe = write_recipe(
        tmp_path / "r.toml",
        {
            "model": {"base": "stabilityai/stable-diffusion-xl-base-1.0"},
            "data": {"folder": str(tmp_path / "data"), "resolution": 1024},
            "lora": {"rank": 64, "lora_alpha": 32.0, "train_text_encoder": False},
            "train": {"mixed_precision": "no", "gradient_checkpointing": True},
        },
    )
    out = tmp_path / "fitted.toml"
    result = runner.invoke(app, ["plan", str(recipe), "--fit", "6GB", "--out", str(out)])
    assert result.exit_code == 0, result.output
    command = next(line for line in result.output.splitlines() if line.startswith("  lorakit train "))
    overrides = [part.strip() for part in command.split("--set ")[1:]]
    # float32 -> float16 -> float8: float8 weights need no autocast, but the float16 step set it and it stays
    assert 'model.weight_dtype="float8"' in overrides and 'train.mixed_precision="fp16"' in overrides
    values = dict(o.split("=", 1) for o in overrides)
    assert int(values["lora.rank"]) < 64 and float(values["lora.lora_alpha"]) / int(values["lora.rank"]) == 0.5
    from_command, written = load_recipe(recipe, overrides), load_recipe(out)
    assert from_command == dataclasses.replace(written, source=from_command.source)
    precision = written.train.mixed_precision
    assert _precision(written, lambda _: None)[0] in (precision, "bf16", "no")  # no "weights need autocast" refusal
    # an [embedding] only run trains no LoRA: --fit leaves the LoRA's settings alone, and its recipe stays valid
    only = recipe_from_dict(
        {
            "model": {"base": "stabilityai/stable-diffusion-xl-base-1.0"},
            "data": {"folder": str(tmp_path / "data"), "resolution": 1024},
            "embedding": {"token": "ohwx", "only": True},
        }
    )
    found = fit(plan(only, arch="sdxl"), 6)
    assert found.changes and not any(key.startswith("lora.") for key, *_ in found.changes)
    recipe_from_dict(recipe_to_dict(found.recipe))


def test_fit_drops_extra_resolutions_above_the_resolution_and_keeps_the_rest_valid(tmp_path):
    """An extra resolution above data.resolution sets the largest bucket: --fit drops it before lowering the
    resolution, and a lowered resolution takes the extra ones that are no longer below it along (a recipe that
    repeated a resolution would be refused)."""
    from lorakit.plan import fit, plan

    recipe = recipe_from_dict(
        {
            "model": {"base": "stabilityai/stable-diffusion-xl-base-1.0"},
            "data": {"folder": str(tmp_path / "data"), "resolution": 1024, "extra_resolutions": [1280, 896, 512]},
            "train": {"gradient_checkpointing": True},
        }
    )
    found = fit(plan(recipe, arch="sdxl"), 6)
    keys = [key for key, *_ in found.changes]
    assert "data.extra_resolutions" in keys
    assert "data.resolution" not in keys or keys.index("data.extra_resolutions") < keys.index("data.resolution")
    data = found.recipe.data
    assert all(side < data.resolution for side in data.extra_resolutions)
    assert data.extra_resolutions == [s for s in (896, 512) if s < data.resolution]  # the smaller ones kept
    recipe_from_dict(recipe_to_dict(found.recipe))  # valid, as written by --out


def test_fit_turns_per_tag_dropout_off_when_cached_text_is_what_fits():
    from lorakit.plan import fit, plan

    recipe = _recipe(
        data={"caption_dropout_tags": 0.1},
        train={"gradient_checkpointing": True, "cache_latents": True},
    )
    before = plan(recipe, arch="sdxl")
    assert "text caching" not in before.memory.phases  # tags change per step: the text encoders stay on the GPU
    without = estimate(_recipe(train={"gradient_checkpointing": True, "cache_latents": True}), "sdxl")
    target = (before.memory.process_gib + without.process_gib) / 2 / (1 - 0.05)
    found = fit(before, target)
    assert found.fits and [c[0] for c in found.changes] == ["data.caption_dropout_tags"]
    assert found.recipe.data.caption_dropout_tags == 0.0 and "text caching" in found.memory.phases


def test_fit_offers_full_bf16_after_float8_to_a_bf16_recipe():
    """A bf16 run that misses by less than its LoRA's float32 bytes: after float8 weights, the LoRA in bfloat16 is
    the next change, before the text encoder or the rank. An fp16 run is never offered it (it needs bf16)."""
    from lorakit.plan import fit, plan

    sections = {
        "model": {"weight_dtype": "float8"},
        "lora": {"rank": 128, "lora_alpha": 128.0},
        "train": {"gradient_checkpointing": True, "mixed_precision": "bf16"},
    }
    before = plan(_recipe(**sections), arch="sdxl")
    trained = sum(before.memory.trainable)
    target = (before.memory.process_gib - 2 * trained / GIB) / (1 - 0.05)  # half of what full_bf16 saves
    found = fit(before, target)
    assert found.fits and [c[0] for c in found.changes] == ["train.full_bf16"]
    assert found.memory.allocated_gib == pytest.approx(before.memory.allocated_gib - 4 * trained / GIB)
    recipe_from_dict(recipe_to_dict(found.recipe))  # valid, as written by --out
    fp16 = plan(_recipe(**{**sections, "train": {**sections["train"], "mixed_precision": "fp16"}}), arch="sdxl")
    assert "train.full_bf16" not in [c[0] for c in fit(fp16, target).changes]


def test_fit_says_the_smallest_card_when_nothing_fits(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.toml",
        {"model": {"base": "stabilityai/stable-diffusion-xl-base-1.0"}, "data": {"folder": str(tmp_path / "d")}},
    )
    result = runner.invoke(app, ["plan", str(recipe), "--fit", "2GB"])
    assert result.exit_code == 2
    assert (
        "--fit 2 GiB: even with every change" in result.output
        and "the smallest common card it fits is" in result.output
    )


@pytest.fixture(scope="module")
def tiny_training_unet():
    from lorakit.adapters import freeze_except_lora, inject_lora

    from .tiny import build_tiny_components

    torch.manual_seed(0)
    unet = build_tiny_components()["unet"]
    inject_lora(unet, "unet", rank=8, lora_alpha=8.0, dropout=0.0, target_modules="transformer")
    freeze_except_lora(unet)
    return unet


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_counted_activations_match_what_cpu_training_allocates(tiny_training_unet, checkpointing):
    from lorakit.memory import counted_activations

    unet = tiny_training_unet.train()
    (unet.enable_gradient_checkpointing if checkpointing else unet.disable_gradient_checkpointing)()
    batch, side, scale = 2, 48, 8  # latents of 48x48: 2,304 tokens in the first attention blocks
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, side, side, generator=generator)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([100, 700])

    def step():
        unet(latents, timesteps, encoder_hidden_states=context).sample.square().mean().backward()
        unet.zero_grad(set_to_none=True)

    allocated = allocation_peak(step)
    meta = copy.deepcopy(unet).to("meta")
    predicted = counted_activations(meta, batch, (side * scale, side * scale), scale, checkpointing)
    assert abs(predicted - allocated) <= 0.05 * allocated, (predicted / 2**20, allocated / 2**20)  # measured: 0.3 %
    assert allocated > 8 * 2**20  # activations, not noise: several MiB at this size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_lora_gradients_and_optimizer_state_are_the_bytes_cpu_training_allocates(tiny_training_unet, dtype):
    """Float32 LoRA, and train.full_bf16's bfloat16 one (whose gradients and AdamW state are bfloat16 too)."""
    from lorakit.adapters import lora_parameters

    unet = copy.deepcopy(tiny_training_unet)
    meta = copy.deepcopy(unet).to("meta")
    sizes = [p.numel() for p in lora_parameters(meta)]
    params = lora_parameters(unet)
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype)
    predicted_weights = sum(p.numel() * 4 for p in meta.parameters()) - (4 - dtype.itemsize) * sum(sizes)
    optimizer = torch.optim.AdamW(params)

    def step():
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()

    allocated = allocation_peak(step)  # gradients and the two moments (and the step counters)
    weights = sum(p.untyped_storage().nbytes() for p in unet.parameters())
    assert weights == predicted_weights
    predicted = dtype.itemsize * sum(sizes) + optimizer_state_bytes("adamw", sizes, dtype.itemsize)
    assert abs(allocated - predicted) <= 0.10 * predicted, (allocated, predicted)


def test_readme_fit_table_is_the_shipped_recipes_plan():
    from pathlib import Path

    from lorakit.plan import recipes_table

    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- fit-table:start -->\n")[1].split("\n<!-- fit-table:end -->")[0]
    recipes = sorted(str(p) for p in (root / "recipes").glob("*.toml"))
    assert block == recipes_table(recipes), "regenerate it with `python -m lorakit.plan recipes/*.toml`"


def test_a_half_precision_base_loads_into_the_memory_the_plan_says(tiny_base, tmp_path):
    """A float16 diffusers folder trained in float16 is read in float16 (no float32 copy on the way: that took 3.9 GB
    for SD 1.5), and what it holds is the plan's load figure: U-Net and text encoder in float16, VAE in float32."""
    from lorakit.models import load_base

    from .conftest import peak_and_result
    from .tiny import save_in_dtype

    half = save_in_dtype(tiny_base, tmp_path / "half", torch.float16)
    peak, base = peak_and_result(lambda: load_base(str(half), weight_dtype="float16"))
    modules = {"unet": base.unet, "vae": base.vae, "text_encoder": base.text_encoders[0]}
    held = sum(p.numel() * p.element_size() for m in modules.values() for p in m.parameters())
    assert base.unet.dtype == base.text_encoders[0].dtype == torch.float16 and base.vae.dtype == torch.float32
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    recipe = _recipe(model={"base": str(half), "weight_dtype": "float16"})
    assert estimate(recipe, "sd15", counts=counts, trainable=[1]).loaded_gib * GIB == held
    assert peak < 1.2 * held, (peak, held)  # read as float32 first: 2.0x


def test_a_local_base_is_planned_on_its_own_configs(trained_run, tiny_base, tiny_dataset, tmp_path):
    """A diffusers folder on disk describes its own models: the plan counts the tiny base's weights and the very
    LoRA tensors training added to it, not a full-size SD 1.5."""
    from diffusers import StableDiffusionPipeline

    from lorakit.plan import plan, plan_lines

    from .conftest import make_recipe_dict

    recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 6}))
    result = plan(recipe)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    unet = next(p for p in result.memory.parts if p.name.startswith("U-Net weights"))
    assert unet.gib * GIB == sum(p.numel() for p in pipe.unet.parameters()) * 4
    assert sum(result.memory.trainable) == trained_run.trainable_parameters  # U-Net and text encoder LoRA
    assert result.memory.configs == f"the base's own configs in {tiny_base.resolve()}"
    assert "parts counted on the base's own configs" in plan_lines(result)[0]


def test_a_local_sdxl_base_is_planned_with_both_text_encoders(sdxl_run, tiny_sdxl, tiny_dataset, tmp_path):
    from lorakit.plan import plan

    from .conftest import make_recipe_dict

    result, _ = sdxl_run
    sections = {"lora": {"train_text_encoder": True}, "train": {"max_steps": 3}}
    planned = plan(recipe_from_dict(make_recipe_dict(tiny_sdxl, tiny_dataset, tmp_path, **sections)))
    assert planned.architecture == "sdxl"  # two text encoders, whatever the tiny U-Net's cross-attention width
    assert sum(planned.memory.trainable) == result.trainable_parameters  # U-Net, CLIP-L and bigG LoRA


def test_a_local_base_with_a_broken_config_is_one_line(tiny_base, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "text_encoder" / "config.json").write_text("{ not json")
    recipe = write_recipe(tmp_path / "r.toml", {"model": {"base": str(base)}, "data": {"folder": str(tmp_path)}})
    result = runner.invoke(app, ["plan", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"model.base: {base / 'text_encoder' / 'config.json'} is not a readable config" in result.output

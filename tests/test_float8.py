"""`model.weight_dtype = "float8"`: frozen Linear and Conv2d weights stored in one byte, computed in the compute
dtype, with nothing but the float8 weights kept for the backward pass; the run trains as a float32 one does."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lorakit.errors import RecipeError
from lorakit.float8 import (
    FLOAT8,
    KEPT_IN_UNET,
    Float8Conv2d,
    Float8Linear,
    dequantize,
    quantize,
    store_in_float8,
    stored_bytes,
)
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_a_scale_per_channel_keeps_small_channels_that_a_plain_cast_flushes():
    torch.manual_seed(0)
    weight = torch.randn(3, 64) * torch.tensor([[1e-4], [1e-2], [1.0]])
    values, scale = quantize(weight)
    assert values.dtype == FLOAT8 and scale.shape == (3,)
    back = dequantize(values, scale, torch.float32)
    for row in range(3):  # 3 mantissa bits: a few per cent, whatever the channel's range
        assert _relative(back[row], weight[row]) < 0.05, row
    plain = weight.to(FLOAT8).float()  # an unscaled cast: magnitudes under 2^-9 are gone
    assert _relative(plain[0], weight[0]) > 0.5
    assert torch.equal(dequantize(*quantize(torch.zeros(2, 4)), torch.float32), torch.zeros(2, 4))


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(24, 16), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 1), nn.Conv2d(8, 8, 3, stride=2, padding=1)],
    ids=["linear", "conv3x3", "conv1x1", "conv-stride2"],
)
def test_a_stored_layer_computes_and_backpropagates_what_its_dequantized_weight_does(layer):
    torch.manual_seed(1)
    layer.requires_grad_(False)
    shape = (2, 5, 24) if isinstance(layer, nn.Linear) else (2, 8, 9, 9)
    x = torch.randn(shape, requires_grad=True)
    stored, _ = store_in_float8(nn.Sequential(layer), torch.float32)
    assert stored == 1 and isinstance(layer, (Float8Linear, Float8Conv2d)) and layer.weight.dtype == FLOAT8
    weight = dequantize(layer.weight, layer.weight_scale, torch.float32).requires_grad_(False)
    if isinstance(layer, nn.Linear):
        reference = F.linear(x, weight, layer.bias)
    else:
        reference = F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    out = layer(x)
    assert torch.equal(out, reference)
    grad = torch.randn_like(out)
    (expected,) = torch.autograd.grad(reference, x, grad)
    (got,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast it computes in the autocast dtype
        assert layer(x).dtype == torch.bfloat16


def test_the_backward_pass_keeps_only_the_float8_weight():
    """No higher-precision copy of a stored weight outlives its forward pass: the graph saves one byte per value."""
    layer = nn.Linear(256, 512).requires_grad_(False)
    plain = nn.Linear(256, 512).requires_grad_(False)
    store_in_float8(nn.Sequential(layer), torch.float32)
    x = torch.randn(4, 256, requires_grad=True)

    def saved_bytes(module) -> int:
        seen: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            module(x).sum()
        return sum(t.numel() * t.element_size() for t in seen)

    assert saved_bytes(layer) == 512 * 256 + 4 * 512  # float8 values and a float32 scale per row
    assert saved_bytes(plain) >= 4 * 512 * 256  # a float32 layer keeps its float32 weight


def test_the_planner_counts_the_bytes_a_stored_sd15_unet_holds():
    """On the real SD 1.5 U-Net (meta device): what `lorakit plan` counts is what storing leaves, and it is half of
    float16 (norms, biases and the first and last convolutions stay float16)."""
    from lorakit.architectures import build_on_meta

    unet = build_on_meta("sd15", "unet").to(torch.float16).requires_grad_(False)
    counted = stored_bytes(unet, 2, KEPT_IN_UNET)
    half = sum(p.numel() for p in unet.parameters()) * 2
    layers, saved = store_in_float8(unet, torch.float16, KEPT_IN_UNET)
    held = sum(t.numel() * t.element_size() for t in (*unet.parameters(), *unet.buffers()))
    assert counted == held == half - saved
    assert layers == 280 and 0.50 < held / half < 0.51  # 1.60 GiB in float16, 0.80 GiB stored
    assert unet.conv_in.weight.dtype == unet.conv_out.weight.dtype == unet.dtype == torch.float16


def _train(base, dataset, out, **sections):
    lines: list[str] = []
    recipe = recipe_from_dict(make_recipe_dict(base, dataset, out, **sections))
    return train(recipe, quiet=True, log=lines.append), lines


def _val_losses(result) -> list[float]:
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["val_loss"] for row in rows if "val_loss" in row]


def test_a_float8_base_trains_the_adapter_as_a_float32_base_does(tiny_base, tiny_dataset, tmp_path):
    """The same run on a float32 and a float8 base: the held-out loss falls as far, the adapter is float32 and
    ordinary, and gradient checkpointing recomputes the stored layers exactly."""
    sections = {
        "train": {"max_steps": 30, "unet_lr": 3e-3, "text_encoder_lr": 1e-3, "optimizer": "adamw"},
        "validation": {"folder": str(tiny_dataset), "every_steps": 30, "timesteps": [300, 600]},
        "lora": {"rank": 8},
    }
    full, _ = _train(tiny_base, tiny_dataset, tmp_path / "full", **sections)
    result, lines = _train(tiny_base, tiny_dataset, tmp_path / "f8", model={"weight_dtype": "float8"}, **sections)
    said = [line for line in lines if line.startswith("model.weight_dtype:")]
    assert len(said) == 1 and "stored in float8 e4m3 with a scale per output channel" in said[0], lines
    unet, encoder = result.models["unet"], result.models["text_encoder"]
    frozen = {p.dtype for n, p in unet.named_parameters() if not p.requires_grad and n.endswith("weight")}
    assert frozen == {FLOAT8, torch.float32}  # conv_in, conv_out and the norms keep float32
    assert {p.dtype for p in unet.parameters() if p.requires_grad} == {torch.float32}
    assert any(isinstance(m, Float8Linear) for m in encoder.modules())
    start = _val_losses(_train(tiny_base, tiny_dataset, tmp_path / "none", **_no_steps(sections))[0])[-1]
    trained_full, trained_f8 = _val_losses(full)[-1], _val_losses(result)[-1]
    assert trained_full < 0.8 * start, (start, trained_full)
    assert trained_f8 < 0.8 * start and abs(trained_f8 - trained_full) < 0.1 * (start - trained_full)
    assert load_file(str(result.adapter)).keys() == load_file(str(full.adapter)).keys()
    checkpointed, _ = _train(
        tiny_base,
        tiny_dataset,
        tmp_path / "gc",
        model={"weight_dtype": "float8"},
        **{**sections, "train": {**sections["train"], "max_steps": 3, "gradient_checkpointing": True}},
    )
    plain, _ = _train(
        tiny_base,
        tiny_dataset,
        tmp_path / "plain",
        model={"weight_dtype": "float8"},
        **{**sections, "train": {**sections["train"], "max_steps": 3}},
    )
    for key, tensor in load_file(str(plain.adapter)).items():
        assert torch.equal(tensor, load_file(str(checkpointed.adapter))[key]), key


def _no_steps(sections: dict) -> dict:
    """The same run with nothing learned: the held-out loss the base starts from."""
    train = {**sections["train"], "max_steps": 1, "unet_lr": 0.0, "text_encoder_lr": 0.0}
    return {**sections, "train": train, "validation": {**sections["validation"], "every_steps": 1}}


def test_float8_under_bf16_autocast_computes_in_bf16(tiny_base, tiny_dataset, tmp_path):
    result, lines = _train(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 2, "mixed_precision": "bf16"},
        model={"weight_dtype": "float8"},
    )
    unet = result.models["unet"]
    stored = [m for m in unet.modules() if isinstance(m, (Float8Linear, Float8Conv2d))]
    assert stored and {m.compute_dtype for m in stored} == {torch.bfloat16}
    assert unet.conv_in.weight.dtype == torch.bfloat16  # read in the compute dtype, then stored
    assert any("they compute in bfloat16" in line for line in lines)
    assert all(torch.isfinite(t).all() for t in load_file(str(result.adapter)).values())


def test_float8_with_dora_is_refused_by_name(tiny_base, tiny_dataset, tmp_path):
    with pytest.raises(RecipeError, match=r'model.weight_dtype: "float8" with DoRA, which reads the frozen weights'):
        recipe_from_dict(
            make_recipe_dict(
                tiny_base, tiny_dataset, tmp_path, model={"weight_dtype": "float8"}, lora={"use_dora": True}
            )
        )


@pytest.mark.slow
def test_the_toy_concept_learned_on_a_float8_base_draws_on_the_full_precision_base(tmp_path):
    """The toy recipe on the real toy base with its weights stored in float8; the adapter is then drawn on the
    float32 base, as a user loads it: it learns the concept as the float32 run does (measured in one run: fidelity
    0.92 for float32 and 0.88 for float8, prior accuracy 0.91 for both against the base's 0.93)."""
    from lorakit.toy import train_concept
    from lorakit.toy.build import build_toy_base
    from lorakit.toy.evaluate import evaluate, toy_pipeline

    base = build_toy_base(quiet=True, log=lambda _: None)
    before = evaluate(toy_pipeline(base))
    lines: list[str] = []
    run = train_concept(base, tmp_path, overrides=('model.weight_dtype="float8"',), quiet=True, log=lines.append)
    assert any("stored in float8 e4m3" in line for line in lines)
    after = evaluate(toy_pipeline(base, run.adapter))
    assert after["fidelity"] >= max(0.8, before["fidelity"] + 0.5), (before["fidelity"], after["fidelity"])
    assert after["prior_accuracy"] >= before["prior_accuracy"] - 0.05, (
        before["prior_accuracy"],
        after["prior_accuracy"],
    )


def test_float8_text_encoders_false_stores_the_unet_alone(tiny_base, tiny_dataset, tmp_path):
    model = {"weight_dtype": "float8", "float8_text_encoders": False}
    result, lines = _train(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 1}, model=model)
    assert any(isinstance(m, Float8Linear) for m in result.models["unet"].modules())
    assert not any(isinstance(m, (Float8Linear, Float8Conv2d)) for m in result.models["text_encoder"].modules())
    assert any("weights of the U-Net (model.float8_text_encoders = false) stored" in line for line in lines)
    with pytest.raises(RecipeError, match=r'model.float8_text_encoders: chooses what weight_dtype = "float8" stores'):
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, model={"float8_text_encoders": False}))


def test_the_planner_counts_text_encoders_kept_in_the_compute_dtype():
    from lorakit.memory import estimate

    def parts(**model):
        recipe = recipe_from_dict(
            {
                "model": {"base": "stabilityai/stable-diffusion-xl-base-1.0", **model},
                "data": {"folder": "no-dataset-yet", "resolution": 1024},
                "lora": {"train_text_encoder": True},
                "train": {"mixed_precision": "bf16", "gradient_checkpointing": True},
            }
        )
        return [(p.name, p.gib) for p in estimate(recipe, "sdxl").parts if p.phase == "training step"]

    def part(found, start):
        return next(gib for name, gib in found if name.startswith(start))

    both, unet_only = parts(weight_dtype="float8"), parts(weight_dtype="float8", float8_text_encoders=False)
    unet = "U-Net weights (float8 + bfloat16)"
    assert part(both, unet) == part(unet_only, unet) == pytest.approx(2.40, abs=0.005)
    assert part(both, "text encoder weights (float8 + bfloat16)") == pytest.approx(0.86, abs=0.005)
    assert part(unet_only, "text encoder weights (bfloat16)") == pytest.approx(1.52, abs=0.005)

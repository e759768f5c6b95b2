"""Target presets on the real SD 1.5 / 2.1 / SDXL architectures (meta device), and the frozen base."""

from __future__ import annotations

import pytest
import torch

from lorakit.adapters import PRESETS, matching_modules
from lorakit.architectures import build_on_meta
from lorakit.formats.kohya import kohya_name


def _unet(family):
    return build_on_meta(family, "unet")


def _text_encoder(family, name="text_encoder"):
    return build_on_meta(family, name)


@pytest.mark.parametrize(
    ("family", "transformer", "attention"), [("sd15", 192, 128), ("sd21", 192, 128), ("sdxl", 722, 560)]
)
def test_unet_module_counts_match_the_real_architectures(family, transformer, attention):
    unet = _unet(family)
    assert len(matching_modules(unet, PRESETS["transformer"]["unet"])) == transformer
    assert len(matching_modules(unet, PRESETS["attention"]["unet"])) == attention


@pytest.mark.parametrize(
    ("family", "name", "count"),
    [
        ("sd15", "text_encoder", 72),
        ("sd21", "text_encoder", 138),
        ("sdxl", "text_encoder", 72),
        ("sdxl", "text_encoder_2", 192),
    ],
)
def test_text_encoder_module_counts(family, name, count):
    assert len(matching_modules(_text_encoder(family, name), PRESETS["transformer"]["text_encoder"])) == count


def test_sd15_kohya_names_match_the_published_layout():
    unet_names = {kohya_name("unet", n) for n in matching_modules(_unet("sd15"), PRESETS["transformer"]["unet"])}
    te_names = {
        kohya_name("text_encoder", n)
        for n in matching_modules(_text_encoder("sd15"), PRESETS["transformer"]["text_encoder"])
    }
    assert {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_2_attentions_1_proj_in",
    } <= unet_names
    assert {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_11_mlp_fc2",
    } <= te_names
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in te_names)
    assert len(unet_names) == 192 and len(te_names) == 72


def test_only_lora_parameters_are_trainable_and_the_base_is_unchanged(trained_run, tiny_base):
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    trainable = 0
    for module in trained_run.models.values():
        for name, param in module.named_parameters():
            assert param.requires_grad == (".lora_A." in name or ".lora_B." in name), name
            trainable += param.numel() if param.requires_grad else 0
    assert trainable == trained_run.trainable_parameters > 0
    base_weights = {n: p for n, p in trained_run.models["unet"].named_parameters() if "lora_" not in n}
    for name, param in original.named_parameters():
        key = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(base_weights.get(name, base_weights.get(key)), param), name


def test_partial_text_encoder_attention_targets_are_refused(tiny_base):
    from transformers import CLIPTextModel

    from lorakit.adapters import inject_lora
    from lorakit.errors import RecipeError

    te = CLIPTextModel.from_pretrained(tiny_base, subfolder="text_encoder")
    with pytest.raises(RecipeError, match="adapt all four attention projections together"):
        inject_lora(te, "text_encoder", rank=2, lora_alpha=2, dropout=0, target_modules=["q_proj", "k_proj", "v_proj"])
    with pytest.raises(RecipeError, match="matches no Linear or Conv2d module"):
        inject_lora(te, "text_encoder", rank=2, lora_alpha=2, dropout=0, target_modules=["nonexistent"])


def test_adamw8bit_keeps_uint8_state_for_large_lora_tensors(tiny_base):
    from diffusers import UNet2DConditionModel

    from lorakit.adapters import inject_lora, lora_parameters
    from lorakit.optim import build_optimizer
    from lorakit.recipe import TrainSection

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    inject_lora(unet, "unet", rank=64, lora_alpha=64, dropout=0, target_modules="attention")
    params = lora_parameters(unet)
    optimizer = build_optimizer(TrainSection(optimizer="adamw8bit"), [{"params": params, "lr": 1e-3}])
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    large = [p for p in params if p.numel() >= 4096]
    assert large, "the test needs LoRA tensors of at least 4096 elements"
    for p in large:
        assert optimizer.state[p]["state1"].dtype == torch.uint8
        assert optimizer.state[p]["state2"].dtype == torch.uint8

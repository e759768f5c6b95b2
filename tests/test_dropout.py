"""kohya's rank and module dropout: what they drop while training, and that nothing else sees them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.dropout import AdapterDropout
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict


def _lora_model(rank: int = 64):
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Conv2d(32, 32, 1))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["0", "1"], init_lora_weights=False)
    return inject_adapter_in_model(config, model)


def _down_outputs(model, x):
    """The output of the Linear layer's LoRA down projection, as the hooks leave it."""
    seen = []
    handle = model[0].lora_A["default"].register_forward_hook(lambda _m, _a, out: seen.append(out))
    model[0](x)
    handle.remove()
    return seen[0]


def test_rank_dropout_drops_that_share_of_ranks_per_sample_and_rescales_the_rest():
    model = _lora_model()
    x = torch.randn(16, 4, 32)  # 16 samples of 4 tokens
    plain = _down_outputs(model, x)
    hooks = AdapterDropout([model], rank=0.25)
    assert hooks.layers == 2
    torch.manual_seed(0)
    dropped = _down_outputs(model, x)
    kept = dropped[:, 0, :] != 0  # one decision per sample and rank, shared by the sample's tokens
    assert torch.equal(dropped != 0, kept[:, None, :].expand_as(dropped))
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    assert torch.allclose(dropped[:, :, kept[0]][0], plain[:, :, kept[0]][0] / 0.75)
    # A convolution's ranks are its channels.
    seen = []
    model[1].lora_A["default"].register_forward_hook(lambda _m, _a, out: seen.append(out))
    model[1](torch.randn(8, 32, 5, 5))
    per_channel = seen[0][:, :, 0, 0] != 0
    assert torch.equal(seen[0] != 0, per_channel[:, :, None, None].expand_as(seen[0]))
    # Outside training (validation, samples, merges) the adapter is whole.
    model.eval()
    assert torch.equal(_down_outputs(model, x), plain)
    hooks.remove()


def test_neuron_dropout_drops_single_values_of_the_down_projection():
    model = _lora_model()
    x = torch.randn(16, 4, 32)
    plain = _down_outputs(model, x)
    AdapterDropout([model], neuron=0.25)
    torch.manual_seed(0)
    dropped = _down_outputs(model, x)
    kept = dropped != 0
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    assert not torch.equal(kept, kept[:, :1, :].expand_as(kept))  # value by value, not rank by rank
    assert torch.allclose(dropped[kept], plain[kept] / 0.75)


def test_module_dropout_switches_whole_modules_off_at_that_rate():
    model = _lora_model(rank=4)
    base = torch.nn.Linear(32, 32)
    base.load_state_dict({"weight": model[0].base_layer.weight, "bias": model[0].base_layer.bias})
    AdapterDropout([model], module=0.3)
    torch.manual_seed(0)
    x = torch.randn(2, 32)
    off = sum(torch.equal(model[0](x), base(x)) for _ in range(400))
    assert 0.24 < off / 400 < 0.36
    model.eval()
    assert not torch.equal(model[0](x), base(x))


def _run(base, dataset, out, lines=None, **sections):
    recipe = recipe_from_dict(make_recipe_dict(base, dataset, out, **sections))
    return train(recipe, quiet=True, log=(lines.append if lines is not None else lambda _: None))


def test_training_with_rank_and_module_dropout_replays_its_masks_under_gradient_checkpointing(
    tiny_base, tiny_dataset, tmp_path
):
    dropout = {"neuron_dropout": 0.1, "rank_dropout": 0.5, "module_dropout": 0.2}
    lines: list[str] = []
    plain = _run(tiny_base, tiny_dataset, tmp_path / "a", lines, lora=dropout, train={"max_steps": 3})
    said = "lora: neuron dropout 0.1, rank dropout 0.5, module dropout 0.2 on "
    assert any(line.startswith(said) for line in lines), lines
    with safe_open(str(plain.adapter), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["ss_network_args"]) == {"rank_dropout": "0.5", "module_dropout": "0.2"}
    assert metadata["ss_network_dropout"] == "0.1"
    # Recomputed forward passes draw the masks they drew the first time: the same adapter, to rounding.
    checkpointed = _run(
        tiny_base, tiny_dataset, tmp_path / "b", lora=dropout, train={"max_steps": 3, "gradient_checkpointing": True}
    )
    a, b = load_file(str(plain.adapter)), load_file(str(checkpointed.adapter))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    # And the masks do change what is learned.
    undropped = load_file(str(_run(tiny_base, tiny_dataset, tmp_path / "c", train={"max_steps": 3}).adapter))
    assert any(not torch.allclose(a[key], undropped[key], atol=1e-4) for key in a)


@pytest.mark.parametrize(
    ("lora", "fragment"),
    [
        ({"type": "lokr", "rank_dropout": 0.1}, "lora.rank_dropout: drops parts of a LoRA's down and up projections"),
        ({"use_dora": True, "module_dropout": 0.1}, "lora.module_dropout: not with DoRA"),
        ({"rank_dropout": 1.0}, "lora.rank_dropout: 1.0 is outside 0..0.99"),
    ],
)
def test_dropout_is_refused_where_it_has_nothing_to_drop(lora, fragment):
    from lorakit.errors import RecipeError

    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({"model": {"base": "x/y"}, "lora": lora})
    assert fragment in str(caught.value)

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


def test_a_module_off_for_a_whole_step_is_left_alone_by_the_optimizer():
    """As in kohya, where a switched-off module never runs: no gradient, so AdamW gives it neither a momentum step
    nor weight decay (a zero gradient would give it both). With two micro-batches a module is idle only when both
    switched it off."""
    torch.manual_seed(0)
    model = _lora_model(rank=4)
    hooks = AdapterDropout([model], module=0.5)
    modules = {"linear": model[0], "conv": model[1]}
    weights = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(weights, lr=0.01, weight_decay=0.1)
    x, y = torch.randn(4, 32), torch.randn(4, 32, 3, 3)
    idle_seen = used_seen = 0
    for step in range(16):
        for _ in range(2):
            (model[0](x).pow(2).mean() + model[1](y).pow(2).mean()).backward()
        idle = hooks.forget_idle_gradients()
        grads = {name: layer.lora_B["default"].weight.grad for name, layer in modules.items()}
        assert idle == sum(g is None for g in grads.values())
        before = {
            name: [p.detach().clone() for p in layer.parameters() if p.requires_grad]
            for name, layer in modules.items()
        }
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, layer in modules.items():
            after = [p for p in layer.parameters() if p.requires_grad]
            unchanged = all(torch.equal(a, b) for a, b in zip(before[name], after, strict=True))
            assert unchanged == (grads[name] is None), (step, name)
            if step:  # after the first step AdamW has momentum that a zero gradient would still apply
                idle_seen += grads[name] is None
                used_seen += grads[name] is not None
    assert idle_seen >= 3 and used_seen >= 15  # idle in about a quarter of the steps (0.5 x 0.5)
    assert hooks.forget_idle_gradients() == 2  # no forward pass since: both count as idle, harmlessly


def _run(base, dataset, out, lines=None, **sections):
    recipe = recipe_from_dict(make_recipe_dict(base, dataset, out, **sections))
    return train(recipe, quiet=True, log=(lines.append if lines is not None else lambda _: None))


def test_training_with_rank_and_module_dropout_replays_its_masks_under_gradient_checkpointing(
    tiny_base, tiny_dataset, tmp_path, monkeypatch
):
    dropout = {"neuron_dropout": 0.1, "rank_dropout": 0.5, "module_dropout": 0.2}
    lines: list[str] = []
    idle: list[int] = []
    real = AdapterDropout.forget_idle_gradients
    monkeypatch.setattr(AdapterDropout, "forget_idle_gradients", lambda *a: idle.append(real(*a)) or idle[-1])
    plain = _run(tiny_base, tiny_dataset, tmp_path / "a", lines, lora=dropout, train={"max_steps": 3})
    assert len(idle) == 3 and sum(idle) > 0  # once per optimizer step, and some modules were idle for a whole step
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

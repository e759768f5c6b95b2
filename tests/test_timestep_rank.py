"""T-LoRA (timestep-dependent rank): the schedule, the mask where it acts (forward pass and gradient), the exported
file drawn under the schedule exactly as trained (and at full rank as other loaders draw it), resume, bad recipes."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from lorakit import adapters
from lorakit.errors import LorakitError
from lorakit.recipe import recipe_from_dict
from lorakit.timestep_rank import TimestepRanks, active_ranks
from lorakit.train import train

from .conftest import make_recipe_dict

RANK = 4


def test_the_schedule_runs_from_every_rank_on_clean_images_to_the_minimum_on_noise():
    t = torch.tensor([0, 250, 500, 750, 999])
    assert active_ranks(t, 1000, 64, 1).tolist() == [64, 48, 32, 16, 1]
    assert active_ranks(t, 1000, 64, 8).tolist() == [64, 50, 36, 22, 8]
    assert active_ranks(torch.tensor([500]), 1000, 64, 1, exponent=2.0).tolist() == [16]  # 0.25 * 63 -> 15, + 1
    assert active_ranks(t, 1000, 4, 16).tolist() == [4] * 5  # a minimum above the rank: the whole rank


def _adapted_unet(tiny_base):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(f"{tiny_base}/unet")
    adapters.inject_lora(
        unet, "unet", rank=RANK, lora_alpha=RANK, dropout=0.0, target_modules="transformer+conv", conv_rank=RANK
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_B." in name:  # peft starts B at zero: give the adapter something to do
                param.normal_(0, 0.3)
    return unet


def _inputs(timesteps):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(len(timesteps), 4, 16, 16, generator=generator)
    hidden = torch.randn(len(timesteps), 77, 32, generator=generator)
    return latents, torch.tensor(timesteps), hidden


def _truncated(unet, ranks):
    """A copy whose LoRA down projections keep only their first `ranks` rows (what the mask should amount to)."""
    copied = copy.deepcopy(unet)
    with torch.no_grad():
        for name, param in copied.named_parameters():
            if ".lora_A." in name:
                param[ranks:] = 0
    return copied


def test_each_sample_uses_the_ranks_of_its_own_timestep(tiny_base):
    unet = _adapted_unet(tiny_base)
    timesteps = [990, 0, 500]
    latents, t, hidden = _inputs(timesteps)
    masked = TimestepRanks(unet, min_rank=1, exponent=1.0, num_train_timesteps=1000)
    assert masked.modules > 10  # attention, feed-forward and convolution adapters alike
    with torch.no_grad():
        together = unet(latents, t, encoder_hidden_states=hidden).sample
    masked.remove()
    with torch.no_grad():
        full = unet(latents, t, encoder_hidden_states=hidden).sample
    for i, step in enumerate(timesteps):
        ranks = int(active_ranks(torch.tensor(step), 1000, RANK, 1))
        alone = _truncated(unet, ranks)
        with torch.no_grad():
            want = alone(latents[i : i + 1], t[i : i + 1], encoder_hidden_states=hidden[i : i + 1]).sample
        assert torch.allclose(together[i : i + 1], want, atol=1e-5, rtol=0), (together[i] - want[0]).abs().max()
    assert torch.allclose(together[1], full[1], atol=1e-6, rtol=0)  # t = 0: every rank acts
    assert (together[0] - full[0]).abs().max() > 1e-3  # t = 990: one rank of four


def test_masked_ranks_get_no_gradient_at_high_noise(tiny_base):
    unet = _adapted_unet(tiny_base)
    TimestepRanks(unet, min_rank=1, exponent=1.0, num_train_timesteps=1000)
    latents, t, hidden = _inputs([999, 998])
    unet(latents, t, encoder_hidden_states=hidden).sample.square().mean().backward()
    downs = [p.grad for n, p in unet.named_parameters() if ".lora_A." in n]
    ups = [p.grad for n, p in unet.named_parameters() if ".lora_B." in n]
    assert all(g is not None and g[1:].abs().max() == 0 for g in downs)  # rows of the masked ranks
    assert all(g[:, 1:].abs().max() == 0 for g in ups)  # and their columns in the up projections
    assert sum(g[:1].abs().sum() for g in downs) > 0  # the one active rank learns


@pytest.fixture(scope="module")
def tlora_run(tiny_base, tiny_dataset, tmp_path_factory):
    lines: list[str] = []
    sections = {"lora": {"rank": RANK, "lora_alpha": 2.0, "tlora_min_rank": 1}, "train": {"max_steps": 4}}
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path_factory.mktemp("tlora"), **sections)
    return train(recipe_from_dict(recipe), quiet=True, log=lines.append), lines


def _unet_outputs(unet, timesteps):
    latents, t, hidden = _inputs(timesteps)
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=hidden).sample


def test_the_exported_file_is_a_plain_lora_and_lorakit_draws_it_as_trained(tlora_run, tiny_base):
    from diffusers import StableDiffusionPipeline

    from lorakit.generate import resolve_adapters
    from lorakit.models import load_pipeline
    from lorakit.render import apply_adapters

    result, lines = tlora_run
    assert any("use 4 ranks at timestep 0, 2 at 500 and 1 at 999" in line for line in lines)
    with safe_open(str(result.adapter), "pt") as f:
        metadata = f.metadata()
        assert all(
            k.startswith("lora_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in f.keys()
        )
    assert (metadata["lorakit_tlora_min_rank"], metadata["lorakit_tlora_exponent"]) == ("1", "1.0")
    trained = result.models["unet"].eval()
    timesteps = [900, 5]
    want = _unet_outputs(trained, timesteps)

    ours = load_pipeline(str(tiny_base))
    apply_adapters(ours, resolve_adapters([(str(result.adapter), 1.0)])[0])
    got = _unet_outputs(ours.unet, timesteps)
    assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()

    plain = StableDiffusionPipeline.from_pretrained(str(tiny_base))  # any loader: every rank at every step
    plain.load_lora_weights(str(result.adapter))
    full = _unet_outputs(plain.unet, timesteps)
    unscheduled = load_pipeline(str(tiny_base))
    apply_adapters(unscheduled, resolve_adapters([(str(result.adapter), 1.0)])[0], timestep_ranks=False)
    assert torch.allclose(_unet_outputs(unscheduled.unet, timesteps), full, atol=1e-6, rtol=0)
    assert (full[0] - want[0]).abs().max() > 1e-5  # at t = 900 the full rank is another function


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"type": "lokr", "tlora_min_rank": 1}, "T-LoRA masks the ranks of a LoRA; LoKr has none to mask"),
        ({"use_dora": True, "tlora_min_rank": 1}, "T-LoRA with DoRA is not supported"),
        ({"rank": 4, "tlora_min_rank": 8}, r"lora.tlora_min_rank: 8 is more than the rank \(4\); use 1 to 4"),
        ({"tlora_exponent": 2.0}, "set lora.tlora_min_rank too"),
        ({"tlora_min_rank": 0}, r"lora.tlora_min_rank: .*outside 1..4096"),
    ],
)
def test_bad_tlora_recipes_are_refused_in_one_line(tiny_base, tiny_dataset, tmp_path, lora, message):
    with pytest.raises(LorakitError, match=message):
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, lora=lora))


def test_merging_a_tlora_adapter_says_it_is_merged_at_full_rank(tlora_run, tmp_path):
    from lorakit.merge import merge

    result, _ = tlora_run
    lines: list[str] = []
    merge([(str(result.adapter), 1.0)], tmp_path / "merged.safetensors", log=lines.append)
    assert any("trained with T-LoRA's timestep schedule; merged at full rank" in line for line in lines)


@pytest.mark.parametrize(
    "metadata",
    [
        {"lorakit_tlora_min_rank": "0", "lorakit_tlora_exponent": "1.0"},
        {"lorakit_tlora_min_rank": "1", "lorakit_tlora_exponent": "nan"},
        {"lorakit_tlora_min_rank": "1"},
        {"lorakit_tlora_min_rank": "one", "lorakit_tlora_exponent": "1.0"},
        {"lorakit_tlora_min_rank": "1", "lorakit_tlora_exponent": "1.0", "lorakit_tlora_timesteps": "0"},
    ],
)
def test_a_bad_schedule_in_an_adapter_file_is_a_one_line_error(metadata):
    from lorakit.timestep_rank import schedule_from_metadata

    with pytest.raises(LorakitError, match=r"^x.safetensors: the T-LoRA schedule in its metadata .* is not valid$"):
        schedule_from_metadata(metadata, "x.safetensors")
    assert schedule_from_metadata({"ss_network_dim": "8"}, "x.safetensors") is None  # an ordinary LoRA
    written = {"lorakit_tlora_min_rank": "1", "lorakit_tlora_exponent": "1.0", "lorakit_tlora_timesteps": "1000"}
    assert schedule_from_metadata(written, "x.safetensors") == (1, 1.0, 1000)

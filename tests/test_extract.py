"""lorakit extract: a LoRA from the difference between a fine-tuned model and its base.

The fine-tunes here are built so that the right answer is known: the base with a trained adapter merged in (the
adapter is the change), and with changes written into single weights by hand."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.adapters import delta_weight
from lorakit.formats.read import read_adapter_file

from .invoke import fails as _fails
from .invoke import ok as _ok
from .invoke import sd_pipeline as _pipe

CONV = "down_blocks.0.resnets.0.conv1"


def _outputs(pipe):
    """The U-Net's and the text encoder's outputs on fixed inputs."""
    ids = torch.tensor([[0, 5, 9, 14, 1] + [1] * 72])
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        return pipe.unet(latents, torch.tensor([300]), encoder_hidden_states=hidden).sample, hidden


def _changes(state):
    return {
        (component, path): delta_weight(lora, lora.shape)
        for component, modules in state.items()
        for path, lora in modules.items()
    }


@pytest.fixture(scope="module")
def tuned(trained_run, tiny_base, tmp_path_factory):
    """The tiny base with the trained adapter merged in: a fine-tune whose change is exactly that adapter."""
    out = tmp_path_factory.mktemp("tuned") / "tuned"
    _ok(["merge", "--lora", str(trained_run.adapter), "--base", str(tiny_base), "--out", str(out)])
    return out


def test_extracting_a_merged_adapter_gives_it_back_and_loads_in_diffusers(trained_run, tiny_base, tuned, tmp_path):
    out = tmp_path / "extracted.safetensors"
    args = ["extract", str(tuned), "--base", str(tiny_base), "--out", str(out), "--rank", "4"]
    result = _ok([*args, "--save-dtype", "float32"])
    assert result.stdout.strip() == str(out)
    assert "Comparing in float32" in result.stderr
    assert "of the change's energy kept overall" in result.stderr
    trained, extracted = read_adapter_file(trained_run.adapter), read_adapter_file(out)
    assert extracted.layout == "kohya" and extracted.family == "sd1"
    want, got = _changes(trained.state), _changes(extracted.state)
    assert want.keys() == got.keys()  # the same modules, the text encoder's included
    for key, change in want.items():
        torch.testing.assert_close(got[key], change, rtol=0, atol=2e-6, msg=str(key))
    assert {m.rank for modules in extracted.state.values() for m in modules.values()} == {4}
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"
    assert str(tuned) in metadata["lorakit_extracted_from"]
    # in diffusers, the base with the extracted adapter draws what the fine-tune draws
    loaded = _pipe(tiny_base)
    loaded.load_lora_weights(str(out))
    for mine, theirs in zip(_outputs(loaded), _outputs(_pipe(tuned)), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_a_lower_rank_keeps_the_best_approximation_and_says_how_much(trained_run, tiny_base, tuned, tmp_path):
    out = tmp_path / "r1.safetensors"
    args = ["extract", str(tuned), "--base", str(tiny_base), "--out", str(out), "--rank", "1"]
    result = _ok([*args, "--save-dtype", "float32"])
    line = next(line for line in result.stderr.splitlines() if line.startswith("Extracted rank 1:"))
    kept = float(line.split(":")[1].split("%")[0])
    assert 10 < kept < 99.9, line
    for key, change in _changes(read_adapter_file(trained_run.adapter).state).items():
        u, s, vh = torch.linalg.svd(change.reshape(change.shape[0], -1).double())
        best = (s[0] * torch.outer(u[:, 0], vh[0])).reshape(change.shape).float()
        got = _changes(read_adapter_file(out).state)[key]
        torch.testing.assert_close(got, best, rtol=0, atol=2e-6, msg=str(key))


def test_a_half_precision_fine_tune_is_compared_at_its_precision(trained_run, tiny_base, tmp_path):
    """A float16 single file against a float32 base: rounding alone is no change, so the untouched text encoder
    gets no adapter (and is counted), while the U-Net's change comes back to float16's accuracy."""
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in load_file(trained_run.adapter).items() if k.startswith("lora_unet_")}, str(unet_only))
    tuned = tmp_path / "tuned-fp16.safetensors"
    merge = ["merge", "--lora", str(unet_only), "--base", str(tiny_base), "--out", str(tuned)]
    _ok([*merge, "--save-dtype", "float16"])
    out = tmp_path / "extracted.safetensors"
    args = ["extract", str(tuned), "--base", str(tiny_base), "--config", str(tiny_base), "--out", str(out)]
    result = _ok([*args, "--rank", "4"])
    assert "Comparing in float16 (TUNED stores float16, --base float32)" in result.stderr
    text_encoder_modules = len(read_adapter_file(trained_run.adapter).state["text_encoder"])
    assert f"text_encoder: 0 modules, {text_encoder_modules} unchanged (no adapter)" in result.stderr
    extracted = read_adapter_file(out).state
    assert set(extracted) == {"unet"}
    for (component, path), change in _changes(read_adapter_file(unet_only).state).items():
        got = _changes(extracted)[(component, path)]
        assert (got - change).norm() / change.norm() < 0.05, path


def test_changes_no_adapter_carries_are_counted_and_convolutions_come_with_transformer_conv(tiny_base, tmp_path):
    pipe = _pipe(tiny_base)
    conv = pipe.unet.get_submodule(CONV)
    generator = torch.Generator().manual_seed(3)
    up, down = torch.randn(conv.out_channels, 2, generator=generator), torch.randn(2, conv.weight[0].numel())
    change = (0.05 * up @ down).reshape(conv.weight.shape)
    with torch.no_grad():
        conv.weight += change
        pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight.mul_(1.5)
        pipe.unet.conv_in.bias += 0.1
    tuned = tmp_path / "tuned"
    pipe.save_pretrained(tuned)
    plain = _ok(
        ["extract", str(tuned), "--base", str(tiny_base), "--out", str(tmp_path / "a.safetensors"), "--rank", "2"]
    )
    assert "unet: 1 changed tensor left out that --targets transformer+conv extracts" in plain.stderr  # the conv
    assert "unet: 1 changed tensor left out that no LoRA holds (biases, norms, embeddings)" in plain.stderr
    assert set(read_adapter_file(tmp_path / "a.safetensors").state["unet"]) == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    }
    out = tmp_path / "locon.safetensors"
    args = ["extract", str(tuned), "--base", str(tiny_base), "--out", str(out), "--rank", "64", "--conv-rank", "2"]
    locon = _ok([*args, "--targets", "transformer+conv", "--save-dtype", "float32"])
    assert "unet: 1 changed tensor left out that no LoRA holds" in locon.stderr  # the bias
    assert "that --targets transformer+conv extracts" not in locon.stderr
    extracted = read_adapter_file(out).state["unet"]
    assert extracted[CONV].rank == 2 and extracted[CONV].down.shape[2:] == (3, 3)
    torch.testing.assert_close(delta_weight(extracted[CONV], tuple(change.shape)), change, rtol=0, atol=2e-6)
    # the LoCon file loads in diffusers and draws the fine-tune, all but the bias no LoRA holds
    loaded = _pipe(tiny_base)
    loaded.load_lora_weights(str(out))
    with torch.no_grad():
        pipe.unet.conv_in.bias -= 0.1
    for mine, theirs in zip(_outputs(loaded), _outputs(pipe), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_bad_inputs_name_what_is_wrong_and_write_nothing(tiny_base, tiny_base_v, tiny_sdxl, tuned, tmp_path):
    out = tmp_path / "x.safetensors"
    cases = [
        (["extract", str(tiny_base), "--base", str(tiny_base)], "do not differ in any module --targets transformer"),
        (["extract", str(tiny_sdxl), "--base", str(tiny_base)], "is an SDXL model and --base an SD 1.x one"),
        (["extract", str(tiny_base_v), "--base", str(tiny_base)], "it is not a fine-tune of this base"),
        (["extract", str(tmp_path / "nope"), "--base", str(tiny_base)], f"TUNED: {tmp_path / 'nope'} does not exist"),
        (["extract", str(tuned), "--base", str(tmp_path / "gone")], f"--base: {tmp_path / 'gone'} does not exist"),
        (["extract", str(tuned), "--base", str(tiny_base), "--conv-rank", "4"], "--conv-rank"),
        (["extract", str(tuned), "--base", str(tiny_base), "--targets", "everything"], "use attention, transformer"),
        (["extract", str(tuned), "--base", str(tiny_base), "--device", "gpu"], "use cpu, cuda or cuda:N"),
    ]
    for args, fragment in cases:
        _fails([*args, "--out", str(out), "--rank", "4"], fragment)
        assert not out.exists()
    out.write_bytes(b"mine")
    _fails(["extract", str(tuned), "--base", str(tiny_base), "--out", str(out), "--rank", "4"], "already exists")
    assert out.read_bytes() == b"mine"


def test_an_sdxl_fine_tune_gives_back_both_text_encoders_changes(sdxl_run, tiny_sdxl, tmp_path):
    result, _ = sdxl_run
    tuned = tmp_path / "tuned-sdxl"
    _ok(["merge", "--lora", str(result.adapter), "--base", str(tiny_sdxl), "--out", str(tuned)])
    out = tmp_path / "extracted.safetensors"
    run = _ok(
        ["extract", str(tuned), "--base", str(tiny_sdxl), "--out", str(out), "--rank", "4", "--save-dtype", "float32"]
    )
    extracted = read_adapter_file(out)
    assert extracted.family == "sdxl" and set(extracted.state) == {"unet", "text_encoder", "text_encoder_2"}
    with safe_open(str(out), "pt") as f:
        assert any(key.startswith("lora_te2_") for key in f.keys())
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    want, got = _changes(read_adapter_file(result.adapter).state), _changes(extracted.state)
    # CLIP-L's last layer never reaches SDXL's U-Net (it conditions on the penultimate one): its trained adapter is
    # zero, so the fine-tune did not change it and it gets none
    unused = {key for key, change in want.items() if not change.any()}
    assert unused and all(component == "text_encoder" for component, _ in unused)
    assert want.keys() - unused == got.keys()
    assert f"{len(unused)} unchanged (no adapter)" in run.stderr
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=2e-6, msg=str(key))


def test_extract_by_energy_keeps_that_share_with_fewer_ranks(tiny_base, tuned, tmp_path):
    out = tmp_path / "dynamic.safetensors"
    args = ["extract", str(tuned), "--base", str(tiny_base), "--out", str(out), "--rank", "4", "--energy", "0.8"]
    result = _ok(args)
    line = next(line for line in result.stderr.splitlines() if line.startswith("Extracted keeping 80.00%"))
    assert "(rank at most 4): ranks 1 to" in line
    ranks = [m.rank for modules in read_adapter_file(out).state.values() for m in modules.values()]
    assert max(ranks) <= 4 and min(ranks) < 4
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "Dynamic" and '"energy": 0.8' in metadata["lorakit_extracted_from"]


def test_a_cuda_device_this_machine_lacks_is_named(tiny_base, tuned, tmp_path, monkeypatch):
    out = tmp_path / "x.safetensors"
    args = ["extract", str(tuned), "--base", str(tiny_base), "--out", str(out), "--rank", "4"]
    if not torch.cuda.is_available():
        _fails([*args, "--device", "cuda"], "--device cuda: no CUDA device is visible here; use --device cpu")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _fails([*args, "--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device(s), cuda:0 to cuda:")
    assert not out.exists()

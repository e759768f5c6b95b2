"""SDXL single-file checkpoints: written by merge, read back by diffusers and by lorakit, recognised from their keys,
read with the shipped configs, trained on; refiners, inpainting models and other architectures refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.errors import LorakitError

from .conftest import make_recipe_dict, peak_and_result

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _assert_same_weights(a, b):
    for name in COMPONENTS:
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        different = [k for k in left if not torch.equal(left[k], right[k])]
        assert not different, (name, different[:3])


def test_an_sdxl_single_file_written_by_merge_reads_back_equal(sdxl_run, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from lorakit.merge import merge
    from lorakit.models import load_pipeline

    result, _ = sdxl_run
    adapter = [(str(result.adapter), 0.8)]
    merge(adapter, tmp_path / "folder", base=str(tiny_sdxl), log=lambda _: None)
    out = merge(adapter, tmp_path / "merged.safetensors", base=str(tiny_sdxl), log=lambda _: None).out
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys and "v_pred" not in keys

    folder = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "folder"))
    by_diffusers = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_sdxl), local_files_only=True)
    _assert_same_weights(folder, by_diffusers)
    lines: list[str] = []
    by_lorakit = load_pipeline(str(out), config=str(tiny_sdxl), log=lines.append)
    _assert_same_weights(folder, by_lorakit)
    assert any("no v_pred key; prediction type epsilon from model.config" in line for line in lines)


def test_full_size_sdxl_names_are_the_ones_diffusers_reads_and_recognises():
    """The real SDXL architecture on the meta device: every name lorakit writes maps back onto the module it came
    from through diffusers' own single-file reader, and the file is recognised as SDXL base."""
    from diffusers.loaders import single_file_utils as sf

    from lorakit.architectures import build_on_meta
    from lorakit.base_files import read_facts
    from lorakit.formats.single_file import to_single_file

    models = {name: build_on_meta("sdxl", name) for name in COMPONENTS}
    tensors = to_single_file(models)
    assert sf.infer_diffusers_model_type(tensors) == "xl_base"
    unet = sf.convert_ldm_unet_checkpoint(tensors, dict(models["unet"].config))
    vae = sf.convert_ldm_vae_checkpoint(tensors, dict(models["vae"].config))
    clip_l = {k.removeprefix("text_model."): v for k, v in sf.convert_ldm_clip_checkpoint(tensors).items()}
    big_g = sf.convert_open_clip_checkpoint(models["text_encoder_2"], tensors, prefix="conditioner.embedders.1.model.")
    for name, converted in (("unet", unet), ("vae", vae), ("text_encoder", clip_l), ("text_encoder_2", big_g)):
        expected = {k: v.shape for k, v in models[name].state_dict().items() if not k.endswith("position_ids")}
        assert {k: v.shape for k, v in converted.items()} == expected, name
    weights = sum(len([k for k in m.state_dict() if not k.endswith("position_ids")]) for m in models.values())
    assert len(tensors) == weights - 32 * 4  # bigG's q, k, v (weights and biases) are one in_proj per layer
    assert read_facts(_names_only(tensors)).family == "sdxl"


def _names_only(tensors: dict) -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp())
    path = folder / "names.safetensors"
    save_file(
        {k: torch.zeros(1, 4, 1, 1) if k.endswith("input_blocks.0.0.weight") else torch.zeros(1) for k in tensors},
        str(path),
    )
    return path


def _write_file(base: Path, out: Path, *, v_prediction: bool = False, zero_terminal_snr: bool = False) -> Path:
    from diffusers import StableDiffusionXLPipeline

    from lorakit.formats.single_file import to_single_file

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base))
    models = {name: getattr(pipe, name) for name in COMPONENTS}
    save_file(to_single_file(models, v_prediction=v_prediction, zero_terminal_snr=zero_terminal_snr), str(out))
    return out


@pytest.fixture
def shipped_tiny_configs(tiny_sdxl, tmp_path, monkeypatch):
    """lorakit's shipped SDXL configs replaced by the tiny model's (same files, same code path), and an empty
    Hugging Face cache."""
    import huggingface_hub.constants

    import lorakit.architectures

    configs = tmp_path / "configs"
    (configs / "sdxl").mkdir(parents=True)
    for name in COMPONENTS:
        shutil.copy(tiny_sdxl / name / "config.json", configs / "sdxl" / f"{name}.json")
    shutil.copy(lorakit.architectures.CONFIGS / "sdxl" / "scheduler.json", configs / "sdxl" / "scheduler.json")
    monkeypatch.setattr(lorakit.architectures, "CONFIGS", configs)
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_tokenizers(cache: Path, base: Path) -> None:
    """The tiny tokenizers where the Hugging Face cache keeps stabilityai/stable-diffusion-xl-base-1.0's."""
    repo = cache / "models--stabilityai--stable-diffusion-xl-base-1.0"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(base / name, repo / "snapshots" / commit / name)


def test_sdxl_single_file_without_config_uses_the_shipped_configs_and_cached_tokenizers(
    shipped_tiny_configs, tiny_sdxl, tiny_dataset, tmp_path
):
    from diffusers import StableDiffusionXLPipeline

    from lorakit.models import load_base
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    path = _write_file(tiny_sdxl, tmp_path / "noobai-like.safetensors", v_prediction=True, zero_terminal_snr=True)
    with pytest.raises(LorakitError, match=r"model.config: noobai-like.safetensors is an SDXL single file.*tokenizer"):
        load_base(str(path))
    _cache_tokenizers(shipped_tiny_configs, tiny_sdxl)
    lines: list[str] = []
    base = load_base(str(path), log=lines.append)
    assert base.family == "sdxl" and len(base.text_encoders) == 2 and base.prediction_type == "v_prediction"
    assert base.noise_scheduler.config.rescale_betas_zero_snr
    assert any("read with lorakit's SDXL configs" in line for line in lines)
    assert any("a v_pred key: v-prediction; a ztsnr key: zero-terminal-SNR schedule" in line for line in lines)
    reference = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    for name, module in (("unet", base.unet), ("text_encoder_2", base.text_encoders[1])):
        theirs = getattr(reference, name).state_dict()
        assert all(torch.equal(theirs[k], v) for k, v in module.state_dict().items()), name

    recipe = make_recipe_dict(path, tiny_dataset, tmp_path / "runs", model={"zero_terminal_snr": True})
    recipe["train"]["max_steps"] = 2
    result = train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert result.steps == 2
    with safe_open(str(result.adapter), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


def test_an_sdxl_file_without_markers_says_it_assumes_epsilon(shipped_tiny_configs, tiny_sdxl, tmp_path):
    from lorakit.models import load_base

    _cache_tokenizers(shipped_tiny_configs, tiny_sdxl)
    path = _write_file(tiny_sdxl, tmp_path / "plain.safetensors")
    lines: list[str] = []
    assert load_base(str(path), log=lines.append).prediction_type == "epsilon"
    assert any('assuming epsilon prediction (set model.prediction_type = "v_prediction"' in line for line in lines)
    lines.clear()
    assert load_base(str(path), prediction_type="v_prediction", log=lines.append).prediction_type == "v_prediction"


def test_an_sd_config_for_an_sdxl_file_is_refused(tiny_sdxl, tiny_base, tmp_path):
    from lorakit.models import load_pipeline

    path = _write_file(tiny_sdxl, tmp_path / "xl.safetensors")
    with pytest.raises(LorakitError, match=r"model.config: .* is not an SDXL model \(no text_encoder_2\)"):
        load_pipeline(str(path), config=str(tiny_base))


IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize(
    ("tensors", "kind"),
    [
        ({"conditioner.embedders.0.model.ln_final.weight": [2], IN: [8, 4, 3, 3]}, "an SDXL refiner"),
        ({IN: [8, 9, 3, 3], "cond_stage_model.transformer.text_model.x": [2]}, r"an inpainting \(9 input channels\)"),
        ({IN: [8, 9, 3, 3], "conditioner.embedders.1.model.ln_final.weight": [2]}, "an SDXL inpainting"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": [2]}, "an SD3"),
        ({"double_blocks.0.img_attn.qkv.weight": [2]}, "a Flux"),
        ({"edm_mean": [4], IN: [8, 4, 3, 3]}, r"a Playground v2.5 \(EDM\)"),
    ],
)
def test_single_files_lorakit_cannot_train_on_are_refused_in_one_line(tmp_path, tensors, kind):
    from lorakit.models import load_pipeline

    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    with pytest.raises(LorakitError, match=f"is {kind} single-file checkpoint; lorakit trains on SD 1.x/2.x and SDXL"):
        load_pipeline(str(path), config=str(tmp_path))


def test_cli_merges_into_an_sdxl_single_file_and_generates_from_it(sdxl_run, tiny_sdxl, tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from lorakit.cli import app

    result, _ = sdxl_run
    merged = tmp_path / "merged.safetensors"
    runner = CliRunner()
    out = runner.invoke(app, ["merge", "--lora", str(result.adapter), "--base", str(tiny_sdxl), "--out", str(merged)])
    assert out.exit_code == 0, out.output
    fast = ["--size", "64x64", "--steps", "2", "--quiet", "--config", str(tiny_sdxl)]
    for name, extra in (("file", ["--base", str(merged)]), ("folder", ["--base", str(tiny_sdxl)])):
        args = ["generate", "ohwx toy", *extra, "--out", str(tmp_path / name), *fast]
        if name == "folder":
            args[args.index("--config") : args.index("--config") + 2] = ["--lora", str(result.adapter)]
        out = runner.invoke(app, args)
        assert out.exit_code == 0, out.output
    with (
        Image.open(next((tmp_path / "file").glob("*.png"))) as a,
        Image.open(next((tmp_path / "folder").glob("*.png"))) as b,
    ):
        difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert difference.max() <= 2, difference.max()  # the baked weights draw what the adapter on the base draws


def test_a_half_precision_single_file_is_read_without_a_float32_copy(tiny_sdxl, tmp_path):
    """Most shared SDXL checkpoints are float16 files: read for float16 training they stay float16 on the way in
    (no float32 pipeline first), and the VAE still trains in float32, exactly the file's values."""
    from safetensors.torch import load_file

    from lorakit.models import load_base

    half = tmp_path / "half.safetensors"
    tensors = load_file(str(_write_file(tiny_sdxl, tmp_path / "full.safetensors")))
    save_file({k: v.half() for k, v in tensors.items()}, str(half))
    peak, base = peak_and_result(lambda: load_base(str(half), config=str(tiny_sdxl), weight_dtype="float16"))
    modules = [base.unet, base.vae, *base.text_encoders]
    resident = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
    assert peak < 1.2 * resident, (peak, resident)  # a float32 pipeline cast after: 2.8x
    assert base.unet.dtype == torch.float16 and base.text_encoders[1].dtype == torch.float16
    assert base.vae.dtype == torch.float32
    by_float32 = load_base(str(half), config=str(tiny_sdxl), weight_dtype="float32")
    for name, dtype in (("vae", torch.float32), ("unet", torch.float16)):
        ours, theirs = getattr(base, name).state_dict(), getattr(by_float32, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k].to(dtype)) for k in theirs), name


def test_a_half_precision_render_reads_a_single_file_in_it(tiny_sdxl, tmp_path):
    """`generate` in float16 (bfloat16 here) reads a single file in that dtype, VAE included (it renders in it): a
    file stored so is not copied to float32 on the way, and from a float32 file each weight is the one a float32
    read cast afterwards holds."""
    from safetensors.torch import load_file

    from lorakit.models import load_pipeline

    full = _write_file(tiny_sdxl, tmp_path / "full.safetensors")
    half = tmp_path / "half.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(full)).items()}, str(half))
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    peak, pipe = peak_and_result(lambda: load_pipeline(str(half), config=str(tiny_sdxl), dtype="bfloat16"))
    held = sum(t.numel() * t.element_size() for n in names for t in getattr(pipe, n).state_dict().values())
    assert peak < 1.2 * held, (peak, held)  # read in float32, cast after: 3.0x
    for path in (half, full):
        pipe = load_pipeline(str(path), config=str(tiny_sdxl), dtype="bfloat16")
        by_float32 = load_pipeline(str(path), config=str(tiny_sdxl))
        for name in names:
            ours, theirs = getattr(pipe, name).state_dict(), getattr(by_float32, name).state_dict()
            assert all(ours[k].dtype == torch.bfloat16 for k in ours if theirs[k].is_floating_point()), name
            assert all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in theirs), (path.name, name)

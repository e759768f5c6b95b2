"""The GPU tier: the real CUDA paths, run with `pytest -m gpu` on a machine with CUDA (benchmarks/gpu_check.sh).

Skipped without CUDA; deselected by default (pyproject's addopts). Each test trains the tiny model on the GPU the
way a user's run does and checks what a CPU run cannot show: autocast dtypes, 8-bit optimizer state on the
device, where each component lives after the caches are filled, and that the exported adapter reloads in
diffusers on CUDA with the in-memory model's output.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _train(base, dataset, out, **sections):
    lines: list[str] = []
    result = train(recipe_from_dict(make_recipe_dict(base, dataset, out, **sections)), quiet=True, log=lines.append)
    return result, lines


def _unet_output(unet, dtype):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator).to("cuda", dtype)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).to("cuda", dtype)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        return unet(sample, torch.tensor([500], device="cuda"), encoder_hidden_states=hidden).sample.float()


def _learned_lora(unet, dtype: torch.dtype) -> dict:
    """The U-Net's LoRA tensors after a short run: all in `dtype`, all finite, and some up-projection moved off zero
    (it learned; under fp16, the loss scaler let it)."""
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == dtype and torch.isfinite(p).all() for p in lora.values())
    assert any(p.abs().sum() > 0 for n, p in lora.items() if ".lora_B." in n)
    return lora


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_training_with_half_frozen_weights(tiny_base, tiny_dataset, tmp_path, precision, dtype):
    weight_dtype = "float16" if precision == "fp16" else "bfloat16"
    result, _ = _train(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 3, "mixed_precision": precision, "gradient_checkpointing": True},
        model={"weight_dtype": weight_dtype},
    )
    unet = result.models["unet"]
    assert unet.device.type == "cuda" and unet.conv_in.weight.dtype == dtype
    _learned_lora(unet, torch.float32)


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_float8_frozen_weights_train_and_sample_under_autocast(tiny_base, tiny_dataset, tmp_path, precision, dtype):
    from lorakit.float8 import FLOAT8, Float8Linear

    result, lines = _train(
        tiny_base,
        tiny_dataset,
        tmp_path,
        train={"max_steps": 3, "mixed_precision": precision, "gradient_checkpointing": True},
        model={"weight_dtype": "float8"},
        sample={"prompts": ["ohwx toy"], "steps": 2},
    )
    unet = result.models["unet"]
    stored = [m for m in unet.modules() if isinstance(m, Float8Linear)]
    assert stored and all(m.weight.dtype == FLOAT8 and m.weight.device.type == "cuda" for m in stored)
    assert {m.compute_dtype for m in stored} == {dtype} and unet.conv_in.weight.dtype == dtype
    _learned_lora(unet, torch.float32)
    assert (result.run_dir / "samples" / "step-000003.png").is_file()


def test_full_bf16_trains_bfloat16_adapters_with_uint8_state_on_the_gpu(tiny_base, tiny_dataset, tmp_path):
    result, lines = _train(
        tiny_base,
        tiny_dataset,
        tmp_path,
        lora={"rank": 64, "lora_alpha": 64.0},  # 64 x 32 = 4096 elements: bitsandbytes' 8-bit threshold
        model={"weight_dtype": "bfloat16"},
        train={
            "max_steps": 3,
            "optimizer": "adamw8bit",
            "mixed_precision": "bf16",
            "full_bf16": True,
            "gradient_checkpointing": True,
            "save_every_steps": 3,
        },
    )
    lora = _learned_lora(result.models["unet"], torch.bfloat16)
    assert all(p.device.type == "cuda" for p in lora.values())
    state = load_file(str(result.run_dir / "checkpoints" / "step-000003" / "optimizer.safetensors"))
    assert any(t.dtype == torch.uint8 for t in state.values())
    said = [line for line in lines if line.startswith("train.full_bf16:")]
    assert len(said) == 1 and "rounds them stochastically" in said[0], lines


def test_stochastic_rounding_on_the_gpu_is_exact_on_average_and_repeatable():
    """The rounding draws its bits from a CUDA generator on the weights' device: a value between two bfloat16
    numbers lands on each as often as makes it exact on average, and the same seed draws the same roundings."""
    from lorakit.optim import stochastic_round_

    values = torch.full((1 << 20,), 1 + 2**-9, device="cuda")  # a quarter of the way from 1 to 1 + 2^-7
    rounded = [torch.empty_like(values, dtype=torch.bfloat16) for _ in range(2)]
    for target in rounded:
        stochastic_round_(target, values, torch.Generator(device="cuda").manual_seed(3))
    assert torch.equal(rounded[0], rounded[1])
    assert set(rounded[0].float().unique().tolist()) == {1.0, 1 + 2**-7}
    assert abs((rounded[0].float() == 1 + 2**-7).float().mean().item() - 0.25) < 0.01


def test_eight_bit_adamw_keeps_uint8_state_on_the_gpu(tiny_base, tiny_dataset, tmp_path):
    result, _ = _train(
        tiny_base,
        tiny_dataset,
        tmp_path,
        lora={"rank": 64, "lora_alpha": 64.0},  # 64 x 32 = 4096 elements: bitsandbytes' 8-bit threshold
        train={"max_steps": 2, "optimizer": "adamw8bit", "save_every_steps": 2},
    )
    state = load_file(str(result.run_dir / "checkpoints" / "step-000002" / "optimizer.safetensors"))
    assert any(t.dtype == torch.uint8 for t in state.values())


def test_caches_move_encoders_off_the_gpu_and_samples_bring_them_back(tiny_base, tiny_dataset, tmp_path):
    import lorakit.train.images as images

    placement = {}
    real_render = images.render

    def recording(pipe, *args, **kwargs):
        placement.update(text_encoder=pipe.text_encoder.device.type, vae=pipe.vae.device.type)
        return real_render(pipe, *args, **kwargs)

    images.render = recording
    try:
        result, _ = _train(
            tiny_base,
            tiny_dataset,
            tmp_path / "out",
            lora={"train_text_encoder": False},
            train={"max_steps": 2, "cache_latents": True, "mixed_precision": "fp16"},
            sample={"prompts": ["ohwx toy"], "steps": 2, "every_steps": 2},
            prior={"class_dir": str(tmp_path / "class"), "class_prompt": "a toy", "num_class_images": 1},
        )
    finally:
        images.render = real_render
    assert placement == {"text_encoder": "cuda", "vae": "cuda"}  # while rendering samples
    assert (result.run_dir / "samples" / "step-000002.png").is_file()
    assert (tmp_path / "class" / "class-00000.png").is_file()


def test_sdpa_attention_is_in_use(tiny_base):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from lorakit.models import load_base

    base = load_base(str(tiny_base))
    processors = set(map(type, base.unet.attn_processors.values()))
    assert processors == {AttnProcessor2_0}


def test_exported_adapter_reloads_in_diffusers_on_cuda(trained_run, tiny_base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None).to("cuda")
    pipe.load_lora_weights(str(trained_run.diffusers_adapter))
    in_memory = trained_run.models["unet"].to("cuda")
    # in full float32: with TF32 on, the channels-last trained U-Net and the reloaded one pick different
    # convolution kernels and differ by up to 7e-4 (measured on an H200)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        reloaded, trained = _unet_output(pipe.unet, torch.float32), _unet_output(in_memory, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    torch.testing.assert_close(reloaded, trained, atol=1e-4, rtol=1e-4)


def test_fast_paths_are_on_and_said(tiny_base, tiny_dataset, tmp_path):
    """Fused AdamW, TF32 (Ampere and later), channels-last U-Net, SDPA: on by default on CUDA, each in the log; the
    compiled U-Net trains and its compile time is reported. TF32 is on during the run only: the caller's switches
    are back when `train` returns."""
    ampere = torch.cuda.get_device_capability()[0] >= 8
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    seen: list[tuple[str, bool]] = []  # each log line with the matmul TF32 switch as it was when said
    recipe = make_recipe_dict(
        tiny_base, tiny_dataset, tmp_path / "a", train={"optimizer": "adamw", "max_steps": 2, "compile": True}
    )
    result = train(
        recipe_from_dict(recipe),
        quiet=True,
        log=lambda line: seen.append((line, torch.backends.cuda.matmul.allow_tf32)),
    )
    text = "\n".join(line for line, _ in seen)
    assert "fused CUDA kernel" in text and "channels-last" in text and "CUDA kernels allowed" in text
    if ampere:
        assert "TF32 tensor cores" in text and seen[-1][1]
    assert "train.compile: the first step, which compiled the U-Net, took" in text
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    unet = result.models["unet"]
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seen.clear()
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "b", train={"max_steps": 1, "allow_tf32": False})
    train(
        recipe_from_dict(recipe),
        quiet=True,
        log=lambda line: seen.append((line, torch.backends.cuda.matmul.allow_tf32)),
    )
    if ampere:
        assert "full float32" in "\n".join(line for line, _ in seen) and not seen[-1][1]
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_the_vae_encodes_with_the_unet_off_the_gpu(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    """The latent cache fills with the VAE alone on the GPU (the U-Net and encoders wait on the CPU), and training
    then runs with the U-Net back on the GPU under the same optimizer."""
    import lorakit.train.setup as setup

    seen = []
    real_encoder = setup.encoder

    def recording(base, device):
        encode = real_encoder(base, device)

        def wrapped(pixels):
            seen.append((next(base.unet.parameters()).device.type, next(base.vae.parameters()).device.type))
            return encode(pixels)

        return wrapped

    monkeypatch.setattr(setup, "encoder", recording)
    result, _ = _train(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 2, "cache_latents": True})
    assert seen and set(seen) == {("cpu", "cuda")}
    assert next(result.models["unet"].parameters()).device.type == "cuda"
    unet = result.models["unet"]  # lora_B starts at zero: non-zero means the optimizer stepped the moved parameters
    assert any(p.abs().sum() > 0 for n, p in unet.named_parameters() if "lora_B" in n)


def test_train_checks_the_plan_against_its_gpu_and_reports_the_measured_peak(tiny_base, tiny_dataset, tmp_path):
    _, lines = _train(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 2})
    text = "\n".join(lines)
    assert "memory: fits a " in text  # the tiny model fits any GPU
    assert "GPU memory: the training steps peaked at" in text and "lorakit plan estimated" in text


def test_generate_on_cuda_reads_the_base_in_float16_and_draws_what_a_cast_pipeline_draws(
    trained_run, tiny_base, tmp_path
):
    """`lorakit generate` on CUDA renders in float16 and reads the base in it (no float32 pipeline on the way); the
    images are those of a float32 read cast afterwards, the weights being equal bit for bit."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from lorakit.cli import app

    from .conftest import watched_render_loads

    args = ["generate", "ohwx toy", "--base", str(tiny_base), "--lora", str(trained_run.adapter), "--seed", "3"]
    args += ["--size", "64x64", "--steps", "3", "--quiet"]
    images, read = {}, []
    for name, dtype in (("read-in-it", None), ("cast-after", "float32")):
        with watched_render_loads(dtype) as loads:
            done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / name)])
        assert done.exit_code == 0, done.output
        read += loads
        with Image.open(tmp_path / name / "000-seed3.png") as image:
            images[name] = np.asarray(image, dtype=np.int16)
    assert read == [{torch.float16}, {torch.float32}]
    assert np.abs(images["read-in-it"] - images["cast-after"]).max() <= 1  # same weights; kernels may differ


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_a_slider_trains_on_cuda_with_half_weights_and_draws_both_ends(tiny_base, tmp_path, precision, dtype):
    """[slider] on CUDA: the base's denoising and its three predictions under autocast on half-precision frozen
    weights, both strengths in one checkpointed pass, the VAE off the GPU until the samples (at -2 and 2) need it."""
    from .test_slider import slider_recipe

    sample = {"prompts": ["a toy --m -2", "a toy --m 2"], "steps": 2}
    recipe = slider_recipe(
        tiny_base,
        tmp_path,
        train={"max_steps": 3, "mixed_precision": precision, "gradient_checkpointing": True},
        model={"weight_dtype": "float16" if precision == "fp16" else "bfloat16"},
        sample=sample,
    )
    lines: list[str] = []
    result = train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    unet = result.models["unet"]
    assert unet.device.type == "cuda" and unet.conv_in.weight.dtype == dtype
    _learned_lora(unet, torch.float32)
    assert (result.run_dir / "samples" / "step-000003.png").is_file()
    assert "max_memory_allocated_gib" in (result.run_dir / "metrics.jsonl").read_text()

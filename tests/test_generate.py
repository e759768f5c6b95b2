"""`lorakit generate`: reproducible, honest about scale 0, img2img/hires, parameters in every PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from lorakit.render import parse_a1111_parameters

from .invoke import fails, generate, pixels

runner = CliRunner()
FAST = ["--size", "64x64", "--steps", "3", "--quiet"]


def _fails(args, fragment):
    fails(["generate", *args], fragment)


def test_same_seed_gives_identical_images_and_seeds_are_per_image(tiny_base, tmp_path):
    generate("a red toy", "--base", str(tiny_base), "-n", "2", "--seed", "7", "--out", str(tmp_path / "a"), *FAST)
    generate("a red toy", "--base", str(tiny_base), "-n", "1", "--seed", "8", "--out", str(tmp_path / "b"), *FAST)
    generate("a red toy", "--base", str(tiny_base), "-n", "2", "--seed", "7", "--out", str(tmp_path / "c"), *FAST)
    first, second = sorted((tmp_path / "a").glob("0*.png")), sorted((tmp_path / "c").glob("0*.png"))
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, second, strict=True))
    assert np.array_equal(pixels(first[1]), pixels(tmp_path / "b" / "000-seed8.png"))  # seed + index, alone
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))


def test_compare_scales_grid_scale_zero_is_the_base(trained_run, tiny_base, tmp_path):
    generate(
        "ohwx toy",
        "red disc",
        "--base",
        str(tiny_base),
        "--lora",
        str(trained_run.adapter),
        "--compare-scales",
        "0,1",
        "--out",
        str(tmp_path / "cmp"),
        *FAST,
    )
    generate("ohwx toy", "red disc", "--base", str(tiny_base), "--out", str(tmp_path / "plain"), *FAST)
    cmp, plain = tmp_path / "cmp", tmp_path / "plain"
    assert np.array_equal(pixels(cmp / "000-seed0-x0.png"), pixels(plain / "000-seed0.png"))
    assert np.array_equal(pixels(cmp / "001-seed0-x0.png"), pixels(plain / "001-seed0.png"))
    assert not np.array_equal(pixels(cmp / "002-seed0-x1.png"), pixels(plain / "000-seed0.png"))
    with Image.open(cmp / "grid.png") as grid:
        assert grid.size == (160 + 2 * 64, 24 + 2 * 64)
        labels = json.loads(grid.text["lorakit_grid"])
    assert labels == {"columns": ["scale 0", "scale 1"], "rows": ["ohwx toy (seed 0)", "red disc (seed 0)"]}


def test_png_parameters_parse_back(trained_run, tiny_base, tmp_path):
    generate(
        "ohwx toy",
        "--base",
        str(tiny_base),
        "--lora",
        f"{trained_run.adapter}:0.8",
        "--seed",
        "3",
        "--negative",
        "blurry",
        "--sampler",
        "dpmpp_2m",
        "--guidance",
        "5.5",
        "--out",
        str(tmp_path),
        *FAST,
    )
    with Image.open(tmp_path / "000-seed3.png") as image:
        parameters = parse_a1111_parameters(image.text["parameters"])
    assert parameters["prompt"] == "ohwx toy <lora:run:0.8>" and parameters["negative_prompt"] == "blurry"
    assert parameters["Steps"] == "3" and parameters["Sampler"] == "DPM++ 2M" and parameters["CFG scale"] == "5.5"
    assert parameters["Seed"] == "3" and parameters["Size"] == "64x64"
    # what A1111 writes and looks up: the start of the file's sshs_model_hash, not a hash of the whole file
    with safe_open(str(trained_run.adapter), "pt") as f:
        assert parameters["Lora hashes"] == f"run: {f.metadata()['sshs_model_hash'][:12]}"


def test_run_folder_gives_base_and_trigger(trained_run, tmp_path):
    generate("a red disc", "--lora", str(trained_run.run_dir), "--out", str(tmp_path), *FAST)
    with Image.open(tmp_path / "000-seed0.png") as image:
        assert parse_a1111_parameters(image.text["parameters"])["prompt"] == "ohwx, a red disc <lora:run:1>"


def test_img2img_small_strength_stays_near_the_vae_round_trip(tiny_base, tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from tests.messy import textured

    init = textured(64, 64, 3)
    init.save(tmp_path / "init.png")
    _fails(
        [
            "a toy",
            "--base",
            str(tiny_base),
            "--init",
            str(tmp_path / "init.png"),
            "--strength",
            "0.05",
            "--out",
            str(tmp_path / "x"),
            *FAST,
        ],
        "runs no denoising step",
    )
    one_step = ["--strength", "0.05", "--steps", "20", "--size", "64x64", "--quiet"]  # a single step at t ~ 50
    generate(
        "a toy",
        "--base",
        str(tiny_base),
        "--init",
        str(tmp_path / "init.png"),
        "--out",
        str(tmp_path / "y"),
        *one_step,
    )
    vae = AutoencoderKL.from_pretrained(tiny_base, subfolder="vae")
    image = torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        round_trip = vae.decode(vae.encode(image).latent_dist.mean).sample
    round_trip = ((round_trip[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().numpy()
    out = pixels(tmp_path / "y" / "000-seed0.png")
    assert not (tmp_path / "x").exists()  # the refused run wrote nothing
    distance = np.abs(out - round_trip).mean()
    noise_distance = np.abs(out - np.asarray(textured(64, 64, 99), dtype=np.int16)).mean()
    assert distance < 0.1 * noise_distance, (distance, noise_distance)  # measured: 2.6 vs 64
    # the same photo as an iPhone's HEIC (pillow-heif): read as it is, then drawn the same way
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    init.save(tmp_path / "init.heic", quality=100)
    args = ["a toy", "--base", str(tiny_base), "--init", str(tmp_path / "init.heic"), "--out", str(tmp_path / "h")]
    generate(*args, *one_step)
    heic_distance = np.abs(pixels(tmp_path / "h" / "000-seed0.png") - out).mean()
    assert heic_distance < 0.25 * noise_distance, (heic_distance, noise_distance)  # HEVC's losses: measured 7.9


def test_hires_doubles_the_size(tiny_base, tmp_path):
    generate(
        "a toy", "--base", str(tiny_base), "--upscale", "2", "--hires-strength", "0.5", "--out", str(tmp_path), *FAST
    )
    with Image.open(tmp_path / "000-seed0.png") as image:
        assert image.size == (128, 128)
        assert parse_a1111_parameters(image.text["parameters"])["Hires upscale"] == "2.0"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--size", "60x64"], "must be positive multiples of 8"),
        (["--strength", "1.5", "--init", "x.png"], "--strength 1.5: must be in (0, 1]"),
        (["--sampler", "plms"], "--sampler 'plms': use one of euler, euler_a, dpmpp_2m, ddim"),
        (["--lora", "missing.safetensors"], "adapter file not found"),
    ],
)
def test_bad_generate_input(tiny_base, tmp_path, args, fragment):
    _fails(["a toy", "--base", str(tiny_base), "--out", str(tmp_path / "o"), "--steps", "2", *args], fragment)


def test_missing_base_and_foreign_adapter(trained_run, tiny_base_v, tmp_path):
    _fails(
        ["a toy", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        f"--base: {tmp_path / 'nope'} does not exist",
    )
    _fails(["a toy", "--base", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")], "error: --base: ")
    _fails(["a toy", "--out", str(tmp_path / "o")], "--base: give the base model")
    _fails(
        ["a toy", "--base", str(tiny_base_v), "--lora", str(trained_run.adapter), "--out", str(tmp_path / "o"), *FAST],
        "does not fit the base weight",
    )


def test_a_half_precision_render_reads_the_base_in_it_and_draws_what_a_cast_pipeline_draws(
    trained_run, tiny_base, tmp_path
):
    """A float16 render on CUDA (bfloat16 on this CPU) reads the base in that dtype: no float32 pipeline on the way
    (14 GB of system memory for SDXL). Each weight cast once as it is read is the weight a float32 pipeline cast
    afterwards holds, so a LoRA render draws the same pixels either way."""
    import torch

    from lorakit.models import load_pipeline

    from .conftest import peak_and_result, watched_render_loads
    from .tiny import save_in_dtype

    half = save_in_dtype(tiny_base, tmp_path / "half", torch.bfloat16)
    peak, pipe = peak_and_result(lambda: load_pipeline(str(half), dtype="bfloat16"))
    models = [pipe.unet, pipe.vae, pipe.text_encoder]
    assert all(m.dtype == torch.bfloat16 for m in models)
    held = sum(t.numel() * t.element_size() for m in models for t in [*m.parameters(), *m.buffers()])
    assert peak < 1.2 * held, (peak, held)  # read in float32, cast after: 2.7x

    args = ["ohwx toy", "--lora", str(trained_run.adapter), "--dtype", "bfloat16", "--seed", "3", *FAST]
    for base in (half, tiny_base):  # stored in the render's dtype, and in float32
        with watched_render_loads() as read:  # the dtypes `generate` holds the pipeline in as it is read
            generate(*args, "--base", str(base), "--out", str(tmp_path / "read-in-it"))
        assert read == [{torch.bfloat16}]
        with watched_render_loads("float32"):
            generate(*args, "--base", str(base), "--out", str(tmp_path / "cast-after"))
        ours, theirs = (pixels(tmp_path / out / "000-seed3.png") for out in ("read-in-it", "cast-after"))
        assert np.array_equal(ours, theirs), (base, np.abs(ours - theirs).max())


def test_compare_saves_draws_each_saved_adapter_as_that_file_alone_does(tiny_base, tiny_dataset, tmp_path):
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    from .conftest import make_recipe_dict

    recipe = make_recipe_dict(
        tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 4, "save_every_steps": 2, "unet_lr": 3e-2}
    )
    run = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None).run_dir
    generate("ohwx toy", "--lora", str(run), "--compare-saves", "--out", str(tmp_path / "saves"), *FAST)
    with Image.open(tmp_path / "saves" / "grid.png") as grid:
        labels = json.loads(grid.text["lorakit_grid"])
    assert labels["columns"] == ["step 2", "final (step 4)"]
    drawn = sorted(p.name for p in (tmp_path / "saves").glob("0*.png"))
    assert drawn == ["000-seed0-step2.png", "001-seed0-final.png"]
    # Each column is what that file draws on its own, pixel for pixel.
    for name, alone in (("000-seed0-step2.png", run / "run-step00000002.safetensors"), ("001-seed0-final.png", run)):
        base = [] if alone == run else ["--base", str(tiny_base)]
        generate("ohwx toy", "--lora", str(alone), *base, "--out", str(tmp_path / name), *FAST)
        assert np.array_equal(pixels(tmp_path / "saves" / name), pixels(tmp_path / name / "000-seed0.png")), name
    assert not np.array_equal(pixels(tmp_path / "saves" / drawn[0]), pixels(tmp_path / "saves" / drawn[1]))
    with Image.open(tmp_path / "saves" / drawn[0]) as image:
        assert "<lora:run-step00000002:1>" in image.text["parameters"] and "<lora:run:" not in image.text["parameters"]
    _fails(
        ["x", "--lora", str(run), "--compare-saves", "--compare-scales", "0,1", "--out", str(tmp_path / "e")],
        "choose one",
    )
    _fails(
        [
            "x",
            "--lora",
            str(run / "run.safetensors"),
            "--base",
            str(tiny_base),
            "--compare-saves",
            "--out",
            str(tmp_path / "f"),
        ],
        "--compare-saves: needs one run folder as --lora (got 0)",
    )


def test_webui_lora_tags_load_the_named_adapter_for_their_prompt_alone(trained_run, tiny_base, tmp_path):
    """`<lora:NAME:W>` in a prompt draws what `--lora FILE:W` draws for that prompt, and the other prompts draw as
    the base does; the PNG keeps the prompt as written, as the webuis do."""
    import shutil

    folder = tmp_path / "Lora" / "characters"
    folder.mkdir(parents=True)
    shutil.copy(trained_run.adapter, folder / "mychar.safetensors")
    (folder / "notes.txt").write_text("not an adapter")
    base = ["--base", str(tiny_base), *FAST]
    tagged = tmp_path / "tagged"
    generate(
        "ohwx toy <lora:mychar:0.8>", "red disc", "--lora-dir", str(tmp_path / "Lora"), "--out", str(tagged), *base
    )
    generate("ohwx toy", "--lora", f"{trained_run.adapter}:0.8", "--out", str(tmp_path / "flag"), *base)
    generate("ohwx toy", "red disc", "--out", str(tmp_path / "plain"), *base)
    plain = tmp_path / "plain"
    assert np.array_equal(pixels(tagged / "000-seed0.png"), pixels(tmp_path / "flag" / "000-seed0.png"))
    assert np.array_equal(pixels(tagged / "001-seed0.png"), pixels(plain / "001-seed0.png"))
    assert not np.array_equal(pixels(tagged / "000-seed0.png"), pixels(plain / "000-seed0.png"))
    with Image.open(tagged / "000-seed0.png") as first, Image.open(tagged / "001-seed0.png") as second:
        written, other = (parse_a1111_parameters(i.text["parameters"]) for i in (first, second))
    with safe_open(str(trained_run.adapter), "pt") as f:
        assert written["Lora hashes"] == f"mychar: {f.metadata()['sshs_model_hash'][:12]}"
    assert written["prompt"] == "ohwx toy <lora:mychar:0.8>" and "Lora hashes" not in other
    # a compare-scales column multiplies the tag's strength, and says so
    generate(
        "ohwx toy <lora:mychar:0.8>",
        "--lora-dir",
        str(folder),
        "--compare-scales",
        "0,0.5",
        "--out",
        str(tmp_path / "c"),
        *base,
    )
    with Image.open(tmp_path / "c" / "001-seed0-x0.5.png") as image:
        assert parse_a1111_parameters(image.text["parameters"])["prompt"] == "ohwx toy <lora:mychar:0.4>"
    assert np.array_equal(pixels(tmp_path / "c" / "000-seed0-x0.png"), pixels(plain / "000-seed0.png"))


@pytest.mark.parametrize(
    ("prompt", "extra", "fragment"),
    [
        ("a toy <lora:mychar:0.8>", [], "a prompt holds the webui tag <lora:mychar:0.8>; give the folder of its file"),
        ("a toy <lora:mychr:0.8>", ["--lora-dir", "{dir}"], "mychr.safetensors under --lora-dir"),
        ("a toy <lora:mychr:0.8>", ["--lora-dir", "{dir}"], "; close names: mychar"),
        ("a toy <lora:mychar:0.8:0.5:8>", ["--lora-dir", "{dir}"], "a dynamic rank (dyn=) is not applied"),
        ("a toy <lora:mychar:0.8:step=4>", ["--lora-dir", "{dir}"], "step=4: write step=A-B"),
        ("a toy <hypernet:x:1>", ["--lora-dir", "{dir}"], "<hypernet:x:1>: hypernetworks are not adapters"),
        ("a toy <lora:mychar:strong>", ["--lora-dir", "{dir}"], "'strong' is not a number; write <lora:mychar:0.8>"),
        ("<lora:mychar> a <lora:mychar:1>", ["--lora-dir", "{dir}"], "names the adapter 'mychar' twice"),
        ("a toy <lora:mychar>", ["--lora-dir", "{dir}/nowhere"], "/nowhere: not a folder"),
        (
            "a toy",
            ["--negative", "<lyco:bad>"],
            "--negative holds the webui tag <lyco:bad>, which lorakit would encode",
        ),
    ],
)
def test_webui_lora_tags_that_cannot_be_applied_are_named(tiny_base, tmp_path, prompt, extra, fragment):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "mychar.safetensors").write_bytes(b"")
    extra = [e.replace("{dir}", str(tmp_path / "loras")) for e in extra]
    _fails([prompt, "--base", str(tiny_base), *extra, "--out", str(tmp_path / "g"), *FAST], fragment)
    assert not (tmp_path / "g").exists()

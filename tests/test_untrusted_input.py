"""Datasets, recipes and command-line numbers are untrusted input: each bad value ends in one message naming the
file, line or key and what is allowed (exit 2 from the CLI), never a hang, a traceback or a NaN adapter."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.data import load_folder
from lorakit.errors import AdapterError, DatasetError, RecipeError
from lorakit.formats.read import read_adapter_file
from lorakit.prepare import PrepareOptions, prepare
from lorakit.recipe import load_recipe, recipe_from_dict
from lorakit.recipe.sections import SECTIONS
from lorakit.recipe.validate import _RANGES
from lorakit.train import train

from .conftest import make_recipe_dict
from .messy import textured

runner = CliRunner()
BUCKETS = [(64, 64), (80, 48), (48, 80)]


def _numeric(tp) -> bool:
    args = typing.get_args(tp) or (tp,)
    return any(a in (int, float) or typing.get_args(a) and _numeric(a) for a in args)


def test_every_number_of_a_recipe_has_a_finite_range():
    missing = []
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if _numeric(hints[field.name]) and hints[field.name] is not bool:
                key = f"{name}.{field.name}"
                low, high = _RANGES.get(key, (None, None))
                if low is None or high is None:
                    missing.append(key)
    assert not missing


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "unet_lr", float("nan"), "train.unet_lr: nan is not a finite number"),
        ("lora", "lora_alpha", float("inf"), "lora.lora_alpha: inf is not a finite number"),
        ("train", "seed", 2**64, "train.seed: 18446744073709551616 is outside 0..4.29497e+09"),
        ("train", "batch_size", 2**63, "train.batch_size: 9223372036854775808 is outside 1..4096"),
        ("data", "resolution", 10**7, "data.resolution: 10000000 is outside 8..4096"),
        ("train", "max_grad_norm", 10**400, "train.max_grad_norm: a number of about 401 digits is not a finite"),
    ],
)
def test_numbers_out_of_range_are_refused(tiny_base, tiny_dataset, tmp_path, section, key, value, message):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, **{section: {key: value}})
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(recipe)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[train]\nseed = " + "9" * 5000 + "\n", "not a usable recipe: Exceeds the limit (4300 digits)"),
        ("[train]\nseed = " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
        ("# padding\n" * 200_000, "bytes is not a recipe"),
        ("[train]\nunet_lr = nan\n", "train.unet_lr: nan is not a finite number"),
    ],
)
def test_hostile_recipe_files_give_one_message_and_exit_2(tmp_path, text, message):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=None) as caught:
        load_recipe(path)
    assert message in str(caught.value)
    result = runner.invoke(app, ["train", str(path), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--compare-scales", "0,nan"], "between -100 and 100"),
        (["--compare-scales", "0,1e9"], "between -100 and 100"),
        (["--lora", "adapter.safetensors:nan"], "the strength after ':' must be a number"),
        (["--guidance", "nan"], "--guidance"),
        (["--strength", "nan"], "give a finite number"),
        (["--size", "100000x512"], "up to 4096 a side"),
        (["--seed", str(2**64)], "--seed"),
        (["--steps", "100000"], "--steps"),
    ],
)
def test_generate_refuses_numbers_it_cannot_use(tmp_path, arguments, message):
    result = runner.invoke(app, ["generate", "a photo", "--out", str(tmp_path / "out"), "--base", "x", *arguments])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())  # rich wraps the message box
    assert not (tmp_path / "out").exists()


def _dataset_copy(tiny_dataset, tmp_path):
    folder = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, folder, ignore=shutil.ignore_patterns(".cache"))
    return folder


def _rewrite_row(folder, index, **changes):
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[index].update(changes)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("file_name", ["../outside.png", "/etc/hostname", "images/../../outside.png"])
def test_dataset_file_names_stay_inside_the_dataset(tiny_dataset, tmp_path, file_name):
    folder = _dataset_copy(tiny_dataset, tmp_path)
    Image.new("RGB", (64, 64)).save(tmp_path / "outside.png")
    _rewrite_row(folder, 1, file_name=file_name)
    with pytest.raises(DatasetError, match=r"metadata.jsonl:2: file_name .* points outside the dataset folder"):
        load_folder(folder, trigger="", repeats=1, buckets=BUCKETS)


def test_a_link_out_of_the_dataset_is_refused(tiny_dataset, tmp_path):
    folder = _dataset_copy(tiny_dataset, tmp_path)
    Image.new("RGB", (64, 64)).save(tmp_path / "outside.png")
    (folder / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    _rewrite_row(folder, 0, file_name="images/link.png")
    with pytest.raises(DatasetError, match="points outside the dataset folder"):
        load_folder(folder, trigger="", repeats=1, buckets=BUCKETS)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_listed_in_the_dataset_is_refused_without_opening_it(tiny_dataset, tmp_path):
    folder = _dataset_copy(tiny_dataset, tmp_path)
    os.mkfifo(folder / "images" / "pipe.png")
    _rewrite_row(folder, 0, file_name="images/pipe.png")
    with pytest.raises(DatasetError, match="pipe.png: not a regular file"):
        load_folder(folder, trigger="", repeats=1, buckets=BUCKETS)


def test_a_huge_caption_is_refused_with_its_line(tiny_dataset, tmp_path):
    folder = _dataset_copy(tiny_dataset, tmp_path)
    _rewrite_row(folder, 2, text="tag, " * 20_000)
    with pytest.raises(DatasetError, match=r"metadata.jsonl:3: the caption is 100,000 characters; at most 4,096"):
        load_folder(folder, trigger="", repeats=1, buckets=BUCKETS)


def test_the_latent_cache_follows_the_image_bytes_not_the_claimed_hash(tiny_base, tiny_dataset, tmp_path):
    folder = _dataset_copy(tiny_dataset, tmp_path)
    _rewrite_row(folder, 0, sha256="../../../escape")  # a crafted claim: neither a file name nor a cache key
    recipe = make_recipe_dict(tiny_base, folder, tmp_path / "out", train={"max_steps": 1})
    lines: list[str] = []
    train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert any("(8 newly encoded)" in line for line in lines)
    first = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    with Image.open(folder / first) as image:
        retouched = image.convert("RGB").point(lambda v: 255 - v)  # same size, other pixels, same claimed hash
    retouched.save(folder / first)
    lines.clear()
    train(recipe_from_dict(recipe), overwrite=True, quiet=True, log=lines.append)
    assert any("(1 newly encoded)" in line for line in lines)
    assert not list(tmp_path.glob("**/escape*"))


def test_prepare_counts_a_fifo_and_finishes(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        textured(96, 80, index).save(photos / f"photo{index}.png")
    if hasattr(os, "mkfifo"):
        os.mkfifo(photos / "pipe.png")
    options = PrepareOptions(resolution=64, bucket_step=16, workers=2)
    result = prepare(photos, tmp_path / "dataset", options, quiet=True, log=lambda _: None)
    assert result.kept == 3
    if hasattr(os, "mkfifo"):
        assert result.dropped["read_error"] == [{"file": "pipe.png", "detail": "not a regular file"}]


def test_prepare_summary_cannot_send_terminal_escapes(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    textured(96, 80, 0).save(photos / "photo.png")
    (photos / "photo.txt").write_text("\x1b]0;pwned\x07red ball, \x1b[2J")
    lines: list[str] = []
    prepare(photos, tmp_path / "dataset", PrepareOptions(resolution=64, bucket_step=16, workers=1), log=lines.append)
    assert not any("\x1b" in line or "\x07" in line for line in lines)
    assert any("\\x1b" in line for line in lines)


def test_prepare_refuses_a_huge_caption_file(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    textured(96, 80, 0).save(photos / "photo.png")
    (photos / "photo.txt").write_text("word " * 50_000)
    with pytest.raises(DatasetError, match="photo.txt: 250,000 bytes; a caption has at most 4,096 characters"):
        prepare(photos, tmp_path / "dataset", PrepareOptions(resolution=64, bucket_step=16, workers=1))
    assert not (tmp_path / "dataset").exists()


def test_prepare_state_cannot_name_files_elsewhere(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    textured(96, 80, 0).save(photos / "photo.png")
    out = tmp_path / "dataset"
    options = PrepareOptions(resolution=64, bucket_step=16, workers=1)
    prepare(photos, out, options, quiet=True, log=lambda _: None)
    victim = tmp_path / "victim.png"
    Image.new("RGB", (8, 8)).save(victim)
    state = json.loads((out / ".cache" / "prepare.json").read_text())
    for entry in state["entries"].values():
        entry["file_name"] = "../victim.png"
    (out / ".cache" / "prepare.json").write_text(json.dumps(state))
    prepare(photos, out, options, quiet=True, log=lambda _: None)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert victim.is_file() and all(r["file_name"].startswith("images/") for r in rows)


_STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        (
            {
                f"{_STEM}.lora_down.weight": torch.ones(4, 32),
                f"{_STEM}.lora_up.weight": torch.ones(32, 4),
                f"{_STEM}.alpha": torch.ones(3),
            },
            {},
            "alpha holds 3 values; an alpha is one number",
        ),
        (
            {f"{_STEM}.lora_down.weight": torch.ones(0, 32), f"{_STEM}.lora_up.weight": torch.ones(32, 0)},
            {},
            "rank 0 (no weights)",
        ),
        (
            {f"{_STEM}.lora_down.weight": torch.ones(32), f"{_STEM}.lora_up.weight": torch.ones(32, 4)},
            {},
            "the down weight has shape (32,); LoRA weights are 2-D (linear) or 4-D",
        ),
        (
            {f"{_STEM}.lora_down.weight": torch.tensor(1.0), f"{_STEM}.lora_up.weight": torch.ones(32, 4)},
            {},
            "the down weight has shape ()",
        ),
        (
            {
                "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 32),
                "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(32, 4),
            },
            {"lora_adapter_metadata": '{"unet.r": 4, '},
            "the lora_adapter_metadata header is not a JSON object",
        ),
        (
            {
                "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 32),
                "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(32, 4),
            },
            {"lora_adapter_metadata": '{"unet.lora_alpha": NaN}'},
            "expected a positive rank and a finite alpha",
        ),
    ],
)
def test_damaged_adapter_files_give_one_line(tmp_path, tensors, metadata, message):
    path = tmp_path / "adapter.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(AdapterError) as caught:
        read_adapter_file(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_prepare_workers_die_with_a_killed_prepare(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(40):
        textured(600, 500, index).save(photos / f"photo{index}.png")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit",
            "prepare",
            str(photos),
            "--out",
            str(tmp_path / "dataset"),
            "--workers",
            "2",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: set[int] = set()
    deadline = time.monotonic() + 60
    while len(workers) < 2 and time.monotonic() < deadline and process.poll() is None:
        workers = _children(process.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "prepare started no workers"
    process.kill()
    process.wait()
    time.sleep(1.0)
    assert not any(_alive(pid) for pid in workers)


def _children(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in text:
            found.add(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie is dead, waiting for init to reap it

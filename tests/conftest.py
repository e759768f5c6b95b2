"""Shared tiny offline models and datasets; everything here is built in code, nothing is downloaded."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny SD 1.x-shaped diffusers folder (epsilon prediction)."""
    from .tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_base_v(tmp_path_factory):
    """A tiny SD 2.x-style diffusers folder (v-prediction, linear projections)."""
    from .tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("base_v") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL-shaped diffusers folder (two text encoders, size-conditioned U-Net, epsilon prediction)."""
    from .tiny import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def quick_toy_base(tmp_path_factory):
    """The toy base architecture with a token amount of training (the real build takes minutes)."""
    from lorakit.toy.build import build_toy_base

    return build_toy_base(
        tmp_path_factory.mktemp("toy") / "base", vae_steps=2, unet_steps=3, quiet=True, log=lambda _: None
    )


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    from .tiny import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "dataset")


def make_recipe_dict(base, dataset, output, **sections) -> dict:
    """A small, fast recipe for the tiny model; `sections` update individual keys per section."""
    recipe = {
        "model": {"base": str(base)},
        "data": {"folder": str(dataset), "resolution": 64, "trigger": "ohwx"},
        "lora": {"rank": 4, "lora_alpha": 8.0},
        "train": {
            "max_steps": 4,
            "batch_size": 2,
            "unet_lr": 1e-3,
            "text_encoder_lr": 1e-3,
            "optimizer": "adamw",
            "seed": 0,
        },
        "output": {"folder": str(output), "name": "run", "save_dtype": "float32"},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def allocation_peak(step) -> int:
    """The most tensor bytes alive at once while `step` runs beyond those alive before it, from the profiler's
    memory records (every allocation and free the CPU allocator saw, in order) - not the process's RSS."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, change in records:
        live += change
        peak = max(peak, live)
    return peak


def peak_and_result(call):
    """(`allocation_peak` of `call`, what `call` returned): what a load holds, and what it took to get there."""
    returned = []
    peak = allocation_peak(lambda: returned.append(call()))
    return peak, returned[0]


@contextlib.contextmanager
def watched_render_loads(dtype: str | None = None):
    """`lorakit generate`'s base loading, watched: yields a list that gets the set of dtypes each pipeline holds as
    it is read. With `dtype` the base is read in it instead of the render's dtype ("float32": the path from before
    renders read in their own dtype, a float32 pipeline cast when it moves to the device)."""
    import lorakit.generate
    from lorakit.models import load_pipeline

    read: list[set] = []

    def load(*args, **kwargs):
        pipe = load_pipeline(*args, **({**kwargs, "dtype": dtype} if dtype else kwargs))
        read.append({m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)})
        return pipe

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lorakit.generate, "load_pipeline", load)
        yield read


@dataclasses.dataclass
class ConditioningCall:
    """One batch's U-Net conditioning as training built it: the epoch it was drawn in, its captions and flips."""

    epoch: int
    captions: list[str]
    flips: list[bool]
    conditioning: dict


@pytest.fixture
def conditioning_calls(monkeypatch) -> list[ConditioningCall]:
    """Every call of the training loop's `unet_conditioning` (training steps and val_loss), in order."""
    import lorakit.train.loop as loop

    calls: list[ConditioningCall] = []
    real = loop.unet_conditioning

    def recording(run, captions, items, flips):
        conditioning = real(run, captions, items, flips)
        calls.append(ConditioningCall(run.stream.epoch, list(captions), list(flips), conditioning))
        return conditioning

    monkeypatch.setattr(loop, "unet_conditioning", recording)
    return calls


def stopped_copy(run_dir, into, step: int):
    """A copy of a finished run folder under `into`, as if the run had stopped at its checkpoint `step`: the later
    checkpoints are removed. Returns that checkpoint's folder, to resume from."""
    import shutil
    from pathlib import Path

    from lorakit.checkpoint import checkpoint_name, list_checkpoints

    copy = Path(into) / Path(run_dir).name
    shutil.copytree(run_dir, copy)
    for later in list_checkpoints(copy):
        if int(later.name[5:]) > step:
            shutil.rmtree(later)
    return copy / "checkpoints" / checkpoint_name(step)


def assert_same_tensors(a, b) -> None:
    """Two safetensors files (adapters, checkpoints) hold the same names and bit-identical tensors."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def write_recipe(path, recipe: dict):
    """Write a recipe dict as a TOML file."""
    from lorakit.recipe import toml_value

    lines = []
    for section, values in recipe.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(tiny_base, tiny_dataset, tmp_path_factory):
    """One short training run (alpha != rank, fp32 export) shared by the export tests."""
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    out = tmp_path_factory.mktemp("runs")
    recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, out, train={"max_steps": 6}))
    return train(recipe, quiet=True, log=lambda _: None)


@pytest.fixture(scope="session")
def sdxl_run(tiny_sdxl, tiny_dataset, tmp_path_factory):
    """(result, log lines) of a tiny SDXL run with both text encoders trained too (lora_te1 / lora_te2; the
    second at its own rate), alpha != rank, on a dataset whose metadata lacks the original sizes and crops (a
    hand-made one)."""
    import json
    import shutil

    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    folder = tmp_path_factory.mktemp("sdxl-data") / "dataset"
    shutil.copytree(tiny_dataset, folder, ignore=shutil.ignore_patterns(".cache"))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    cut = ("original_width", "original_height", "crop_left", "crop_top")
    rows = [{k: v for k, v in row.items() if k not in cut} for row in rows]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sections = {"lora": {"train_text_encoder": True}, "train": {"max_steps": 3, "text_encoder_2_lr": 2e-5}}
    recipe = make_recipe_dict(tiny_sdxl, folder, tmp_path_factory.mktemp("sdxl-run"), **sections)
    lines: list[str] = []
    return train(recipe_from_dict(recipe), quiet=True, log=lines.append), lines


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory):
    """A tiny random BLIP image-to-text model with its processor, saved like a hub model."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder = tmp_path_factory.mktemp("captioner")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "toy", "on", "table", "blue"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    text = {
        "vocab_size": len(words),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": 2,
        "sep_token_id": 3,
        "pad_token_id": 0,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture(scope="session")
def tiny_segmenter(tmp_path_factory):
    """A tiny random CLIPSeg (text-prompted segmentation) model with its processor, saved like a hub model."""
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor
    from transformers.models.vit import ViTImageProcessorPil

    from lorakit.toy.text import make_clip_tokenizer

    tokenizer, _ = make_clip_tokenizer()
    ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
    text = {
        **layers,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 77,
        **{f"{k}_token_id": v for k, v in ids.items()},
    }
    vision = {**layers, "image_size": 32, "patch_size": 8}
    config = CLIPSegConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=32,
        extract_layers=(0, 1, 2),
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("segmenter") / "model"
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    image_processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def pytest_terminal_summary(terminalreporter):
    """The reliability figures of this run (tests/test_reliability.py and the fuzz tests), as one table."""
    from .reliability import FIGURES

    if FIGURES:
        terminalreporter.section("reliability (reduced counts; benchmarks/reliability.py has the full ones)")
        for name, count in FIGURES.items():
            terminalreporter.write_line(f"  {name:<40} {count:>7,}")


@pytest.fixture(scope="session", autouse=True)
def no_unpickling():
    """For the whole suite: `pickle.load` and a `torch.load` without `weights_only=True` raise, so no code path
    lorakit runs can unpickle a file a user handed it (the weights-only loader stays allowed)."""
    import pickle

    import torch

    real_torch_load = torch.load

    def refused_pickle_load(*args, **kwargs):
        raise AssertionError("pickle.load called: lorakit must never unpickle a user's file")

    def weights_only_torch_load(*args, **kwargs):
        if kwargs.get("weights_only") is not True:
            raise AssertionError("torch.load without weights_only=True")
        return real_torch_load(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pickle, "load", refused_pickle_load)
        patch.setattr(torch, "load", weights_only_torch_load)
        yield

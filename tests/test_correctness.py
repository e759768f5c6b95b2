"""Configurations that crashed mid-run or were silently corrected, each fixed with this test failing first."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.recipe import load_recipe, recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict, write_recipe


def _train(base, dataset, out, **sections):
    lines: list[str] = []
    recipe = recipe_from_dict(make_recipe_dict(base, dataset, out, **sections))
    return train(recipe, quiet=True, log=lines.append), lines


def test_validation_with_a_frozen_text_encoder(tiny_base, tiny_dataset, tmp_path):
    """The held-out captions must be in the text-embedding cache (was: KeyError at the first validation)."""
    result, lines = _train(
        tiny_base,
        tiny_dataset,
        tmp_path,
        lora={"train_text_encoder": False},
        train={"max_steps": 2},
        validation={"folder": str(tiny_dataset), "every_steps": 2, "timesteps": [300]},
    )
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["val_loss"] > 0
    assert any("Text encoder outputs cached" in line for line in lines)


def test_samples_with_a_frozen_text_encoder_move_it_to_the_training_device(
    tiny_base, tiny_dataset, tmp_path, monkeypatch
):
    """After caching, the frozen text encoder lives on the CPU; sampling must bring it to the run's device and
    put it back (on CUDA the pipeline fed CUDA token ids to a CPU encoder). A CPU run cannot see a wrong device,
    so the test records the encoder's moves between the training step and the render."""
    import lorakit.train.images as images
    import lorakit.train.loop as loop

    events: list[str] = []
    real_render, real_step, real_to = images.render, loop.optimizer_step, torch.nn.Module.to

    def to(self, *args, **kwargs):
        if type(self).__name__ == "CLIPTextModel":
            events.append(f"to {torch.device(args[0] if args else kwargs['device']).type}")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(images, "render", lambda *a, **k: events.append("render") or real_render(*a, **k))
    monkeypatch.setattr(loop, "optimizer_step", lambda run: events.append("step") or real_step(run))
    _train(
        tiny_base,
        tiny_dataset,
        tmp_path,
        lora={"train_text_encoder": False},
        train={"max_steps": 1},
        sample={"prompts": ["ohwx toy"], "steps": 1},
    )
    after_step = events[events.index("step") + 1 :]
    assert after_step[: after_step.index("render")][-1:] == ["to cpu"], events  # the run's device here
    assert "to cpu" in after_step[after_step.index("render") + 1 :], events  # and back beside the cache


def test_prior_class_images_render_with_half_precision_weights(tiny_base, tiny_dataset, tmp_path):
    """bf16 frozen weights: the class-image render runs under autocast (was: half latents into the VAE)."""
    result, _ = _train(
        tiny_base,
        tiny_dataset,
        tmp_path / "out",
        model={"weight_dtype": "bfloat16"},
        train={"max_steps": 1, "mixed_precision": "bf16"},
        prior={"class_dir": str(tmp_path / "class"), "class_prompt": "a toy", "num_class_images": 2},
        sample={"steps": 1},
    )
    assert sorted(p.name for p in (tmp_path / "class").glob("*.png")) == ["class-00000.png", "class-00001.png"]
    assert result.steps == 1


@pytest.mark.parametrize(
    ("sections", "fragments"),
    [
        ({"train": {"max_timestep": 5000}}, ["train.max_timestep: 5000", "1000"]),
        ({"train": {"min_timestep": 999, "max_timestep": 1000}}, None),
        ({"validation": {"timesteps": [100, 1000]}}, ["validation.timesteps: 1000", "[0, 1000)"]),
    ],
)
def test_timesteps_outside_the_schedule_are_refused(tiny_base, tiny_dataset, tmp_path, sections, fragments):
    if "validation" in sections:
        sections["validation"]["folder"] = str(tiny_dataset)
    if fragments is None:  # the last timestep of the schedule is valid
        _train(tiny_base, tiny_dataset, tmp_path, **{**sections, "train": {**sections["train"], "max_steps": 1}})
        return
    with pytest.raises(LorakitError) as err:
        _train(tiny_base, tiny_dataset, tmp_path, **sections)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_base_that_predicts_the_sample_is_refused(tiny_base, tiny_dataset, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    config_path = base / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "sample"
    config_path.write_text(json.dumps(config))
    with pytest.raises(LorakitError, match="prediction_type 'sample'"):
        _train(base, tiny_dataset, tmp_path / "out")


def test_resume_into_another_runs_checkpoint_is_refused(tiny_base, tiny_dataset, tmp_path):
    first, _ = _train(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 2, "save_every_steps": 2})
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 3})
    recipe["output"]["name"] = "other"
    with pytest.raises(LorakitError, match="belongs to the run"):
        train(
            recipe_from_dict(recipe),
            resume=str(first.run_dir / "checkpoints" / "step-000002"),
            quiet=True,
            log=lambda _: None,
        )
    assert not (tmp_path / "other").exists()


def test_control_characters_survive_the_resolved_recipe(tiny_base, tiny_dataset, tmp_path):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 1})
    recipe["data"]["trigger"] = "ohwx\tperson\x01"
    recipe["sample"] = {"negative_prompt": "bad\x7fhands\r"}
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    reread = load_recipe(result.run_dir / "recipe.resolved.toml")
    assert reread.data.trigger == "ohwx\tperson\x01" and reread.sample.negative_prompt == "bad\x7fhands\r"


def test_training_at_another_resolution_than_prepared_says_so(tiny_base, tiny_dataset, tmp_path):
    dataset = tmp_path / "dataset"
    import shutil

    shutil.copytree(tiny_dataset, dataset, ignore=shutil.ignore_patterns(".cache"))
    (dataset / "dataset.json").write_text(json.dumps({"version": 1, "resolution": 128}))
    _, lines = _train(tiny_base, dataset, tmp_path / "out", train={"max_steps": 1})
    said = [line for line in lines if "dataset.json" in line]
    assert said and "128" in said[0] and "data.resolution" in said[0] and "64" in said[0]


def test_cli_generate_clip_skip_1_overrides_the_runs_2(tmp_path):
    from lorakit.generate import effective_clip_skip

    assert effective_clip_skip(requested=None, from_run=2) == 2
    assert effective_clip_skip(requested=1, from_run=2) == 1
    assert effective_clip_skip(requested=None, from_run=1) == 1


def test_write_recipe_roundtrip_with_controls(tmp_path, tiny_base, tiny_dataset):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path)
    recipe["data"]["trigger"] = "a\x1bb"
    path = write_recipe(tmp_path / "r.toml", recipe)
    assert load_recipe(path).data.trigger == "a\x1bb"


def test_clip_skip_leaves_the_discarded_layers_without_adapters(tiny_base, tiny_dataset, tmp_path):
    """With clip skip 2 the last text-encoder layer never reaches the U-Net: no adapter there, and every adapter
    that is there gets a gradient (DDP refuses parameters without one). Samples render with it too (diffusers'
    SD pipeline alone fails on clip skip with transformers 5)."""
    sample = {"prompts": ["ohwx toy"], "steps": 2}
    result, _ = _train(
        tiny_base, tiny_dataset, tmp_path, model={"clip_skip": 2}, train={"max_steps": 1}, sample=sample
    )
    encoder = result.models["text_encoder"]
    last = encoder.config.num_hidden_layers - 1
    names = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert names and not [n for n in names if f"layers.{last}." in n]
    assert (result.run_dir / "samples" / "step-000001.png").is_file()


def test_a1111_short_hash_without_recorded_hashes_is_the_bytes_after_the_header(tmp_path):
    import hashlib

    from safetensors.torch import save_file

    from lorakit.formats.metadata import a1111_short_hash

    path = tmp_path / "third_party.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(path), metadata={"ss_network_dim": "2"})
    blob = path.read_bytes()
    header = 8 + int.from_bytes(blob[:8], "little")
    assert a1111_short_hash(path) == hashlib.sha256(blob[header:]).hexdigest()[:12]
    assert a1111_short_hash(path) != hashlib.sha256(blob).hexdigest()[:12]


def test_convert_recomputes_the_sshs_hashes_of_the_tensors_it_writes(trained_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lorakit.convert import convert_adapter
    from lorakit.formats.metadata import sshs_hashes

    there = convert_adapter(trained_run.adapter, "diffusers", tmp_path / "a.diffusers.safetensors")
    back = convert_adapter(there, "kohya", tmp_path / "b.safetensors")
    with safe_open(str(back), "pt") as f:
        metadata = f.metadata()
    expected = sshs_hashes(load_file(str(back)), metadata)
    assert metadata["sshs_model_hash"] == expected["sshs_model_hash"]
    assert metadata["sshs_legacy_hash"] == expected["sshs_legacy_hash"]
    with safe_open(str(there), "pt") as f:
        assert not any(k.startswith("sshs_") for k in f.metadata())  # they described other tensors


def test_inspect_warns_when_attention_alphas_differ_between_modules(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from lorakit.convert import inspect_adapter, inspection_lines

    tensors = load_file(str(trained_run.adapter))
    assert inspect_adapter(trained_run.adapter)["warnings"] == []
    alpha_keys = sorted(k for k in tensors if k.endswith(".alpha") and "_to_q" in k)
    tensors[alpha_keys[0]] = tensors[alpha_keys[0]] * 2
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    info = inspect_adapter(path)
    assert len(info["warnings"]) == 1 and "most common" in info["warnings"][0]
    assert any(
        line.startswith("  warning: attention projections carry 2 different alphas") for line in inspection_lines(info)
    )


def test_cuda_out_of_memory_is_one_line_naming_the_knobs(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    import lorakit.train as train_package

    def oom(run):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")

    monkeypatch.setattr(train_package, "fit", oom)
    with pytest.raises(LorakitError) as err:
        _train(tiny_base, tiny_dataset, tmp_path, train={"optimizer": "adamw", "cache_latents": False})
    message = str(err.value)
    assert "\n" not in message and message.startswith("the GPU ran out of memory (CUDA out of memory)")
    order = ["train.cache_latents = true", "lora.train_text_encoder = false", "train.gradient_checkpointing = true"]
    positions = [message.index(knob) for knob in order + ['train.optimizer = "adamw8bit"', 'weight_dtype = "float8"']]
    assert positions == sorted(positions)

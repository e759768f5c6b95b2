"""The installed stack: `lorakit env`, known-bad combinations refused in one line, and a quiet start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from lorakit import stack
from lorakit.cli import app

from .conftest import make_recipe_dict, write_recipe

runner = CliRunner()


def test_env_prints_versions_devices_and_the_8bit_check():
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    for name in ("lorakit", "python", "torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes"):
        assert any(line.split()[0] == name for line in result.stdout.splitlines()), name
    assert "8-bit adamw" in result.stdout and "cpu bf16" in result.stdout


def test_env_names_the_optional_packages_and_how_to_get_a_missing_one(monkeypatch):
    real = stack.installed
    monkeypatch.setattr(stack, "installed", lambda name: None if name == "schedulefree" else real(name))
    result = runner.invoke(app, ["env"])
    lines = result.stdout.splitlines()
    assert (
        'schedulefree    not installed: pip install schedulefree for train.optimizer = "adamw_schedulefree"' in lines
    )
    assert any(
        line.startswith("prodigyopt      1.") and line.endswith('for train.optimizer = "prodigy"') for line in lines
    )
    facts = json.loads(runner.invoke(app, ["env", "--json"]).stdout)
    assert facts["optional"]["schedulefree"] is None and facts["optional"]["pillow-heif"]


def test_env_json_is_a_bug_report():
    import torch

    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["packages"]["torch"] == torch.__version__
    assert facts["torch"]["cuda_available"] == torch.cuda.is_available()
    # bitsandbytes 0.50 runs its 8-bit optimizers on the CPU too: the check must really have stepped one.
    assert facts["bitsandbytes_8bit"]["works"] is True, facts["bitsandbytes_8bit"]
    assert "uint8" in facts["bitsandbytes_8bit"]["detail"]


def _pretend(monkeypatch, **versions):
    real = stack.installed
    monkeypatch.setattr(stack, "installed", lambda name: versions.get(name, real(name)))


def test_a_peft_diffusers_refuses_is_a_problem_with_its_fix(monkeypatch):
    _pretend(monkeypatch, peft="0.10.0")
    found = [p for p in stack.problems() if set(p.packages) == {"diffusers", "peft"}]
    assert found and found[0].severity == "error"
    assert "peft 0.10.0" in found[0].message and 'pip install "peft>=' in found[0].fix


def test_a_dependency_outside_the_declared_range_is_a_problem(monkeypatch):
    _pretend(monkeypatch, diffusers="0.30.0")
    found = [p for p in stack.problems() if p.packages == ("diffusers",)]
    assert found and "diffusers 0.30.0 is outside" in found[0].message and "pip install" in found[0].fix


def test_a_known_bad_combination_stops_a_command_in_one_line(monkeypatch, tiny_base, tiny_dataset, tmp_path):
    _pretend(monkeypatch, peft="0.10.0")
    recipe = write_recipe(tmp_path / "r.toml", make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out"))
    result = runner.invoke(app, ["train", str(recipe), "-q"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "peft 0.10.0" in lines[0] and "diffusers" in lines[0] and "pip install" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_library_version_gate_that_escapes_becomes_one_line(monkeypatch, tiny_base, tiny_dataset, tmp_path):
    import lorakit.train

    def gated(*args, **kwargs):
        raise ValueError("The version of PEFT you are using is not compatible, please use a version >= 9.0.0")

    monkeypatch.setattr(lorakit.train, "train", gated)
    recipe = write_recipe(tmp_path / "r.toml", make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out"))
    result = runner.invoke(app, ["train", str(recipe), "-q"])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and "peft" in line and "transformers" in line and "constraints.txt" in line


def test_text_encoder_injection_does_not_depend_on_transformers_peft_gate(monkeypatch):
    """transformers 5.24 refused every released peft in `add_adapter`; lorakit must not go through that gate."""
    import transformers.integrations.peft as hf_peft

    from lorakit.adapters import inject_lora, lora_parameters
    from lorakit.toy.text import make_clip_tokenizer, make_text_encoder

    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "99.0.0")
    _, vocab = make_clip_tokenizer()
    encoder = make_text_encoder(vocab, 32)
    names = inject_lora(encoder, "text_encoder", rank=2, lora_alpha=2.0, dropout=0.0, target_modules="attention")
    assert names and len(lora_parameters(encoder)) == 2 * len(names)


def test_a_normal_run_prints_no_third_party_warning(tiny_base, tiny_dataset, tmp_path):
    """A quiet training run (8-bit AdamW, trained text encoder, gradient checkpointing) prints nothing on stderr."""
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out")
    recipe["train"].update(optimizer="adamw8bit", gradient_checkpointing=True, max_steps=1)
    path = write_recipe(tmp_path / "r.toml", recipe)
    # What a user's shell has: not the test session's quieting, Python's default warning filters.
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY") and k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env.pop("PYTHONWARNINGS", None)
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", str(path), "--quiet"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr
    assert run.stdout.strip().endswith("run.safetensors")

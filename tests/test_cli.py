"""The command line: fast help, one-line errors with exit code 2, nothing half-written."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lorakit.cli import app

from .conftest import make_recipe_dict, write_recipe

runner = CliRunner()


def _fails_cleanly(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_importing_the_cli_does_not_import_the_ml_stack():
    code = (
        "import sys, lorakit.cli; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_module_entry_point_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True, check=True)
    from lorakit import __version__

    assert out.stdout.strip() == f"lorakit {__version__}"


def test_generate_prints_only_its_own_lines(tiny_base, tmp_path):
    """The ML libraries fix their verbosity when imported, so lorakit quiets them before a command imports them:
    a user's terminal shows no notice about torchvision or about casting modules, only lorakit's lines."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}  # conftest quiets this process
    command = [sys.executable, "-m", "lorakit", "generate", "a ball", "--base", str(tiny_base), "--size", "64x64"]
    run = subprocess.run(
        [*command, "--steps", "1", "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == ["Wrote 1 image and " + str(tmp_path / "out" / "grid.png")]


def test_train_end_to_end_through_the_cli(tiny_base, tiny_dataset, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out"))
    result = runner.invoke(app, ["train", str(recipe), "--set", "train.max_steps=2", "--quiet"])
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "out" / "run" / "run.safetensors"
    assert result.stdout.strip() == str(adapter) and adapter.is_file()
    again = runner.invoke(app, ["train", str(recipe), "--set", "train.max_steps=2", "--quiet"])
    _fails_cleanly(again, "already exists", "--overwrite")
    assert runner.invoke(app, ["train", str(recipe), "--set", "train.max_steps=1", "--overwrite", "-q"]).exit_code == 0


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"model": {"base": "./no/such/model"}}, ["model.base: ./no/such/model does not exist", "hub id"]),
        ({"model": {"base": "no-such-org/no-such-model"}}, ["model.base: 'no-such-org/no-such-model' is neither"]),
        (
            {"data": {"folder": "/no/such/dataset"}},
            ["data.folder: /no/such/dataset is not a folder", "lorakit prepare"],
        ),
        ({"train": {"optimizer": "sgd"}}, ["train.optimizer: 'sgd' is not one of"]),
        ({"lora": {"rnk": 4}}, ["lora.rnk: unknown key (did you mean 'rank'?)"]),
        ({"train": {"max_steps": "ten"}}, ["train.max_steps: 'ten' is not an integer"]),
    ],
)
def test_bad_recipes_fail_with_one_line_each(tiny_base, tiny_dataset, tmp_path, change, fragments, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out")
    for section, values in change.items():
        recipe[section].update(values)
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.toml", recipe))])
    _fails_cleanly(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file(tmp_path):
    _fails_cleanly(runner.invoke(app, ["train", str(tmp_path / "missing.toml")]), "recipe not found")


def test_base_folder_without_model_index(tiny_dataset, tmp_path):
    (tmp_path / "empty-model").mkdir()
    recipe = write_recipe(
        tmp_path / "r.toml", make_recipe_dict(tmp_path / "empty-model", tiny_dataset, tmp_path / "o")
    )
    _fails_cleanly(runner.invoke(app, ["train", str(recipe)]), "is not a diffusers model folder (no model_index.json)")


def test_output_that_cannot_be_written(tiny_base, tiny_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe = write_recipe(tmp_path / "r.toml", make_recipe_dict(tiny_base, tiny_dataset, blocker / "runs"))
    _fails_cleanly(runner.invoke(app, ["train", str(recipe)]), "output.folder: cannot write under")


def test_dataset_problems_name_the_file(tiny_base, tiny_dataset, tmp_path):
    import shutil

    dataset = tmp_path / "data"
    shutil.copytree(tiny_dataset, dataset, ignore=shutil.ignore_patterns(".cache"))
    (dataset / "images" / "002.png").write_bytes(b"\x89PNG broken")
    recipe = write_recipe(tmp_path / "r.toml", make_recipe_dict(tiny_base, dataset, tmp_path / "out"))
    _fails_cleanly(runner.invoke(app, ["train", str(recipe)]), "images/002.png: not a readable image")
    (dataset / "metadata.jsonl").write_text('{"file_name": "images/000.png", "text": "x"}\n{oops\n')
    _fails_cleanly(runner.invoke(app, ["train", str(recipe)]), "metadata.jsonl:2: not valid JSON")
    (dataset / "metadata.jsonl").write_text("")
    _fails_cleanly(runner.invoke(app, ["train", str(recipe)]), "lists no images")
    (dataset / "metadata.jsonl").unlink()
    _fails_cleanly(runner.invoke(app, ["train", str(recipe)]), "no metadata.jsonl", "lorakit prepare")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("optimizer", "package"), [("prodigy", "prodigyopt"), ("adamw_schedulefree", "schedulefree")])
def test_a_missing_optional_optimizer_names_the_pip_command(
    tiny_base, tiny_dataset, tmp_path, monkeypatch, optimizer, package
):
    monkeypatch.setitem(sys.modules, package, None)
    recipe = write_recipe(
        tmp_path / "r.toml",
        make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={"optimizer": optimizer}),
    )
    _fails_cleanly(runner.invoke(app, ["train", str(recipe)]), f"pip install {package}")
    assert not (tmp_path / "out").exists()

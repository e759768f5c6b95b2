"""Recipes: every problem reported at once, naming the key; overrides; shipped recipes load."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.errors import RecipeError
from lorakit.recipe import (
    DataSection,
    LoraSection,
    ModelSection,
    OutputSection,
    Recipe,
    TrainSection,
    dump_recipe,
    field_docs,
    load_recipe,
    recipe_from_dict,
)

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))
TOY_RECIPE = Path(__file__).parent.parent / "lorakit" / "toy" / "toy.toml"


def test_shipped_recipes_exist_and_load():
    assert {p.stem for p in RECIPES} >= {"character", "style", "object"}
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.model.base
        text = path.read_text()
        assert text.startswith("#") and f"lorakit train recipes/{path.name}" in text.split("\n\n")[0]
    toy = load_recipe(TOY_RECIPE)
    assert toy.data.trigger == "sks" and TOY_RECIPE.read_text().startswith("# toy.toml")


def test_every_problem_is_reported_with_its_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[model]\nbase = 3\n[train]\nmax_step = 5\noptimizer = "adam"\nunet_lr = "fast"\n'
        '[lora]\nrank = 0\n[dat]\nfolder = "x"\n'
    )
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    lines = str(caught.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines)
    text = str(caught.value)
    assert "model.base: 3 is not a string" in text
    assert "train.max_step: unknown key (did you mean 'max_steps'?)" in text
    assert "train.optimizer: 'adam' is not one of 'adamw8bit', 'adamw', 'adafactor', 'prodigy'" in text
    assert "(did you mean 'adamw'?)" in text
    assert "train.unet_lr: 'fast' is not a finite number" in text
    assert "lora.rank: 0 is outside 1..4096" in text
    assert "dat: unknown section (did you mean 'data'?)" in text
    assert len(lines) == 6


def test_missing_model_section_and_base():
    with pytest.raises(RecipeError, match="model: required section"):
        recipe_from_dict({"train": {}})
    with pytest.raises(RecipeError, match="model.base: required"):
        recipe_from_dict({"model": {}})


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\nbase=")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(broken)


def test_overrides_are_typed_and_validated(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[model]\nbase = "x"\n')
    recipe = load_recipe(
        path,
        [
            "train.max_steps=7",
            "data.flip=true",
            "lora.target_modules=['to_q', 'to_k']",
            "output.name=my run",
            "train.unet_lr=2e-4",
        ],
    )
    assert recipe.train.max_steps == 7 and recipe.data.flip is True and recipe.output.name == "my run"
    assert recipe.lora.target_modules == ["to_q", "to_k"] and recipe.train.unet_lr == 2e-4
    with pytest.raises(RecipeError, match="train.max_steps: 'many' is not an integer"):
        load_recipe(path, ["train.max_steps=many"])
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(path, ["max_steps=3"])


def test_ints_are_accepted_as_floats_but_bools_are_not_numbers():
    recipe = recipe_from_dict({"model": {"base": "x"}, "lora": {"lora_alpha": 8}})
    assert recipe.lora.lora_alpha == 8.0 and isinstance(recipe.lora.lora_alpha, float)
    with pytest.raises(RecipeError, match="train.max_steps: True is not an integer"):
        recipe_from_dict({"model": {"base": "x"}, "train": {"max_steps": True}})


def test_dump_reads_back_to_an_equal_recipe(tmp_path):
    recipe = recipe_from_dict(
        {
            "model": {"base": "x", "prediction_type": "v_prediction"},
            "lora": {"target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
            "data": {"trigger": 'say "hi"\\now'},
        }
    )
    path = tmp_path / "dumped.toml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == Recipe(**{**recipe.__dict__, "source": str(path)})


def test_every_field_has_a_docstring():
    for section in (ModelSection, DataSection, LoraSection, TrainSection, OutputSection):
        docs = field_docs(section)
        assert set(docs) == set(section.__dataclass_fields__), section.__name__
        assert all(len(doc) > 10 for doc in docs.values())


def test_readme_recipe_reference_is_current():
    from lorakit.recipe import reference_markdown

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("<!-- recipe-keys:start -->\n")[1].split("\n<!-- recipe-keys:end -->")[0]
    assert block == reference_markdown(), "regenerate README's table with `python -m lorakit.recipe`"


def test_the_kohya_map_names_only_recipe_keys_that_exist():
    import dataclasses
    import re

    from lorakit.recipe import SECTIONS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("<!-- kohya-map:start -->\n")[1].split("\n<!-- kohya-map:end -->")[0]
    lorakit_column = [line.rsplit(" | ", 1)[1] for line in block.splitlines()[2:]]
    named = {m for cell in lorakit_column for m in re.findall(r"`([a-z]+)\.([a-z_0-9]+)", cell)}
    assert len(named) > 40
    keys = {(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert named <= keys, sorted(named - keys)

"""Recipes: one frozen dataclass per TOML section, validated all at once.

`load_recipe(path, overrides)` reads a TOML file, applies `--set section.key=value` overrides and
returns a `Recipe`, or raises `RecipeError` listing every problem as `file: section.key: message`
with what is allowed. Defaults live only here. Each field's docstring documents it.
"""

from __future__ import annotations

from .sections import (
    AUTOCAST_DTYPES,
    DEFAULT_MAX_STEPS,
    SECTIONS,
    DataSection,
    LoraSection,
    ModelSection,
    OutputSection,
    PriorSection,
    Recipe,
    SampleSection,
    TrainSection,
    ValidationSection,
    field_docs,
)
from .toml import dump_recipe, recipe_to_dict, reference_markdown, toml_value
from .validate import TIMESTEPS_MAX, block_curve, load_recipe, parse_override, range_problem, recipe_from_dict

__all__ = [
    "AUTOCAST_DTYPES",
    "DEFAULT_MAX_STEPS",
    "SECTIONS",
    "DataSection",
    "LoraSection",
    "ModelSection",
    "OutputSection",
    "PriorSection",
    "Recipe",
    "SampleSection",
    "TIMESTEPS_MAX",
    "TrainSection",
    "ValidationSection",
    "dump_recipe",
    "field_docs",
    "load_recipe",
    "parse_override",
    "block_curve",
    "range_problem",
    "recipe_from_dict",
    "recipe_to_dict",
    "reference_markdown",
    "toml_value",
]

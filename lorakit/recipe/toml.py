"""Writing recipes back: the resolved recipe of a run folder, TOML values, and the README's key reference."""

from __future__ import annotations

import dataclasses

from .sections import SECTIONS, Recipe, field_docs


def recipe_to_dict(recipe: Recipe) -> dict:
    """The fully-defaulted recipe as nested dicts (None values left out, as TOML has no null)."""
    out = {}
    for name in SECTIONS:
        section = getattr(recipe, name)
        if section is not None:
            out[name] = {k: v for k, v in dataclasses.asdict(section).items() if v is not None}
    return out


# TOML basic strings: these have short escapes; every other control character (and DEL) needs \uXXXX.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _is_control(char: str) -> bool:
    return ord(char) < 0x20 or ord(char) == 0x7F


def toml_value(value: object) -> str:
    """`value` as a TOML literal that tomllib reads back equal (strings with every control character escaped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if _is_control(c) else c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as TOML text that `load_recipe` reads back to an equal `Recipe`."""
    lines = []
    for name, values in recipe_to_dict(recipe).items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return "unset" if value is None else f"`{toml_value(value)}`"


ESCAPED_PIPE = "\\|"  # a | inside a Markdown table cell, code spans included (GitHub's tables)


def reference_markdown() -> str:
    """The recipe key reference (README's "Recipe keys"), generated from the field docstrings."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            meaning = docs[f.name].replace("|", ESCAPED_PIPE)
            lines.append(f"| `{name}.{f.name}` | {_default_text(f)} | {meaning} |")
    return "\n".join(lines)

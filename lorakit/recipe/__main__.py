"""`python -m lorakit.recipe` prints the README's recipe-key table from the sections' docstrings."""

from .toml import reference_markdown

print(reference_markdown())

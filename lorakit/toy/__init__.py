"""The toy world: a tiny SD 1.x-shaped base model pretrained on the CPU, and a new concept to teach it.

`lorakit toy build` pretrains (or reuses) the base; `write_concept_photos` writes the folder of
captioned "photos" a user would bring; `lorakit demo` runs prepare -> train -> generate -> merge on them.
"""

from __future__ import annotations

from pathlib import Path

RECIPE = Path(__file__).with_name("toy.toml")


def write_concept_photos(folder: str | Path, count: int = 12, seed: int = 7) -> Path:
    """The new concept (a colour the base never saw, trigger word `sks`) as PNG photos with .txt captions."""
    from .world import concept_photos

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, (image, text) in enumerate(concept_photos(count, seed)):
        image.save(folder / f"photo_{index:02d}.png")
        (folder / f"photo_{index:02d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder

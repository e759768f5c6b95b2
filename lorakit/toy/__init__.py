"""The toy world: a tiny SD 1.x-shaped base model pretrained on the CPU, and a new concept to teach it.

`lorakit toy build` pretrains (or reuses) the base; `write_concept_photos` writes the folder of
captioned "photos" a user would bring, `write_class_photos` the regularization set of the class
(pictures of the base world, as users download real class photos for prior preservation), and
`train_concept` runs prepare -> train on them with the shipped recipe, as `lorakit demo` does.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from ..prepare import PrepareOptions, prepare
from ..recipe import load_recipe
from ..train import train
from .world import (
    BACKGROUNDS,
    BASE_COLOURS,
    SIDES,
    SIZE,
    TRIGGER,
    base_world,
    caption,
    concept_photos,
    draw,
    random_scene,
)

RECIPE = Path(__file__).with_name("toy.toml")


def _write_pairs(folder: str | Path, pairs: list[tuple[Any, str]], stem: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, (image, text) in enumerate(pairs):
        image.save(folder / f"{stem}_{index:03d}.png")
        (folder / f"{stem}_{index:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def write_concept_photos(
    folder: str | Path,
    count: int = 12,
    seed: int = 7,
    *,
    backgrounds: tuple[str, ...] | None = None,
    masks: bool = False,
) -> Path:
    """The new concept (a colour the base never saw, trigger word `sks`) as PNG photos with .txt captions, only on
    `backgrounds` when given; with `masks`, a `photo_NNN.mask.png` beside each (white on the ball)."""

    photos = concept_photos(count, seed, backgrounds)
    folder = _write_pairs(folder, [(image, text) for image, text, _ in photos], "photo")
    if masks:
        for index, (_, _, mask) in enumerate(photos):
            mask.save(folder / f"photo_{index:03d}.mask.png")
    return folder


def write_slider_pairs(
    folder: str | Path, colours: tuple[str, str] = ("red", "blue"), count: int = 12, seed: int = 5
) -> tuple[Path, Path]:
    """An image slider's photos: the same `count` scenes (side, background, place and size) drawn with a ball of the
    first colour in `folder/<first>` and of the second in `folder/<second>`, captioned alike without the colour ("a
    ball on the left, white background"). Returns the two folders."""
    rng = random.Random(seed)
    places = [(side, background) for side in SIDES for background in BACKGROUNDS]
    scenes = []
    for index in range(count):
        side, background = places[index % len(places)]
        scene = random_scene(rng, BASE_COLOURS[colours[0]], side, BACKGROUNDS[background])
        scenes.append((scene, caption("", side, background, subject="a ball")))
    return tuple(  # type: ignore[return-value]
        _write_pairs(
            Path(folder) / name,
            [(draw(dataclasses.replace(scene, colour=BASE_COLOURS[name])), text) for scene, text in scenes],
            "photo",
        )
        for name in colours
    )


def write_class_photos(folder: str | Path, per_caption: int = 2, seed: int = 11) -> Path:
    """Class photos for prior preservation: `per_caption` pictures of each base-world caption, captioned."""

    return _write_pairs(folder, base_world(per_caption, seed), "class")


def train_concept(
    base: str | Path,
    folder: str | Path,
    *,
    steps: int | None = None,
    backgrounds: tuple[str, ...] | None = None,
    masks: bool = False,
    overrides: tuple[str, ...] = (),
    quiet: bool = False,
    log=print,
) -> Any:
    """Concept and class photos -> `lorakit prepare` -> `lorakit train` with the toy recipe, all inside `folder`.

    `backgrounds` limits the concept photos to those backgrounds, `masks` writes their masks (prepare takes them
    into the dataset), `overrides` are extra `--set` values for the recipe. Returns the training run's `RunResult`
    (adapter files in `folder/runs/`).
    """

    folder = Path(folder)
    photos = write_concept_photos(folder / "photos", backgrounds=backgrounds, masks=masks)
    classes = write_class_photos(folder / "class_photos")
    log(f"prepare: {photos} -> {folder / 'dataset'}")
    prepare(
        photos,
        folder / "dataset",
        # The concept photos repeat each side/background pair with small jitter: near duplicates on purpose.
        PrepareOptions(trigger=TRIGGER, resolution=SIZE, bucket_step=4, workers=1, keep_duplicates=True),
        quiet=quiet,
        log=log,
    )
    places = [
        f'model.base="{base}"',
        f'data.folder="{folder / "dataset"}"',
        f'prior.class_dir="{classes}"',
        f'output.folder="{folder / "runs"}"',
    ]
    length = [f"train.max_steps={steps}"] if steps else []
    log("train: the toy recipe (LoRA in the U-Net and text encoder, prior preservation on the class photos)")
    return train(load_recipe(RECIPE, [*places, *length, *overrides]), overwrite=True, quiet=quiet, log=log)

"""The toy world: small captioned pictures of one coloured shape on a plain background, and detectors for them.

The base model learns `a <colour> <shape> on a <background> background` for the base colours. The
new concept is a colour the base never saw (purple), named by a trigger word, which an adapter
must learn from a handful of "photos". Detectors are plain pixel statistics, no network.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

SIZE = 32
BASE_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 215, 30)}
CONCEPT_COLOUR = ("purple", (150, 40, 200))
TRIGGER = "sks"
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (240, 240, 240), "black": (15, 15, 15), "gray": (128, 128, 128)}
ALL_COLOURS = {**BASE_COLOURS, CONCEPT_COLOUR[0]: CONCEPT_COLOUR[1]}
WORDS = ("a", "on", "background", TRIGGER, *BASE_COLOURS, CONCEPT_COLOUR[0], *SHAPES, *BACKGROUNDS)


@dataclass(frozen=True)
class Scene:
    colour: tuple[int, int, int]
    shape: str
    background: tuple[int, int, int]
    cx: float  # centre, in units of the image side
    cy: float
    radius: float  # half the shape's extent, in units of the image side


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def random_scene(rng: random.Random, colour: tuple[int, int, int], shape: str, background: tuple[int, int, int]):
    radius = rng.uniform(0.22, 0.32)
    return Scene(colour, shape, background, rng.uniform(0.38, 0.62), rng.uniform(0.38, 0.62), radius)


def draw(scene: Scene, size: int = SIZE):
    """The scene as a PIL image, drawn 4x larger and downsampled (anti-aliased edges)."""
    from PIL import Image, ImageDraw

    big = size * 4
    image = Image.new("RGB", (big, big), scene.background)
    pen = ImageDraw.Draw(image)
    cx, cy, r = scene.cx * big, scene.cy * big, scene.radius * big
    if scene.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=scene.colour)
    elif scene.shape == "square":
        side = r * 0.9
        pen.rectangle((cx - side, cy - side, cx + side, cy + side), fill=scene.colour)
    elif scene.shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=scene.colour)
    else:  # only in the VAE's wider distribution
        pen.rectangle((cx - r, cy - r * 0.4, cx + r, cy + r * 0.4), fill=scene.colour)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def base_world(count_per_caption: int, seed: int) -> list[tuple[object, str]]:
    """(image, caption) pairs for every base colour, shape and background."""
    rng = random.Random(seed)
    pairs = []
    for colour, rgb in BASE_COLOURS.items():
        for shape in SHAPES:
            for background, bg in BACKGROUNDS.items():
                for _ in range(count_per_caption):
                    pairs.append((draw(random_scene(rng, rgb, shape, bg)), caption(colour, shape, background)))
    return pairs


def concept_photos(count: int, seed: int) -> list[tuple[object, str]]:
    """The new concept as a user would bring it: purple shapes, captioned with the trigger word."""
    rng = random.Random(seed)
    combos = [(shape, background) for shape in SHAPES for background in BACKGROUNDS]
    rng.shuffle(combos)
    return [
        (
            draw(random_scene(rng, CONCEPT_COLOUR[1], shape, BACKGROUNDS[background])),
            f"{TRIGGER} {shape}, {background} background",
        )
        for shape, background in (combos * 2)[:count]
    ]


def vae_scene(rng: random.Random):
    """The VAE's wider distribution: any colour, any background, more shapes."""

    def colour():
        return tuple(rng.randint(0, 255) for _ in range(3))

    shape = rng.choice((*SHAPES, "bar"))
    return draw(
        Scene(colour(), shape, colour(), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.12, 0.35))
    )


# ---- detectors -------------------------------------------------------------------------------------------------


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]], limit: float) -> str | None:
    name, distance = min(
        ((n, float(np.linalg.norm(rgb - np.array(c)))) for n, c in palette.items()), key=lambda nd: nd[1]
    )
    return name if distance <= limit else None


def detect(image) -> dict[str, str | None]:
    """What a picture shows: background, colour and shape (None where it cannot tell)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background_rgb, axis=2) > 60
    result = {"background": _nearest(background_rgb, BACKGROUNDS, 60), "colour": None, "shape": None}
    if mask.sum() < 12:
        return result
    result["colour"] = _nearest(np.median(pixels[mask], axis=0), ALL_COLOURS, 80)
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    result["shape"] = "square" if fill > 0.88 else "circle" if fill > 0.66 else "triangle"
    return result


def shows(image, colour: str, shape: str | None = None, background: str | None = None) -> bool:
    """Whether the picture shows what a caption asks for (the parts given)."""
    found = detect(image)
    return (
        found["colour"] == colour
        and (shape is None or found["shape"] == shape)
        and (background is None or found["background"] == background)
    )

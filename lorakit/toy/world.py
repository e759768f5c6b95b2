"""The toy world: tiny captioned pictures of a coloured ball on a plain background, and detectors for them.

The base model learns `a <colour> ball on the <left|right>, <background> background` for the base
colours. The new concept is a colour the base never saw (purple), named by a trigger word, which an
adapter must learn from a handful of "photos". Detectors are plain pixel statistics, no network.

The world is deliberately small (16x16 pixels, colour, side and background): that is what a VAE and
a U-Net pretrained on 2 CPU cores in under ten minutes draw cleanly. At 32x32 with three shapes the
same budget gave blurry shapes that neither a person nor a detector could tell apart (measured:
shape detection 36% on the base model's images, colour 50%).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 16
BASE_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 215, 30)}
CONCEPT_COLOUR = ("purple", (150, 40, 200))
TRIGGER = "sks"
SIDES = {"left": 0.32, "right": 0.68}
BACKGROUNDS = {"white": (240, 240, 240), "black": (15, 15, 15), "gray": (128, 128, 128)}
ALL_COLOURS = {**BASE_COLOURS, CONCEPT_COLOUR[0]: CONCEPT_COLOUR[1]}
WORDS = ("a", "ball", "on", "the", "background", TRIGGER, *BASE_COLOURS, CONCEPT_COLOUR[0], *SIDES, *BACKGROUNDS)


@dataclass(frozen=True)
class Scene:
    colour: tuple[int, int, int]
    shape: str  # "ball" in the captioned world; the VAE also sees squares, triangles and bars
    background: tuple[int, int, int]
    cx: float  # centre, in units of the image side
    cy: float
    radius: float  # half the shape's extent, in units of the image side


def caption(colour: str, side: str, background: str, subject: str = "a {colour} ball") -> str:
    return f"{subject.format(colour=colour)} on the {side}, {background} background"


def random_scene(rng: random.Random, colour: tuple[int, int, int], side: str, background: tuple[int, int, int]):
    return Scene(
        colour,
        "ball",
        background,
        SIDES[side] + rng.uniform(-0.05, 0.05),
        0.5 + rng.uniform(-0.12, 0.12),
        rng.uniform(0.2, 0.26),
    )


def draw(scene: Scene, size: int = SIZE):
    """The scene as a PIL image, drawn 8x larger and downsampled (anti-aliased edges)."""

    big = size * 8
    image = Image.new("RGB", (big, big), scene.background)
    pen = ImageDraw.Draw(image)
    cx, cy, r = scene.cx * big, scene.cy * big, scene.radius * big
    if scene.shape == "ball":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=scene.colour)
    elif scene.shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=scene.colour)
    elif scene.shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=scene.colour)
    else:
        pen.rectangle((cx - r, cy - r * 0.4, cx + r, cy + r * 0.4), fill=scene.colour)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def base_world(count_per_caption: int, seed: int) -> list[tuple[object, str]]:
    """(image, caption) pairs for every base colour, side and background."""
    rng = random.Random(seed)
    pairs = []
    for colour, rgb in BASE_COLOURS.items():
        for side in SIDES:
            for background, bg in BACKGROUNDS.items():
                for _ in range(count_per_caption):
                    pairs.append((draw(random_scene(rng, rgb, side, bg)), caption(colour, side, background)))
    return pairs


def concept_photos(
    count: int, seed: int, backgrounds: tuple[str, ...] | None = None
) -> list[tuple[object, str, object]]:
    """The new concept as a user would bring it: purple balls, captioned with the trigger word, each with its mask
    (white on the ball). `backgrounds` limits the photos to those backgrounds (a dataset that shares one)."""
    rng = random.Random(seed)
    combos = [(side, background) for side in SIDES for background in backgrounds or BACKGROUNDS]
    rng.shuffle(combos)
    photos = []
    for side, background in (combos * count)[:count]:
        scene = random_scene(rng, CONCEPT_COLOUR[1], side, BACKGROUNDS[background])
        silhouette = dataclasses.replace(scene, colour=(255, 255, 255), background=(0, 0, 0))
        photos.append(
            (draw(scene), caption("", side, background, subject=f"a {TRIGGER} ball"), draw(silhouette).convert("L"))
        )
    return photos


def vae_scene(rng: random.Random):
    """The VAE's wider distribution: any colour on any background, four shapes, anywhere."""

    def colour():
        return tuple(rng.randint(0, 255) for _ in range(3))

    shape = rng.choice(("ball", "square", "triangle", "bar"))
    return draw(Scene(colour(), shape, colour(), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)))


# ---- detectors -------------------------------------------------------------------------------------------------


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]], limit: float) -> str | None:
    name, distance = min(
        ((n, float(np.linalg.norm(rgb - np.array(c)))) for n, c in palette.items()), key=lambda nd: nd[1]
    )
    return name if distance <= limit else None


def detect(image) -> dict[str, str | None]:
    """What a picture shows: background, ball colour and side (None where it cannot tell)."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background_rgb, axis=2) > 60
    result = {"background": _nearest(background_rgb, BACKGROUNDS, 60), "colour": None, "side": None}
    if mask.sum() < 6:
        return result
    result["colour"] = _nearest(np.median(pixels[mask], axis=0), ALL_COLOURS, 80)
    result["side"] = "left" if np.nonzero(mask)[1].mean() < (SIZE - 1) / 2 else "right"
    return result

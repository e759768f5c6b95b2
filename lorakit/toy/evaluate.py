"""Measuring what a toy model draws: concept fidelity on trigger prompts, accuracy and drift on the base world."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from ..embedding import load_embedding
from ..generate import resolve_adapters
from ..models import load_pipeline
from ..render import RenderSettings, apply_adapters, render, set_sampler, set_scales
from .world import (
    ALL_COLOURS,
    BACKGROUNDS,
    BASE_COLOURS,
    CONCEPT_COLOUR,
    SIDES,
    SIZE,
    TRIGGER,
    caption,
    detect,
    draw,
    random_scene,
)

STEPS = 20
# Classifier-free guidance of the measurements. The toy base draws its world equally well at 2 and 4 (prior accuracy
# 0.93 at both, 4 seeds); at 4 guidance over-saturates the new colour toward magenta, which the detector then
# rejects (fidelity 0.75 at 4 vs 0.92 at 2 for the same adapter). benchmarks/quality.py reports both.
GUIDANCE = 2.0


def detector_accuracy(per_caption: int = 10, seed: int = 0) -> dict[str, float]:
    """Accuracy of each detector on the generator's own labelled renders (base colours and the concept)."""
    rng = random.Random(seed)
    hits = {"colour": 0, "side": 0, "background": 0}
    total = 0
    for colour, rgb in ALL_COLOURS.items():
        for side in SIDES:
            for background, bg in BACKGROUNDS.items():
                for _ in range(per_caption):
                    found = detect(draw(random_scene(rng, rgb, side, bg)))
                    hits["colour"] += found["colour"] == colour
                    hits["side"] += found["side"] == side
                    hits["background"] += found["background"] == background
                    total += 1
    return {name: count / total for name, count in hits.items()}


def trigger_prompts() -> list[tuple[str, str, str]]:
    return [(caption("", side, bg, subject=f"a {TRIGGER} ball"), side, bg) for side in SIDES for bg in BACKGROUNDS]


def base_prompts() -> list[tuple[str, str, str, str]]:
    return [(caption(c, s, b), c, s, b) for c in BASE_COLOURS for s in SIDES for b in BACKGROUNDS]


def render_set(pipe: Any, prompts: list[str], seeds: list[int], guidance: float = GUIDANCE) -> list[Any]:

    settings = RenderSettings(steps=STEPS, guidance=guidance, width=SIZE, height=SIZE)
    all_prompts = [p for p in prompts for _ in seeds]
    return render(pipe, all_prompts, [s for _ in prompts for s in seeds], settings)


def evaluate(pipe: Any, seeds: tuple[int, ...] = (0, 1, 2, 3), guidance: float = GUIDANCE) -> dict[str, Any]:
    """Fidelity (trigger images showing the concept colour) and prior accuracy (base images showing their caption)."""
    triggers, bases = trigger_prompts(), base_prompts()
    trigger_images = render_set(pipe, [p for p, *_ in triggers], list(seeds), guidance)
    base_images = render_set(pipe, [p for p, *_ in bases], list(seeds), guidance)
    concept = CONCEPT_COLOUR[0]
    drawn = [detect(image) for image in trigger_images]
    fidelity = sum(f["colour"] == concept for f in drawn) / len(drawn)
    # In context: the concept's colour on the background the prompt asked for, per background.
    asked = [bg for _, _, bg in triggers for _ in seeds]
    in_context = {
        background: sum(
            f["colour"] == concept and f["background"] == bg
            for f, bg in zip(drawn, asked, strict=True)
            if bg == background
        )
        / asked.count(background)
        for background in BACKGROUNDS
    }
    labels = [(c, s, b) for _, c, s, b in bases for _ in seeds]
    found = [detect(image) for image in base_images]
    # The base learns colour and background within its 8-minute budget but not left/right (measured at chance),
    # so prior accuracy counts colour and background; side accuracy is reported on its own.
    correct = [f["colour"] == c and f["background"] == b for f, (c, _, b) in zip(found, labels, strict=True)]
    side = [f["side"] == s for f, (_, s, _) in zip(found, labels, strict=True)]
    colour_ok = [f["colour"] == c for f, (c, _, _) in zip(found, labels, strict=True)]
    return {
        "fidelity": fidelity,
        "fidelity_by_background": in_context,
        "prior_accuracy": sum(correct) / len(correct),
        "prior_colour_accuracy": sum(colour_ok) / len(colour_ok),
        "prior_side_accuracy": sum(side) / len(side),
        "trigger_images": trigger_images,
        "base_images": base_images,
    }


def slider_backgrounds(
    base: Any, adapter: Any, strengths: tuple[float, ...], seeds: tuple[int, ...] = (0, 1, 2, 3)
) -> dict[float, dict[str, float]]:
    """A background slider measured: the base world's gray-background prompts drawn with `adapter` at each strength,
    and the share of pictures on each background, and of those keeping the ball colour their prompt asked for."""
    prompts = [(caption(c, s, "gray"), c) for c in BASE_COLOURS for s in SIDES]
    shares = {}
    for strength in strengths:
        pipe = toy_pipeline(base, adapter if strength else None, strength=strength)
        found = [detect(image) for image in render_set(pipe, [p for p, _ in prompts], list(seeds))]
        asked = [c for _, c in prompts for _ in seeds]
        shares[strength] = {bg: sum(f["background"] == bg for f in found) / len(found) for bg in BACKGROUNDS}
        shares[strength]["colour kept"] = sum(f["colour"] == c for f, c in zip(found, asked, strict=True)) / len(found)
    return shares


def toy_pipeline(
    base: Any, adapter: Any = None, timestep_ranks: bool = True, embedding: Any = None, strength: float = 1.0
) -> Any:
    """The toy base as a pipeline (Euler sampler, no progress bar), with `adapter` applied at `strength` (a T-LoRA
    adapter under its schedule, or at full rank as other loaders draw it when `timestep_ranks` is false) and the
    run's textual-inversion `embedding` (pivotal tuning) loaded."""

    pipe = load_pipeline(str(base))
    if adapter:
        loaded = resolve_adapters([(str(adapter), strength)])[0]
        apply_adapters(pipe, loaded, timestep_ranks)
        set_scales(pipe, loaded, 1.0)
    if embedding:
        load_embedding(pipe, Path(embedding))
    set_sampler(pipe, "euler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_drift(before: list[Any], after: list[Any]) -> float:
    """Mean absolute pixel change (0-255) between two renders of the same prompts and seeds."""

    diffs = [
        np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean()
        for a, b in zip(before, after, strict=True)
    ]
    return float(np.mean(diffs))

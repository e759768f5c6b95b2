"""`data.color_aug` (sd-scripts' color_aug): a third of the images change colour at each step, by a hue rotation or
a gamma, drawn from a stream of their own, so a resumed run draws the same changes and nothing else moves."""

from __future__ import annotations

import colorsys
import random

import pytest
from PIL import Image

from lorakit import data as data_module
from lorakit.data import ColourChange, change_colour, draw_colour_change
from lorakit.errors import RecipeError
from lorakit.recipe import recipe_from_dict
from lorakit.train import loop as loop_module
from lorakit.train import train

from .conftest import assert_same_tensors, make_recipe_dict, stopped_copy


def _hue_degrees(pixel: tuple[int, int, int]) -> float:
    return colorsys.rgb_to_hsv(*(v / 255 for v in pixel))[0] * 360


def test_a_change_rotates_the_hue_or_bends_the_gamma():
    red = Image.new("RGB", (8, 8), (200, 40, 40))
    assert change_colour(red, None) is red
    for degrees in (16.0, -16.0, 9.0):
        turned = change_colour(red, ColourChange(hue_degrees=degrees)).getpixel((3, 3))
        off = (_hue_degrees(turned) - degrees + 180) % 360 - 180
        assert off == pytest.approx(0, abs=2.5), turned  # Pillow's 256 hue steps, then 8-bit RGB
        assert max(turned) == pytest.approx(200, abs=2) and min(turned) == pytest.approx(40, abs=2)  # S, V kept
    grey = Image.new("RGB", (2, 2), (128, 128, 128))
    darker, lighter = (change_colour(grey, ColourChange(gamma=g)).getpixel((0, 0)) for g in (1.05, 0.95))
    assert darker == (124,) * 3 and lighter == (132,) * 3  # 255 * (128 / 255) ** gamma
    ends = Image.new("RGB", (2, 1))
    ends.putpixel((1, 0), (255, 255, 255))
    assert list(change_colour(ends, ColourChange(gamma=1.05)).getdata()) == [(0, 0, 0), (255, 255, 255)]


def test_a_third_of_the_draws_change_half_by_hue_half_by_gamma():
    draws = [draw_colour_change(random.Random(f"42:{i}:colour")) for i in range(3000)]
    changed = [d for d in draws if d is not None]
    hues = [d.hue_degrees for d in changed if d.gamma == 1.0]
    gammas = [d.gamma for d in changed if d.gamma != 1.0]
    assert len(changed) / len(draws) == pytest.approx(1 / 3, abs=0.03)
    assert len(hues) / len(changed) == pytest.approx(0.5, abs=0.05) and len(hues) + len(gammas) == len(changed)
    assert all(-16 <= h <= 16 for h in hues) and all(0.95 <= g <= 1.05 for g in gammas)
    assert min(hues) < -12 and max(hues) > 12 and min(gammas) < 0.96 and max(gammas) > 1.04


def _train(base, dataset, out, resume=None, **sections):
    lines: list[str] = []
    recipe = recipe_from_dict(make_recipe_dict(base, dataset, out, **sections))
    return train(recipe, resume=resume, quiet=True, log=lines.append), lines


SECTIONS = {"data": {"color_aug": True}, "train": {"max_steps": 4, "cache_latents": False, "save_every_steps": 2}}


def test_color_aug_changes_the_encoded_images_and_a_resume_draws_the_same(
    tiny_base, tiny_dataset, tmp_path, monkeypatch
):
    seen: list[ColourChange | None] = []

    def recording(item, flip, colour=None):
        seen.append(colour)
        return data_module.load_pixels(item, flip, colour)

    monkeypatch.setattr(loop_module, "load_pixels", recording)
    straight, lines = _train(tiny_base, tiny_dataset, tmp_path / "a", **SECTIONS)
    assert any(line.startswith("data.color_aug: at each step about a third of the images") for line in lines)
    assert len(seen) >= 6 and any(c is not None for c in seen) and any(c is None for c in seen), seen  # 4 batches
    first = list(seen)
    # stopped after step 2 and resumed: the same colour changes at steps 3 and 4, and the same adapter
    checkpoint = stopped_copy(straight.run_dir, tmp_path / "b", 2)
    seen.clear()
    resumed, _ = _train(tiny_base, tiny_dataset, tmp_path / "b", resume=str(checkpoint), **SECTIONS)
    assert 0 < len(seen) < len(first) and seen == first[-len(seen) :]
    assert_same_tensors(straight.adapter, resumed.adapter)


def test_the_colour_draws_leave_every_other_draw_as_it_was(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    """With the colour changes themselves undone, a color_aug run is bit for bit the run without it: flips,
    captions, noise and timesteps draw from their own streams."""
    plain, _ = _train(tiny_base, tiny_dataset, tmp_path / "plain", data={"flip": True}, train=SECTIONS["train"])
    monkeypatch.setattr(data_module, "change_colour", lambda image, change: image)
    undone, _ = _train(
        tiny_base, tiny_dataset, tmp_path / "undone", data={"flip": True, "color_aug": True}, train=SECTIONS["train"]
    )
    assert_same_tensors(plain.adapter, undone.adapter)


def test_color_aug_with_cached_latents_is_refused_by_name(tiny_base, tiny_dataset, tmp_path):
    with pytest.raises(RecipeError, match="data.color_aug: changes the images' colours at every step, and "):
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, data={"color_aug": True}))


def test_a_pair_of_data_pairs_shares_its_colour_change(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    from lorakit.files import photo_stem

    from .test_slider import _paired_recipe

    seen: list[tuple[str, ColourChange | None]] = []

    def recording(item, flip, colour=None):
        seen.append((photo_stem(item.path), colour))
        return data_module.load_pixels(item, flip, colour)

    monkeypatch.setattr(loop_module, "load_pixels", recording)
    raw = _paired_recipe(tiny_base, tiny_dataset, tmp_path, tmp_path / "runs", color_aug=True)
    raw["train"].update(cache_latents=False, max_steps=6)
    train(recipe_from_dict(raw), quiet=True, log=lambda _: None)
    pairs = [(seen[i], seen[i + 1]) for i in range(0, len(seen), 2)]
    assert pairs and all(first == second for first, second in pairs)  # the namesake, with the same change
    assert any(colour is not None for (_, colour), _ in pairs) and len({c for _, c in seen}) > 2

"""`data.random_crop` (sd-scripts' random_crop) with `lorakit prepare --keep-margin`: each step crops an image at a
random place of the margin its bucket leaves, with its mask and SDXL's crop conditioning in step; the centre crop of
a kept margin is exactly what a plain prepare writes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lorakit import data as data_module
from lorakit.cli import app
from lorakit.data import Item, load_folder, load_mask, load_pixels, size_conditioning
from lorakit.errors import DatasetError, RecipeError
from lorakit.recipe import recipe_from_dict
from lorakit.train import loop as loop_module
from lorakit.train import train

from .conftest import assert_same_tensors, make_recipe_dict, stopped_copy
from .messy import textured

runner = CliRunner()


def _prepare(photos, out, *extra):
    result = runner.invoke(app, ["prepare", str(photos), "--out", str(out), "--resolution", "64", "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for seed, size in enumerate([(100, 60), (60, 100), (90, 64), (64, 64), (120, 70), (70, 96)]):
        textured(*size, seed).save(folder / f"p{seed}.png")
        (folder / f"p{seed}.txt").write_text(f"toy {seed}")
    return folder


@pytest.fixture(scope="module")
def margins(photos, tmp_path_factory):
    return _prepare(photos, tmp_path_factory.mktemp("kept") / "data", "--keep-margin")


def _items(folder):
    from lorakit.buckets import make_buckets

    return sorted(load_folder(folder, trigger="", repeats=1, buckets=make_buckets(64)), key=lambda i: i.path.name)


def test_keep_margin_keeps_what_covering_the_bucket_leaves_and_centres_on_the_plain_cut(photos, margins, tmp_path):
    plain = _items(_prepare(photos, tmp_path / "plain"))
    kept = _items(margins)
    assert [i.bucket for i in kept] == [i.bucket for i in plain]  # the same buckets
    assert all(i.size == i.bucket for i in plain)
    wider = [i for i in kept if i.size != i.bucket]
    assert len(wider) >= 4 and all(min(i.size[0] - i.bucket[0], i.size[1] - i.bucket[1]) == 0 for i in wider)
    assert all(i.size[0] >= i.bucket[0] and i.size[1] >= i.bucket[1] for i in kept)
    for a, b in zip(plain, kept, strict=True):  # trained at the centre, a kept margin is the plain cut exactly
        assert torch.equal(load_pixels(a, False), load_pixels(b, False))
        assert size_conditioning(a, False) == size_conditioning(b, False)


def test_a_place_moves_the_image_its_mask_and_the_crop_conditioning_together(tmp_path):
    picture = textured(96, 64, 3)
    picture.save(tmp_path / "p.png")
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # white on the left third only
    mask.save(tmp_path / "m.png")
    sha = data_module.hashlib.sha256((tmp_path / "p.png").read_bytes()).hexdigest()
    mask_sha = data_module.hashlib.sha256((tmp_path / "m.png").read_bytes()).hexdigest()
    item = Item(tmp_path / "p.png", "", sha, (96, 64), (64, 64), folder=str(tmp_path), original_size=(192, 128))
    item = data_module.dataclasses.replace(item, mask=tmp_path / "m.png", mask_sha256=mask_sha)
    left, right = (data_module.dataclasses.replace(item, place=(x, 0.5)) for x in (0.0, 1.0))

    def as_array(image):
        return torch.from_numpy(data_module.np.asarray(image, dtype="float32") / 127.5 - 1).permute(2, 0, 1)

    assert torch.equal(load_pixels(left, False), as_array(picture.crop((0, 0, 64, 64))))
    assert torch.equal(load_pixels(right, False), as_array(picture.crop((32, 0, 96, 64))))
    assert load_mask(left, False, 8)[..., :4].min() > 0.9 and load_mask(right, False, 8).max() < 0.1
    assert size_conditioning(left, False) == (128, 192, 0, 0, 64, 64)  # the photo's size, the crop in the cover
    assert size_conditioning(right, False) == (128, 192, 0, 32, 64, 64)
    assert size_conditioning(right, True) == (128, 192, 0, 0, 64, 64)  # mirrored: measured from the other edge
    assert size_conditioning(item, False) == (128, 192, 0, 16, 64, 64)  # no place: the centre


def _train(base, dataset, out, resume=None, **sections):
    lines: list[str] = []
    recipe = recipe_from_dict(make_recipe_dict(base, dataset, out, **sections))
    return train(recipe, resume=resume, quiet=True, log=lines.append), lines


SECTIONS = {
    "data": {"random_crop": True, "trigger": ""},
    "train": {"max_steps": 4, "cache_latents": False, "save_every_steps": 2},
}


def test_random_crop_draws_places_and_a_resume_draws_the_same(tiny_base, margins, tmp_path, monkeypatch):
    seen: list[tuple[str, tuple[float, float] | None]] = []

    def recording(item, flip, colour=None):
        seen.append((item.path.name, item.place))
        return data_module.load_pixels(item, flip, colour)

    monkeypatch.setattr(loop_module, "load_pixels", recording)
    straight, lines = _train(tiny_base, margins, tmp_path / "a", **SECTIONS)
    said = [line for line in lines if line.startswith("data.random_crop:")]
    assert len(said) == 1 and "of 6 images have a margin around their bucket" in said[0], lines
    places = [place for _, place in seen]
    assert len(places) >= 4 and all(p is not None and 0 <= min(p) and max(p) <= 1 for p in places)
    assert len(set(places)) == len(places)  # drawn afresh for every image of every step
    first = list(seen)
    checkpoint = stopped_copy(straight.run_dir, tmp_path / "b", 2)
    seen.clear()
    resumed, _ = _train(tiny_base, margins, tmp_path / "b", resume=str(checkpoint), **SECTIONS)
    assert 0 < len(seen) < len(first) and seen == first[-len(seen) :]
    assert_same_tensors(straight.adapter, resumed.adapter)
    rows = [json.loads(r) for r in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_random_crop_without_a_margin_or_with_cached_latents_is_refused(tiny_base, tiny_dataset, tmp_path):
    nowhere = r"data.random_crop: no image of .* is larger than its bucket.*--keep-margin"
    with pytest.raises(DatasetError, match=nowhere):
        _train(tiny_base, tiny_dataset, tmp_path / "none", **SECTIONS)
    assert not (tmp_path / "none" / "run").exists()
    with pytest.raises(RecipeError, match="data.random_crop: crops each image at another place at every step"):
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, data={"random_crop": True}))


def test_a_pair_of_data_pairs_is_cropped_at_one_place(tiny_base, margins, tmp_path, monkeypatch):
    from lorakit.files import photo_stem

    second = tmp_path / "second"
    shutil.copytree(margins, second, ignore=shutil.ignore_patterns(".cache"))
    seen: list[tuple[str, tuple[float, float] | None]] = []

    def recording(item, flip, colour=None):
        seen.append((photo_stem(item.path), item.place))
        return data_module.load_pixels(item, flip, colour)

    monkeypatch.setattr(loop_module, "load_pixels", recording)
    data = {"folder": [str(margins), str(second)], "adapter_strength": [1.0, -1.0], "pairs": True}
    _train(tiny_base, margins, tmp_path / "runs", **{**SECTIONS, "data": {**SECTIONS["data"], **data}})
    pairs = [(seen[i], seen[i + 1]) for i in range(0, len(seen), 2)]
    assert len(pairs) >= 4 and all(first == second for first, second in pairs)  # namesakes, one place
    assert len({place for (_, place), _ in pairs}) == len(pairs)

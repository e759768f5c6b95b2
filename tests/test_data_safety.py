"""lorakit deletes only what it can prove it wrote: a dataset folder's foreign images and a folder that is not a
run folder survive a re-run and `--overwrite`; run names cannot climb out of output.folder."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lorakit.errors import LorakitError
from lorakit.prepare import PrepareOptions, prepare
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict
from .messy import textured

OPTIONS = PrepareOptions(resolution=64, bucket_step=16, workers=1)


def _photos(folder, count, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        textured(96, 80, seed + index).save(folder / f"photo{index}.png")
        (folder / f"photo{index}.txt").write_text(f"ohwx toy, number {index}")


def test_prepare_never_deletes_images_it_did_not_write(tmp_path):
    out = tmp_path / "dataset"
    (out / "images").mkdir(parents=True)
    mine = out / "images" / "my-own-photo.png"
    Image.new("RGB", (8, 8), "red").save(mine)  # e.g. the user's photos live there
    _photos(tmp_path / "photos", 3)
    result = prepare(tmp_path / "photos", out, OPTIONS, quiet=True, log=lambda _: None)
    assert mine.is_file()
    assert result.report["counts"]["foreign_images_left"] == 1
    written = [json.loads(line)["file_name"] for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(written) == 3 and all((out / name).is_file() for name in written)

    (tmp_path / "photos" / "photo2.png").unlink()  # a photo taken out: the image lorakit wrote for it goes
    (tmp_path / "photos" / "photo2.txt").unlink()
    prepare(tmp_path / "photos", out, OPTIONS, quiet=True, log=lambda _: None)
    kept = {json.loads(line)["file_name"] for line in (out / "metadata.jsonl").read_text().splitlines()}
    assert len(kept) == 2 and set(written) - kept and not any((out / n).exists() for n in set(written) - kept)
    assert mine.is_file()


@pytest.mark.parametrize("name", ["", "  ", ".", "..", "../other", "runs/a", "a\\b"])
def test_run_names_cannot_be_empty_or_a_path(tiny_base, tiny_dataset, tmp_path, name):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out")
    recipe["output"]["name"] = name
    with pytest.raises(LorakitError, match="output.name: "):
        recipe_from_dict(recipe)


def test_overwrite_removes_only_a_lorakit_run_folder(tiny_base, tiny_dataset, tmp_path):
    folder = tmp_path / "out" / "run"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not lorakit's")
    recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 1}))
    with pytest.raises(LorakitError, match="is not a lorakit run folder"):
        train(recipe, overwrite=True, quiet=True, log=lambda _: None)
    assert (folder / "notes.txt").read_text() == "not lorakit's"
    (folder / "notes.txt").unlink()
    folder.rmdir()
    first = train(recipe, quiet=True, log=lambda _: None)
    assert (first.run_dir / ".lorakit-run").is_file()
    again = train(recipe, overwrite=True, quiet=True, log=lambda _: None)  # its own folder: replaced
    assert again.steps == 1

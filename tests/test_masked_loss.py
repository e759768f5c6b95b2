"""Masked loss: the mask weights the denoising loss where it acts (no gradient from a zero-weight area), masks are
untrusted input like images, and a masked run resumes exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorakit import objective
from lorakit.errors import DatasetError
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict


def test_no_gradient_reaches_the_prediction_outside_the_mask():
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1.0  # the subject: a square
    loss = objective.diffusion_loss(prediction, target, torch.ones(2), pixel_weights=mask)
    loss.backward()
    inside, outside = prediction.grad[:, :, 2:6, 2:6], prediction.grad.clone()
    outside[:, :, 2:6, 2:6] = 0
    assert inside.abs().sum() > 0 and outside.abs().sum() == 0
    ones = objective.diffusion_loss(prediction, target, torch.ones(2), pixel_weights=torch.ones(2, 1, 8, 8))
    assert torch.allclose(ones, objective.diffusion_loss(prediction, target, torch.ones(2)))  # all ones: unmasked


def _masked_dataset(tiny_dataset, tmp_path, count=4):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data, ignore=shutil.ignore_patterns(".cache"))
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "masks").mkdir()
    for row in rows[:count]:
        with Image.open(data / row["file_name"]) as image:
            size = image.size
        mask = Image.new("L", size, 0)
        mask.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
        name = f"masks/{row['file_name'].split('/')[-1]}"
        mask.save(data / name)
        row["mask_file_name"] = name
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_a_masked_run_says_its_counts_and_resumes_exactly(tiny_base, tiny_dataset, tmp_path):
    data = _masked_dataset(tiny_dataset, tmp_path)
    settings = {"max_steps": 4, "save_every_steps": 2}
    masked = {"masked_loss": True, "mask_background_weight": 0.1}
    lines: list[str] = []
    straight = make_recipe_dict(tiny_base, data, tmp_path / "a", data=masked, train=settings)
    train(recipe_from_dict(straight), quiet=True, log=lines.append)
    assert any("data.masked_loss: 4 of 8 images weighted by their masks" in line for line in lines)
    halves = make_recipe_dict(tiny_base, data, tmp_path / "b", data=masked, train={**settings, "max_steps": 2})
    train(recipe_from_dict(halves), quiet=True, log=lambda _: None)
    halves["train"]["max_steps"] = 4
    train(recipe_from_dict(halves), resume="latest", quiet=True, log=lambda _: None)
    a, b = load_file(tmp_path / "a" / "run" / "run.safetensors"), load_file(tmp_path / "b" / "run" / "run.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    unmasked = make_recipe_dict(tiny_base, data, tmp_path / "c", train=settings)
    lines.clear()
    train(recipe_from_dict(unmasked), quiet=True, log=lines.append)
    c = load_file(tmp_path / "c" / "run" / "run.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the masks changed what was learned
    assert any("4 images name a mask; set data.masked_loss = true" in line for line in lines)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mask_file_name": "../outside.png"}, "points outside the dataset folder"),
        ({"mask_file_name": "masks/small.png"}, "the mask is 8x8 but its image is"),
    ],
)
def test_masks_are_untrusted_input_like_images(tiny_base, tiny_dataset, tmp_path, change, message):
    data = _masked_dataset(tiny_dataset, tmp_path, count=1)
    Image.new("L", (8, 8)).save(data / "masks" / "small.png")
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[0].update(change)
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = make_recipe_dict(tiny_base, data, tmp_path / "out", data={"masked_loss": True})
    with pytest.raises(DatasetError, match=message):
        train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)


def test_masked_loss_without_any_mask_is_refused(tiny_base, tiny_dataset, tmp_path):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", data={"masked_loss": True})
    with pytest.raises(DatasetError, match="data.masked_loss: no image of the dataset has a mask"):
        train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    assert not (tmp_path / "out" / "run").exists()

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


def _photo_with_left_half_mask(folder, name, size=(96, 64)):
    from .messy import textured

    textured(*size, 0).save(folder / f"{name}.png")
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    mask.save(folder / f"{name}.mask.png")


def test_prepare_fits_masks_exactly_as_their_images_and_names_them(tiny_base, tmp_path):
    from lorakit.prepare import PrepareOptions, prepare

    photos = tmp_path / "photos"
    photos.mkdir()
    _photo_with_left_half_mask(photos, "a")
    rgba = Image.new("RGBA", (64, 64), (200, 30, 30, 0))
    rgba.paste((200, 30, 30, 255), (16, 16, 48, 48))  # an opaque square on transparency
    rgba.save(photos / "b.png")
    options = PrepareOptions(resolution=64, bucket_step=16, workers=1, alpha_mask=True)
    lines: list[str] = []
    result = prepare(photos, tmp_path / "data", options, log=lines.append)
    assert result.report["counts"]["found"] == 2 and result.report["counts"]["with_mask"] == 2  # .mask.png: no image
    rows = {r["source"]: r for r in map(json.loads, (tmp_path / "data" / "metadata.jsonl").read_text().splitlines())}
    with Image.open(tmp_path / "data" / rows["a.png"]["mask_file_name"]) as mask:
        mask = mask.convert("L")
        width = rows["a.png"]["width"]
        assert mask.size == (width, rows["a.png"]["height"])
        # the original's left half, after the same resize and centre crop as the image
        scale = width / 96 if 96 / 64 <= width / rows["a.png"]["height"] else rows["a.png"]["height"] / 64
        edge = round(48 * scale - rows["a.png"]["crop_left"])
        assert mask.getpixel((max(0, edge - 3), 5)) > 200 and mask.getpixel((min(width - 1, edge + 3), 5)) < 50
    with Image.open(tmp_path / "data" / rows["b.png"]["mask_file_name"]) as mask:
        assert mask.getpixel((32, 32)) == 255 and mask.getpixel((2, 2)) == 0  # the alpha channel
    assert any(line.startswith("Masks: 2 of 2 images") for line in lines)
    again = prepare(photos, tmp_path / "data", options, quiet=True, log=lambda _: None)
    assert again.report["counts"]["reused_from_previous_run"] == 2
    Image.new("L", (96, 64), 255).save(photos / "a.mask.png")  # an edited mask is fitted again
    third = prepare(photos, tmp_path / "data", options, quiet=True, log=lambda _: None)
    assert third.report["counts"]["reused_from_previous_run"] == 1
    recipe = make_recipe_dict(
        tiny_base, tmp_path / "data", tmp_path / "out", data={"masked_loss": True}, train={"max_steps": 1}
    )
    lines.clear()
    train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert any("data.masked_loss: 2 of 2 images weighted by their masks" in line for line in lines)


def test_a_mask_of_another_size_drops_its_photo_with_the_reason(tmp_path):
    from lorakit.prepare import PrepareOptions, prepare

    photos = tmp_path / "photos"
    photos.mkdir()
    _photo_with_left_half_mask(photos, "a")
    _photo_with_left_half_mask(photos, "b")
    Image.new("L", (10, 10)).save(photos / "b.mask.png")
    result = prepare(
        photos,
        tmp_path / "data",
        PrepareOptions(resolution=64, bucket_step=16, workers=1),
        quiet=True,
        log=lambda _: None,
    )
    assert result.kept == 1
    assert result.dropped["bad_mask"] == [{"file": "b.png", "detail": "b.mask.png is 10x10, the photo 96x64"}]


def test_masks_are_cached_with_the_latents_and_train_as_read(tiny_base, tiny_dataset, tmp_path):
    from lorakit.data import load_mask

    data = _masked_dataset(tiny_dataset, tmp_path)
    masked = {"masked_loss": True, "mask_background_weight": 0.0, "flip": True}  # mirrored masks too
    settings = {"max_steps": 3, "cache_latents": True}
    cached = make_recipe_dict(tiny_base, data, tmp_path / "a", data=masked, train=settings)
    result = train(recipe_from_dict(cached), quiet=True, log=lambda _: None)
    entries = [load_file(p) for p in (data / ".cache" / "latents").glob("*.safetensors")]
    with_mask = [e for e in entries if "mask" in e]
    assert len(with_mask) == 2 * 4 and len(entries) == 2 * 8  # 4 masked images of 8, both flips
    from lorakit.data import load_items

    vae = json.loads((tiny_base / "vae" / "config.json").read_text())["block_out_channels"]
    unet = json.loads((tiny_base / "unet" / "config.json").read_text())["block_out_channels"]
    scale = 2 ** (len(vae) - 1)  # pixels per latent
    items = [i for i in load_items(recipe_from_dict(cached).data, scale * 2 ** (len(unet) - 1)) if i.mask is not None]
    fitted = {load_mask(item, flip, scale).numpy().tobytes() for item in items for flip in (False, True)}
    assert {e["mask"].numpy().tobytes() for e in with_mask} == fitted  # on the latent grid, as fitted
    assert all(e["mask"].shape == (1, *e["mean"].shape[1:]) for e in with_mask)
    read = make_recipe_dict(tiny_base, data, tmp_path / "b", data=masked, train={**settings, "cache_latents": False})
    again = train(recipe_from_dict(read), quiet=True, log=lambda _: None)
    a, b = load_file(result.adapter), load_file(again.adapter)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # An edited mask is a new cache entry, not a stale one.
    first = sorted(p.name for p in (data / ".cache" / "latents").glob("*.safetensors"))
    mask_path = data / items[0].mask.relative_to(data)
    Image.new("L", Image.open(mask_path).size, 255).save(mask_path)
    train(
        recipe_from_dict(make_recipe_dict(tiny_base, data, tmp_path / "c", data=masked, train=settings)),
        quiet=True,
        log=lambda _: None,
    )
    assert len(sorted(p.name for p in (data / ".cache" / "latents").glob("*.safetensors"))) == len(first) + 2


def _photos(folder, count=3):
    folder.mkdir()
    for index in range(count):
        image = Image.new("RGB", (96, 64), (240, 240, 240))
        image.paste((200, 30, 30), (10 + 20 * index, 10, 40 + 20 * index, 50))
        image.save(folder / f"p{index}.png")
    return folder


def test_a_segmentation_model_masks_the_images_without_a_mask(tiny_base, tiny_segmenter, tmp_path):
    from lorakit.prepare import PrepareOptions, prepare
    from lorakit.prepare.masks import Segmenter

    photos = _photos(tmp_path / "photos")
    Image.new("L", (96, 64), 255).save(photos / "p0.mask.png")  # its own mask wins over the model's
    options = PrepareOptions(
        resolution=64, bucket_step=16, workers=1, mask_model=str(tiny_segmenter), mask_prompt="a red ball"
    )
    lines: list[str] = []
    result = prepare(photos, tmp_path / "data", options, quiet=True, log=lines.append)
    assert result.report["counts"]["with_mask"] == 3 and result.report["counts"]["no_subject_found"] == []
    assert any(
        line.startswith(f"Masks: 3 of 3 images (from .mask.png files and {tiny_segmenter} ('a red ball'))")
        for line in lines
    )
    rows = {r["source"]: r for r in map(json.loads, (tmp_path / "data" / "metadata.jsonl").read_text().splitlines())}
    segmenter = Segmenter(str(tiny_segmenter), "a red ball")
    for source in ("p1.png", "p2.png"):  # the model's mask of the image exactly as fitted into its bucket
        with Image.open(tmp_path / "data" / rows[source]["file_name"]) as image:
            want = segmenter(image)
        with Image.open(tmp_path / "data" / rows[source]["mask_file_name"]) as mask:
            assert mask.size == want.size and mask.tobytes() == want.tobytes()
    with Image.open(tmp_path / "data" / rows["p0.png"]["mask_file_name"]) as mask:
        assert mask.getextrema() == (255, 255)
    recipe = make_recipe_dict(
        tiny_base, tmp_path / "data", tmp_path / "out", data={"masked_loss": True}, train={"max_steps": 1}
    )
    lines.clear()
    train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert any("data.masked_loss: 3 of 3 images weighted by their masks" in line for line in lines)


def _blind_copy(tiny_segmenter, blind):
    """The tiny segmenter with its decoder's last layer set so that it finds nothing anywhere, saved to `blind`."""
    from transformers import CLIPSegForImageSegmentation

    model = CLIPSegForImageSegmentation.from_pretrained(tiny_segmenter)
    with torch.no_grad():
        model.decoder.transposed_convolution.weight.zero_()
        model.decoder.transposed_convolution.bias.fill_(-20.0)  # probability ~0 everywhere
    model.save_pretrained(blind)
    for name in (
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "processor_config.json",
    ):
        if (tiny_segmenter / name).exists():
            shutil.copy(tiny_segmenter / name, blind / name)
    return blind


def test_images_the_model_finds_nothing_in_are_counted_and_stay_unmasked(tiny_segmenter, tmp_path):
    from lorakit.prepare import PrepareOptions, prepare

    blind = _blind_copy(tiny_segmenter, tmp_path / "blind")
    photos = _photos(tmp_path / "photos", count=2)
    options = PrepareOptions(resolution=64, bucket_step=16, workers=1, mask_model=str(blind), mask_prompt="a dog")
    lines: list[str] = []
    result = prepare(photos, tmp_path / "data", options, quiet=True, log=lines.append)
    assert result.report["counts"]["with_mask"] == 0 and result.report["counts"]["without_mask"] == 2
    assert result.report["counts"]["no_subject_found"] == ["p0.png", "p1.png"]
    assert "  the mask model found no 'a dog' in 2 images (they train unmasked): p0.png, p1.png" in lines
    assert not (tmp_path / "data" / "masks").exists() or not any((tmp_path / "data" / "masks").iterdir())


def test_new_weights_in_the_same_mask_model_folder_mask_again(tiny_segmenter, tmp_path):
    from lorakit.prepare import PrepareOptions, prepare

    model = tmp_path / "segmenter"
    shutil.copytree(tiny_segmenter, model)
    photos = _photos(tmp_path / "photos", count=2)
    options = PrepareOptions(resolution=64, bucket_step=16, workers=1, mask_model=str(model), mask_prompt="a red ball")
    first = prepare(photos, tmp_path / "data", options, quiet=True, log=lambda _: None)
    assert first.report["counts"]["with_mask"] == 2
    again = prepare(photos, tmp_path / "data", options, quiet=True, log=lambda _: None)
    assert again.report["counts"]["with_mask"] == 2  # same weights: the masks are kept
    shutil.rmtree(model)
    _blind_copy(tiny_segmenter, model)  # retrained weights under the same name
    third = prepare(photos, tmp_path / "data", options, quiet=True, log=lambda _: None)
    counts = third.report["counts"]
    assert counts["with_mask"] == 0 and counts["no_subject_found"] == ["p0.png", "p1.png"]


def test_bad_mask_model_options_are_one_line_errors(tiny_captioner, tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    photos = _photos(tmp_path / "photos", count=1)
    cases = [
        (["--mask-model", str(tiny_captioner)], "--mask-prompt, the subject the model should find"),
        (
            ["--mask-model", str(tiny_captioner), "--mask-prompt", "a dog"],
            "is a blip model; lorakit segments with CLIPSeg",
        ),
        (["--mask-model", str(tmp_path / "nothing"), "--mask-prompt", "a dog"], "--mask-model: cannot load"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(app, ["prepare", str(photos), "--out", str(tmp_path / "data"), "-q", *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "data" / "metadata.jsonl").exists()

"""`lorakit prepare`: a messy folder becomes a clean dataset, and everything dropped is accounted for."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.errors import DatasetError
from lorakit.prepare import PrepareOptions, prepare

from .messy import build_messy_folder, textured

runner = CliRunner()
KEYS = {
    "file_name",
    "text",
    "width",
    "height",
    "original_width",
    "original_height",
    "crop_left",
    "crop_top",
    "source",
    "sha256",
}


def _digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy") / "photos"
    return root, build_messy_folder(root)


@pytest.fixture(scope="module")
def prepared(messy, tmp_path_factory):
    root, _ = messy
    before = _digest(root)
    out = tmp_path_factory.mktemp("prepared") / "dataset"
    lines = []
    result = prepare(
        root, out, PrepareOptions(trigger="ohwx person", resolution=256, workers=2), quiet=True, log=lines.append
    )
    assert _digest(root) == before  # the source folder is never modified
    rows = {json.loads(line)["source"]: json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()}
    return result, rows, lines


def test_every_case_is_kept_or_dropped_for_its_reason(prepared):
    result, rows, _ = prepared
    assert set(rows) == {
        "photo0.png",
        "photo1.png",
        "photo2.png",
        "photo3.png",
        "rotated.jpg",
        "cmyk.jpg",
        "rgba.png",
        "grey16.png",
        "grey.png",
        "palette.gif",
        "no_caption_here.png",
        "latin1.png",
        "other_ext.png",
    }
    dropped = {reason: [e["file"] for e in entries] for reason, entries in result.dropped.items()}
    assert dropped == {
        "truncated": ["truncated.jpg"],
        "empty_file": ["empty.jpg"],
        "unreadable": ["notanimage.png"],
        "duplicate": ["sub/copy_of_photo0.png"],
        "near_duplicate": ["sub/photo1_small.jpg"],
        "too_small": ["tiny.png"],
    }
    report = result.report
    assert report["counts"] == {
        "found": 19,
        "kept": 13,
        "dropped": 6,
        "reused_from_previous_run": 0,
        "other_files_ignored": 1,
        "foreign_images_left": 0,
    }
    assert "like photo1.png" in result.dropped["near_duplicate"][0]["detail"]


def test_metadata_has_exactly_the_contract_keys_and_real_files(prepared):
    result, rows, _ = prepared
    for row in rows.values():
        assert set(row) == KEYS
        path = result.out / row["file_name"]
        with Image.open(path) as image:
            assert image.size == (row["width"], row["height"]) and image.mode == "RGB"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]
        assert row["width"] % 64 == 0 and row["height"] % 64 == 0
    assert sorted(p.name for p in result.out.iterdir()) == [
        ".cache",
        "dataset.json",
        "images",
        "metadata.jsonl",
        "report.json",
    ]
    info = json.loads((result.out / "dataset.json").read_text())
    assert info["version"] == 1 and info["resolution"] == 256 and info["trigger"] == "ohwx person"
    assert [256, 256] in info["buckets"]


def test_exif_rotation_cmyk_alpha_16bit_and_palette_become_correct_rgb(prepared):
    result, rows, _ = prepared
    rotated = rows["rotated.jpg"]
    assert (rotated["original_width"], rotated["original_height"]) == (200, 300)  # portrait after EXIF
    assert rotated["height"] > rotated["width"]

    def pixels(source):
        with Image.open(result.out / rows[source]["file_name"]) as image:
            return np.asarray(image)

    assert pixels("rgba.png")[:, :100].min() >= 250  # the transparent half is the white background
    grey = pixels("grey16.png")
    assert 120 <= grey.mean() <= 135  # 16-bit mid-grey scaled, not clipped to white
    assert pixels("cmyk.jpg").shape[2] == 3 and pixels("palette.gif").shape[2] == 3


def test_captions_sources_trigger_and_normalisation(prepared):
    result, rows, _ = prepared
    assert rows["photo0.png"]["text"] == "ohwx person, red shirt, photo0"  # trimmed, deduplicated, trigger once
    assert rows["rotated.jpg"]["text"] == "ohwx person, rotated photo"  # trigger added at the front
    assert rows["no_caption_here.png"]["text"] == "ohwx person"  # trigger alone
    assert rows["other_ext.png"]["text"] == "ohwx person, a caption file"  # .caption sidecar
    assert rows["latin1.png"]["text"] == "ohwx person, café au lait"  # cp1252 fallback, trigger moved
    captions = result.report["captions"]
    assert captions["sources"] == {"sidecar": 7, "trigger_only": 6}
    assert captions["non_utf8_read_as_cp1252"] == [str(result.report["source"] + "/latin1.txt")]
    assert captions["length_unit"] == "words"
    assert result.report["trigger"] == {"word": "ohwx person", "present": 4, "added": 8, "moved": 1}


def test_summary_names_reasons_buckets_and_units(prepared):
    _, _, lines = prepared
    text = "\n".join(lines)
    assert text.startswith("Kept 13 of 19 images")
    assert "dropped 1 truncated (truncated or corrupt image data): truncated.jpg" in text
    assert "dropped 1 near_duplicate" in text and "Buckets: " in text
    assert "counted in words, not CLIP tokens" in text
    assert "1 caption files were not UTF-8 and were read as cp1252" in text


def test_hf_datasets_imagefolder_loads_it(prepared, tmp_path):
    import datasets

    result, rows, _ = prepared
    loaded = datasets.load_dataset("imagefolder", data_dir=str(result.out), split="train", cache_dir=str(tmp_path))
    assert len(loaded) == len(rows)
    assert set(loaded["text"]) == {row["text"] for row in rows.values()}


def test_rerun_reuses_unchanged_and_picks_up_changes(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for index in range(3):
        textured(256, 256, index).save(src / f"p{index}.png")
    out = tmp_path / "dataset"
    first = prepare(src, out, PrepareOptions(resolution=128, workers=1), quiet=True, log=lambda _: None)
    assert first.report["counts"]["reused_from_previous_run"] == 0
    old_files = {
        json.loads(line)["source"]: json.loads(line)["file_name"]
        for line in (out / "metadata.jsonl").read_text().splitlines()
    }
    textured(256, 256, 40).save(src / "p1.png")  # changed
    textured(256, 256, 41).save(src / "p3.png")  # new
    second = prepare(src, out, PrepareOptions(resolution=128, workers=1), quiet=True, log=lambda _: None)
    assert second.report["counts"]["reused_from_previous_run"] == 2 and second.kept == 4
    rows = {json.loads(line)["source"]: json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()}
    assert rows["p0.png"]["file_name"] == old_files["p0.png"]
    assert rows["p1.png"]["file_name"] != old_files["p1.png"]
    assert not (out / old_files["p1.png"]).exists()  # the stale image is gone
    assert len(list((out / "images").iterdir())) == 4


def test_decompression_bombs_are_caught_per_file(tmp_path, monkeypatch):
    src = tmp_path / "photos"
    src.mkdir()
    textured(64, 64, 1).save(src / "small.png")
    textured(400, 400, 2).save(src / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 * 2)
    result = prepare(src, tmp_path / "out", PrepareOptions(resolution=64, workers=1), quiet=True, log=lambda _: None)
    assert [e["file"] for e in result.dropped["decompression_bomb"]] == ["huge.png"] and result.kept == 1


def test_captioning_model_and_the_caption_command(tmp_path, tiny_captioner):
    src = tmp_path / "photos"
    src.mkdir()
    textured(128, 128, 1).save(src / "a.png")
    textured(128, 128, 2).save(src / "b.png")
    (src / "b.txt").write_text("written by hand")
    result = prepare(
        src,
        tmp_path / "out",
        PrepareOptions(resolution=64, trigger="sks", caption_model=str(tiny_captioner), workers=1),
        quiet=True,
        log=lambda _: None,
    )
    assert result.report["captions"]["sources"] == {"model": 1, "sidecar": 1}
    rows = {
        json.loads(line)["source"]: json.loads(line)
        for line in (result.out / "metadata.jsonl").read_text().splitlines()
    }
    printed = runner.invoke(
        app, ["caption", str(result.out / rows["a.png"]["file_name"]), "--caption-model", str(tiny_captioner)]
    )
    assert printed.exit_code == 0, printed.output
    assert printed.stdout.strip() and rows["a.png"]["text"] == f"sks, {printed.stdout.strip()}"


def test_tokenizer_counts_clip_tokens(tmp_path, tiny_base):
    src = tmp_path / "photos"
    src.mkdir()
    textured(128, 128, 1).save(src / "a.png")
    (src / "a.txt").write_text(", ".join(f"red toy {i} on a white background" for i in range(12)))
    lines = []
    result = prepare(
        src,
        tmp_path / "out",
        PrepareOptions(resolution=64, tokenizer=str(tiny_base), workers=1),
        quiet=True,
        log=lines.append,
    )
    assert result.report["captions"]["length_unit"] == "tokens" and result.report["captions"]["over_75"] == ["a.png"]
    assert any("captions are over 75 tokens" in line for line in lines)


def _fails(result, fragment):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and fragment in result.stderr, result.stderr


def test_bad_inputs_exit_2_and_write_nothing(messy, tmp_path):
    root, _ = messy
    _fails(runner.invoke(app, ["prepare", str(tmp_path / "nope")]), "source folder not found")
    (tmp_path / "file.txt").write_text("x")
    _fails(runner.invoke(app, ["prepare", str(tmp_path / "file.txt")]), "not a folder")
    _fails(runner.invoke(app, ["prepare", str(root), "--out", str(root / "dataset")]), "inside the source folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    _fails(runner.invoke(app, ["prepare", str(empty), "--out", str(tmp_path / "o1")]), "no images found")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    textured(16, 16, 0).save(tiny / "t.png")
    (tiny / "bad.jpg").write_bytes(b"")
    _fails(
        runner.invoke(app, ["prepare", str(tiny), "--out", str(tmp_path / "o2")]),
        "no usable images: 1 empty_file (zero-byte file); 1 too_small",
    )
    _fails(
        runner.invoke(app, ["prepare", str(root), "--out", str(tmp_path / "o3"), "--strict", "--resolution", "256"]),
        "--strict",
    )
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    _fails(runner.invoke(app, ["prepare", str(root), "--out", str(blocker / "ds")]), "cannot write under")
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


def test_train_reads_what_prepare_wrote(tmp_path, tiny_base, monkeypatch):
    import lorakit.train.setup as setup
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    loaded = []
    real_load_items = setup.load_items

    def recording(section, pixel_multiple):
        loaded.extend(real_load_items(section, pixel_multiple))
        return loaded

    monkeypatch.setattr(setup, "load_items", recording)

    src = tmp_path / "photos"
    src.mkdir()
    for index in range(4):
        textured(200, 130 + 20 * index, index).save(src / f"p{index}.jpg")
        (src / f"p{index}.txt").write_text("toy, red")
    prepare(
        src,
        tmp_path / "dataset",
        PrepareOptions(resolution=64, trigger="ohwx", max_upscale=1.0, workers=2, bucket_step=16),
        quiet=True,
        log=lambda _: None,
    )
    recipe = recipe_from_dict(
        {
            "model": {"base": str(tiny_base)},
            "data": {"folder": str(tmp_path / "dataset"), "resolution": 64},
            "lora": {"rank": 2},
            "train": {"max_steps": 2, "batch_size": 2, "optimizer": "adamw"},
            "output": {"folder": str(tmp_path / "out"), "name": "p"},
        }
    )
    result = train(recipe, quiet=True, log=lambda _: None)
    assert result.steps == 2 and result.adapter.is_file()
    # train trains each image in exactly the bucket prepare cut it for, with prepare's caption
    rows = [json.loads(line) for line in (tmp_path / "dataset" / "metadata.jsonl").read_text().splitlines()]
    expected = {
        (tmp_path / "dataset" / r["file_name"]).resolve(): ((r["width"], r["height"]), r["text"]) for r in rows
    }
    assert {item.path.resolve(): (item.bucket, item.caption) for item in loaded} == expected
    assert len({item.bucket for item in loaded}) > 1  # the photos' aspect ratios gave several buckets


def test_rerunning_with_a_new_trigger_recaptions_from_the_models_own_words(tmp_path, tiny_captioner):
    """The cached model caption is the model's text, not the caption after the trigger was placed."""
    src = tmp_path / "photos"
    src.mkdir()
    textured(128, 128, 1).save(src / "a.png")

    def run(trigger):
        options = PrepareOptions(resolution=64, trigger=trigger, caption_model=str(tiny_captioner), workers=1)
        result = prepare(src, tmp_path / "out", options, quiet=True, log=lambda _: None)
        return json.loads((result.out / "metadata.jsonl").read_text().splitlines()[0])["text"]

    first, second = run("sks"), run("ohwx")
    assert first.startswith("sks, ") and second == "ohwx, " + first[len("sks, ") :]


def test_entries_that_cannot_be_read_are_counted_not_fatal(tmp_path, monkeypatch):
    src = tmp_path / "photos"
    src.mkdir()
    textured(128, 128, 1).save(src / "good.png")
    textured(128, 128, 2).save(src / "locked.png")
    (src / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    real_read = Path.read_bytes

    def read_bytes(self):  # tests run as root, where chmod 000 does not stop a read: simulate the error
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    result = prepare(src, tmp_path / "out", PrepareOptions(resolution=64, workers=1), quiet=True, log=lambda _: None)
    dropped = {d["file"]: d["detail"] for d in result.report["dropped"]["read_error"]}
    assert set(dropped) == {"dangling.jpg", "locked.png"} and "Permission denied" in dropped["locked.png"]
    assert result.report["counts"]["kept"] == 1
    with pytest.raises(DatasetError, match="could not be read"):
        prepare(src, tmp_path / "out2", PrepareOptions(resolution=64, workers=1, strict=True), quiet=True)
    assert not (tmp_path / "out2").exists()


def test_a_tag_every_caption_shares_is_warned_about(tmp_path):
    from lorakit.prepare import PrepareOptions, prepare

    from .messy import textured

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        textured(96, 80, index).save(photos / f"p{index}.png")
        (photos / f"p{index}.txt").write_text(f"black background, pose {index}")
    lines: list[str] = []
    result = prepare(
        photos,
        tmp_path / "data",
        PrepareOptions(resolution=64, bucket_step=16, workers=1, trigger="ohwx"),
        log=lines.append,
    )
    assert result.report["captions"]["shared_by_every_caption"] == ["black background"]  # the trigger is not counted
    assert any("every caption has 'black background'" in line and "caption_dropout_tags" in line for line in lines)


def _kohya_photos(root: Path) -> Path:
    """kohya's layout: `N_words` folders; one photo with a caption file of its own, the others without."""
    for folder, seeds in (("10_ohwx man", (0, 1)), ("2_man", (2, 3, 4))):
        (root / folder).mkdir(parents=True)
        for seed in seeds:
            textured(96, 96, seed).save(root / folder / f"p{seed}.png")
    (root / "10_ohwx man" / "p1.txt").write_text("ohwx man, red shirt")
    return root


def test_kohya_folders_give_their_repeats_and_class_words(tmp_path):
    import datasets

    from lorakit.data import load_folder
    from lorakit.formats.metadata import _dataset_dirs, _tag_frequency

    src = _kohya_photos(tmp_path / "img")
    out = tmp_path / "dataset"
    lines: list[str] = []
    prepare(src, out, PrepareOptions(resolution=64, kohya_folders=True, workers=1), quiet=True, log=lines.append)
    rows = {r["source"]: r for r in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())}
    assert {s: (r["repeats"], r["kohya_folder"], r["text"]) for s, r in rows.items()} == {
        "10_ohwx man/p0.png": (10, "10_ohwx man", "ohwx man"),  # no caption file: the folder's words
        "10_ohwx man/p1.png": (10, "10_ohwx man", "ohwx man, red shirt"),  # its own caption wins
        "2_man/p2.png": (2, "2_man", "man"),
        "2_man/p3.png": (2, "2_man", "man"),
        "2_man/p4.png": (2, "2_man", "man"),
    }
    assert "kohya folders: 10_ohwx man (2 images x10), 2_man (3 images x2)" in lines
    assert "Captions: 4 from folder, 1 from sidecar" in lines
    # train reads the repeats (times data.num_repeats), and the adapter's metadata names kohya's folders
    items = load_folder(out, trigger="", repeats=3, buckets=[(64, 64)])
    assert sorted(item.repeats for item in items) == [6, 6, 6, 30, 30]
    assert _dataset_dirs(items) == {
        "10_ohwx man": {"n_repeats": 30, "img_count": 2},
        "2_man": {"n_repeats": 6, "img_count": 3},
    }
    assert _tag_frequency(items)["10_ohwx man"] == {"ohwx man": 2, "red shirt": 1}
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(loaded["repeats"]) == [2, 2, 2, 10, 10]


def test_without_the_flag_kohya_folders_are_only_pointed_out(tmp_path):
    src = _kohya_photos(tmp_path / "img")
    out = tmp_path / "dataset"
    lines: list[str] = []
    prepare(src, out, PrepareOptions(resolution=64, workers=1), quiet=True, log=lines.append)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert all("repeats" not in row for row in rows)
    assert any(
        line.startswith("  hint: the subfolders look like kohya's N_name layout (10_ohwx man, 2_man)")
        for line in lines
    )
    # a folder outside the layout (a year is not a repeat count) is not taken for one
    (src / "2023_holiday").mkdir()
    textured(96, 96, 9).save(src / "2023_holiday" / "p9.png")
    lines.clear()
    prepare(src, out, PrepareOptions(resolution=64, kohya_folders=True, workers=1), quiet=True, log=lines.append)
    assert any(line.endswith("; 1 image outside them train once per epoch") for line in lines)


def test_a_bad_repeats_value_names_its_line(tmp_path):
    from lorakit.data import load_folder

    src = _kohya_photos(tmp_path / "img")
    out = tmp_path / "dataset"
    prepare(src, out, PrepareOptions(resolution=64, kohya_folders=True, workers=1), quiet=True, log=lambda _: None)
    rows = (out / "metadata.jsonl").read_text().splitlines()
    rows[1] = rows[1].replace('"repeats": 10', '"repeats": 0')
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(
        DatasetError, match=r'metadata.jsonl:2: "repeats" must be a whole number from 1 to 10000, got 0'
    ):
        load_folder(out, trigger="", repeats=1, buckets=[(64, 64)])


def _captions_after_prepare(src: Path, out: Path, *options: str) -> tuple[dict[str, str], str]:
    """`lorakit prepare SRC --out OUT` at 64 px with one worker and `options`: each photo's caption by its source
    path, and what the command printed."""
    from .invoke import ok

    args = ["prepare", str(src), "--out", str(out), "--resolution", "64", "--workers", "1", "--quiet", *options]
    said = ok(args).stdout
    rows = map(json.loads, (out / "metadata.jsonl").read_text().splitlines())
    return {row["source"]: row["text"] for row in rows}, said


def test_class_tokens_caption_the_images_without_a_caption_file(tmp_path):
    from .invoke import fails

    src = _kohya_photos(tmp_path / "img")
    out = tmp_path / "dataset"
    rows, said = _captions_after_prepare(src, out, "--class-tokens", "ohwx  man", "--trigger", "sks")
    assert rows == {
        "10_ohwx man/p0.png": "sks, ohwx man",  # kohya's class_tokens, the trigger in front as everywhere
        "10_ohwx man/p1.png": "sks, ohwx man, red shirt",  # its own caption file wins
        "2_man/p2.png": "sks, ohwx man",
        "2_man/p3.png": "sks, ohwx man",
        "2_man/p4.png": "sks, ohwx man",
    }
    assert "Captions: 4 from class_tokens, 1 from sidecar" in said
    # with --kohya-folders the folder's words come first, as kohya's subset folders give theirs
    rows, _ = _captions_after_prepare(src, out, "--class-tokens", "person", "--kohya-folders")
    assert rows["2_man/p2.png"] == "man"
    # two sources for the same images are refused before anything is read
    other = tmp_path / "other"
    fails(
        ["prepare", str(src), "--out", str(other), "--class-tokens", "man", "--caption-from-filename"],
        "--class-tokens and --caption-from-filename both caption the images without a caption file; pass one",
    )
    assert not other.exists()


def test_caption_files_of_several_lines_join_give_their_first_or_become_choices(tmp_path):
    from lorakit.data import pick_wildcards

    from .invoke import fails

    src = tmp_path / "photos"
    src.mkdir()
    textured(96, 96, 0).save(src / "a.png")
    (src / "a.txt").write_text("red shirt, smiling\n\nblue shirt\n")
    out = tmp_path / "dataset"

    def caption(mode):
        return _captions_after_prepare(src, out, "--trigger", "ohwx", "--caption-lines", mode)[0]["a.png"]

    assert caption("join") == "ohwx, red shirt, smiling, blue shirt"  # lorakit's default: every line's tags
    assert caption("first") == "ohwx, red shirt, smiling"  # as kohya reads it
    choices = caption("choices")  # as kohya's enable_wildcard: one line per step, each with the trigger
    assert choices == "{ohwx, red shirt, smiling|ohwx, blue shirt}"
    assert pick_wildcards(choices, None) == "ohwx, red shirt, smiling"
    fails(
        ["prepare", str(src), "--out", str(tmp_path / "x"), "--caption-lines", "all"],
        "--caption-lines: 'all'; use join, first, choices",
    )


def test_avif_and_jfif_photos_are_read_and_heic_photos_without_pillow_heif_are_counted_and_named(
    tmp_path, monkeypatch
):
    import sys

    from .invoke import fails

    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # not installed
    src = tmp_path / "photos"
    src.mkdir()
    textured(96, 96, 0).save(src / "a.avif", format="AVIF")
    textured(96, 96, 1).save(src / "b.jfif", format="JPEG")
    (src / "c.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")  # an iPhone photo Pillow cannot open
    rows, said = _captions_after_prepare(src, tmp_path / "dataset", "--trigger", "ohwx")
    assert sorted(rows) == ["a.avif", "b.jfif"]
    assert "skipped 1 HEIC/HEIF photos, which Pillow cannot read without the pillow-heif package: `pip install" in said
    report = json.loads((tmp_path / "dataset" / "report.json").read_text())
    assert report["counts"]["heif_photos_not_read"] == 1
    only = tmp_path / "iphone"
    only.mkdir()
    (only / "d.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    fails(["prepare", str(only), "--out", str(tmp_path / "x")], "no images found (looked for")
    fails(["prepare", str(only), "--out", str(tmp_path / "x")], "1 HEIC/HEIF photos, which Pillow cannot read")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_iphone_heic_photos_are_read_upright_with_pillow_heif(tmp_path, workers):
    """An iPhone photo held sideways: stored landscape with the rotation in the file, shown portrait. With pillow-heif
    installed, `prepare` reads it as it is shown, as it reads a JPEG with the same EXIF orientation."""
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    src = tmp_path / "photos"
    src.mkdir()
    photo = textured(96, 64, 3)
    photo.paste((0, 0, 255), (0, 0, 48, 64))  # the left half blue: after the rotation, the top half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    photo.save(src / "IMG_0001.HEIC", exif=exif.tobytes(), quality=95)
    photo.save(src / "IMG_0002.jpg", exif=exif.tobytes(), quality=95)
    out = tmp_path / "dataset"
    args = [
        "prepare",
        str(src),
        "--out",
        str(out),
        "--resolution",
        "64",
        "--workers",
        workers,
        "--quiet",
        "--keep-duplicates",
    ]
    said = runner.invoke(app, [*args, "--trigger", "ohwx"])
    assert said.exit_code == 0, said.output
    rows = {json.loads(r)["source"]: json.loads(r) for r in (out / "metadata.jsonl").read_text().splitlines()}
    assert set(rows) == {"IMG_0001.HEIC", "IMG_0002.jpg"} and "HEIC" not in said.output
    heic, jpeg = (
        np.asarray(Image.open(out / rows[n]["file_name"]).convert("RGB"), dtype=np.int16) for n in sorted(rows)
    )
    shown = (rows["IMG_0001.HEIC"]["original_width"], rows["IMG_0001.HEIC"]["original_height"])
    assert shown == (64, 96)  # portrait, as shown
    assert heic[: heic.shape[0] // 3, :, 2].mean() > 200 and heic[-heic.shape[0] // 3 :, :, 2].mean() < 200
    assert np.abs(heic - jpeg).mean() < 8  # the same picture as the JPEG, up to the two codecs' losses


@pytest.mark.parametrize("form", [".json", ".jsonl"])
def test_kohya_metadata_captions_the_images_it_lists_and_drops_the_others(tmp_path, form):
    """kohya's fine-tuning metadata: keys absolute or relative to the folder, with or without the extension; the
    caption then the tags; over a caption file; images it does not list are dropped and counted, as kohya trains only
    those it lists, and entries without an image are counted."""
    from .invoke import fails

    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    for name, seed in (("a.png", 0), ("sub/b.jpg", 1), ("c.png", 2), ("d.png", 3)):
        textured(96, 96, seed).save(src / name)
    (src / "a.txt").write_text("from the caption file")
    entries = {
        str(src / "a.png"): {"caption": "a man in a red shirt", "tags": "1boy, red shirt"},
        "sub/b": {"tags": "1boy, smile"},
        "c.png": {"caption": "a man at the beach"},
        "gone.png": {"caption": "no such image"},
    }
    metadata = tmp_path / f"meta_cap{form}"
    if form == ".json":
        metadata.write_text(json.dumps(entries))
    else:
        metadata.write_text("".join(json.dumps({"image_path": k, **v}) + "\n" for k, v in entries.items()))
    rows, said = _captions_after_prepare(src, tmp_path / "dataset", "--kohya-metadata", str(metadata))
    assert rows == {
        "a.png": "a man in a red shirt, 1boy, red shirt",
        "sub/b.jpg": "1boy, smile",
        "c.png": "a man at the beach",
    }
    assert "dropped 1 not_in_metadata (not listed in --kohya-metadata" in said and "d.png" in said
    assert "1 entries of --kohya-metadata name no image under" in said
    assert "Captions: 3 from metadata" in said
    report = json.loads((tmp_path / "dataset" / "report.json").read_text())
    assert report["dropped"]["not_in_metadata"] == [{"file": "d.png", "detail": ""}]
    (tmp_path / "bad.json").write_text("[1, 2]")
    fails(
        ["prepare", str(src), "--out", str(tmp_path / "x"), "--kohya-metadata", str(tmp_path / "bad.json")],
        "bad.json: not kohya's metadata (a .json table of image -> caption and tags",
    )
    assert not (tmp_path / "x").exists()


def test_caption_suffix_ends_every_caption_that_lacks_it(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for index in range(3):
        textured(96, 96, index).save(src / f"p{index}.png")
    (src / "p0.txt").write_text("a man, smiling")
    (src / "p1.txt").write_text("a man, film grain, smiling")
    (src / "p2.txt").write_text("a man on a beach\na man in a park")
    rows, _ = _captions_after_prepare(
        src,
        tmp_path / "dataset",
        "--trigger",
        "ohwx",
        "--caption-suffix",
        "film grain, photo",
        "--caption-lines",
        "choices",
    )
    assert rows == {
        "p0.png": "ohwx, a man, smiling, film grain, photo",
        "p1.png": "ohwx, a man, film grain, smiling, photo",
        "p2.png": "{ohwx, a man on a beach, film grain, photo|ohwx, a man in a park, film grain, photo}",
    }


def test_resize_filter_scales_with_the_chosen_filter_and_reprocesses_on_a_change(tmp_path):
    from .invoke import fails

    src = tmp_path / "photos"
    src.mkdir()
    textured(300, 300, 5).save(src / "p.png")  # scaled down to the 64 px bucket
    out = tmp_path / "dataset"
    base = ["prepare", str(src), "--out", str(out), "--resolution", "64", "--workers", "1", "--quiet"]

    def drawn():
        row = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
        return np.asarray(Image.open(out / row["file_name"]).convert("RGB"), dtype=np.int16)

    assert runner.invoke(app, base).exit_code == 0
    lanczos = drawn()
    said = runner.invoke(app, [*base, "--resize-filter", "nearest"])
    assert said.exit_code == 0, said.output
    nearest = drawn()
    expected = np.asarray(Image.open(src / "p.png").convert("RGB").resize((64, 64), Image.Resampling.NEAREST))
    assert np.array_equal(nearest, expected.astype(np.int16)) and not np.array_equal(nearest, lanczos)
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["reused_from_previous_run"] == 0  # another filter: scaled again, not reused
    fails([*base, "--resize-filter", "sinc"], "--resize-filter: 'sinc'; use lanczos, bicubic")


def test_a_run_at_another_resolution_rewrites_the_images_it_lists(tmp_path):
    """Prepared again at another resolution into the same folder, every listed image is the one its row describes
    (size and sha256), and the earlier run's images are gone. (Before, an image named after its photo was kept
    from the earlier run, at the earlier size, while its row named the new one.)"""
    src = tmp_path / "photos"
    src.mkdir()
    textured(300, 200, 6).save(src / "p.png")
    out = tmp_path / "dataset"
    for side in ("64", "128", "64"):
        args = ["prepare", str(src), "--out", str(out), "--resolution", side, "--workers", "1", "--quiet"]
        assert runner.invoke(app, args).exit_code == 0
        row = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
        image = out / row["file_name"]
        with Image.open(image) as opened:
            assert opened.size == (row["width"], row["height"]) and max(opened.size) <= int(side) * 2
        assert hashlib.sha256(image.read_bytes()).hexdigest() == row["sha256"]
        assert sorted(p.name for p in (out / "images").iterdir()) == [image.name]

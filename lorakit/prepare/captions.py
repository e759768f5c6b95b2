"""Captions: sidecar files, an optional image-to-text model, file names; tag normalisation and the trigger."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import DatasetError, LorakitError, first_line
from ..files import CAPTION_MAX_CHARS
from ..trigger import contains_trigger

FALLBACK_ENCODING = "cp1252"


def read_sidecar(image: Path, extensions: tuple[str, ...]) -> tuple[str | None, Path | None, bool]:
    """(text, file, was_utf8) of the first caption file beside `image` with one of `extensions`.

    A file that is not UTF-8 is decoded as cp1252 (Windows' Western default; never fails on
    common text), and the caller counts it.
    """
    for extension in extensions:
        sidecar = image.with_suffix(extension)
        if sidecar.is_file():  # regular files only: a FIFO named like a caption would block the read
            if sidecar.stat().st_size > CAPTION_MAX_CHARS * 4:  # not read whole: 4 bytes per character at most
                raise DatasetError(
                    f"{sidecar}: {sidecar.stat().st_size:,} bytes; a caption has at most {CAPTION_MAX_CHARS:,} "
                    "characters (the text encoder reads about the first 300); shorten it"
                )
            raw = sidecar.read_bytes()
            try:
                text, utf8 = raw.decode("utf-8-sig"), True
            except UnicodeDecodeError:
                text, utf8 = raw.decode(FALLBACK_ENCODING, errors="replace"), False
            if len(text) > CAPTION_MAX_CHARS:
                raise DatasetError(
                    f"{sidecar}: the caption is {len(text):,} characters; at most {CAPTION_MAX_CHARS:,} are allowed "
                    "(the text encoder reads about the first 300); shorten it"
                )
            return text, sidecar, utf8
    return None, None, True


KOHYA_FOLDER = re.compile(r"(\d+)_(.*\S.*)")
KOHYA_REPEATS_MAX = 1_000  # more is a year (2023_holiday) or a counter in a folder name, not a repeat count


def read_kohya_metadata(path: Path, src: Path) -> dict[str, str]:
    """kohya's fine-tuning metadata (`metadata_file` / `in_json`): a .json table of image -> {"caption", "tags"}, or a
    .jsonl file of {"image_path", "caption", "tags"} lines. Each image's caption, kohya's way (the caption, then the
    tags), by its path without the extension (an image key is absolute or relative to `src`, with or without its
    extension). DatasetError, naming the file, for one that cannot be read as such."""
    import json

    from ..files import HEIF_SUFFIXES, IMAGE_SUFFIXES

    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            table = {row["image_path"]: row for row in rows}
        else:
            table = json.loads(text)
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ValueError("not a table of images, each with its caption and tags")
    except FileNotFoundError:
        raise DatasetError(f"--kohya-metadata {path}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(
            f"--kohya-metadata {path}: not kohya's metadata (a .json table of image -> caption and tags, or .jsonl "
            f"lines with image_path): {first_line(err) or type(err).__name__}"
        ) from None
    captions = {}
    for key, entry in table.items():
        image = Path(str(key)).expanduser()
        image = image if image.is_absolute() else src / image
        if image.suffix.lower() in (*IMAGE_SUFFIXES, *HEIF_SUFFIXES):
            image = image.with_suffix("")
        caption, tags = str(entry.get("caption") or "").strip(), str(entry.get("tags") or "").strip()
        captions[str(image.resolve())] = ", ".join(part for part in (caption, tags) if part)
    return captions


def kohya_folder(source: str) -> tuple[str, int, str] | None:
    """(folder name, repeats, class words) of the kohya `N_words` folder that an image's path (relative to the
    photo folder) starts in, e.g. `10_ohwx man/a.png` -> ("10_ohwx man", 10, "ohwx man"); None elsewhere."""
    parts = Path(source).parts
    match = KOHYA_FOLDER.fullmatch(parts[0]) if len(parts) > 1 else None
    if match is None or not 1 <= int(match[1]) <= KOHYA_REPEATS_MAX:
        return None
    return parts[0], int(match[1]), " ".join(match[2].split())


def caption_from_filename(image: Path) -> str:
    """A caption from a file name: separators become spaces, trailing counters like `_01` or ` (2)` go."""
    stem = re.sub(r"[\s_\-.]*(\(\d+\)|\d+)$", "", image.stem)
    return " ".join(re.split(r"[_\-.\s]+", stem)).strip()


def normalise_tags(text: str) -> list[str]:
    """Comma-separated tags, trimmed, inner whitespace collapsed, empty and repeated tags dropped."""
    seen, tags = set(), []
    for raw in text.replace("\n", ",").split(","):
        tag = " ".join(raw.split())
        if tag and tag.lower() not in seen:
            seen.add(tag.lower())
            tags.append(tag)
    return tags


def place_trigger(tags: list[str], trigger: str) -> tuple[list[str], str]:
    """The tags with the trigger once, at the front; and how it got there (`added`, `moved`, `present`, `none`).

    A tag equal to the trigger is moved to the front; a trigger inside a longer tag as whole words ("photo
    of ohwx person") counts as present and is left where it is (the rule of `lorakit.trigger`).
    """
    if not trigger:
        return tags, "none"
    others = [t for t in tags if t.lower() != trigger.lower()]
    if len(others) < len(tags):
        return [trigger, *others], "present" if tags[0].lower() == trigger.lower() else "moved"
    if any(contains_trigger(t, trigger) for t in tags):
        return tags, "present"
    return [trigger, *tags], "added"


class Captioner:
    """An image-to-text model from transformers (e.g. Salesforce/blip-image-captioning-base), hub id or path."""

    def __init__(self, model: str, device: str | None = None):
        # Lazy: `prepare` runs without torch unless a captioning model is asked for.
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        local = Path(model).expanduser()
        source = str(local) if local.exists() else model
        try:
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForImageTextToText.from_pretrained(source).eval()
        except (OSError, ValueError) as err:
            raise LorakitError(
                f"--caption-model: cannot load {model!r}: {first_line(err)}; give an image-to-text model "
                "folder or hub id such as Salesforce/blip-image-captioning-base"
            ) from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    def __call__(self, image: Any, max_new_tokens: int = 40) -> str:
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
        return self.processor.batch_decode(output, skip_special_tokens=True)[0].strip()

"""Training data from a dataset folder: items, bucket batches, caption handling and the latent cache.

Every random choice here (data order, tag shuffle, caption dropout, flips) is a pure function of
the run's seed and a position (epoch or micro-step), so a run is reproducible and a resumed run
makes exactly the choices the uninterrupted one would have made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from .buckets import fit_to_bucket, make_buckets, nearest_bucket
from .errors import DatasetError
from .files import CAPTION_MAX_CHARS, IMAGE_SUFFIXES, atomic_write, crash_point, photo_stem
from .trigger import contains_trigger, with_trigger

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .recipe import DataSection

METADATA = "metadata.jsonl"
METADATA_MAX_BYTES = 64 << 20  # a metadata.jsonl line per image: 64 MiB is ~100,000 images
IMAGE_MAX_BYTES = 256 << 20  # a 4096-px PNG is ~50 MB; a larger file is not a training photo
PIXELS = "lanczos-centre-crop-v1"  # how load_pixels turns a file into a bucket's pixels; part of every cache key


@dataclass(frozen=True)
class Item:
    """One training image: its file, caption, content hash and the bucket it trains in."""

    path: Path
    caption: str
    sha256: str
    size: tuple[int, int]  # (width, height) on disk
    bucket: tuple[int, int]  # (width, height) it is trained at
    repeats: int = 1  # appearances per epoch
    loss_weight: float = 1.0  # prior-preservation class images use prior_loss_weight
    folder: str = ""  # the dataset (or class) folder it came from
    group: str = ""  # the kohya `N_words` folder prepare --kohya-folders found it in (names it in ss_* metadata)
    original_size: tuple[int, int] | None = None  # (width, height) of the photo prepare cut it from
    crop: tuple[int, int] | None = None  # (left, top) of that cut in the photo resized to cover the bucket
    mask: Path | None = None  # masked loss: a greyscale image of the same size, white where the subject is
    mask_sha256: str = ""
    fixed_tags: tuple[int, int] | None = None  # data.keep_tokens_separator: tags kept at the front and at the end
    strength: float = 1.0  # data.adapter_strength: the adapter's strength while it trains on this image
    # data.random_crop: where this step's crop sits in the margin around the bucket, as shares of it (0: left or
    # top, 1: right or bottom); None: the centre
    place: tuple[float, float] | None = None


def _read_metadata(folder: Path) -> list[tuple[int, dict]]:
    metadata = folder / METADATA
    if not metadata.is_file():
        raise DatasetError(f"{folder}: no {METADATA}; create the dataset with `lorakit prepare PHOTOS --out {folder}`")
    rows = []
    text = read_regular_file(metadata, folder, limit=METADATA_MAX_BYTES).decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{metadata}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DatasetError(f'{metadata}:{number}: needs a "file_name" string and a "text" caption')
        if not isinstance(row.get("text", ""), str):
            raise DatasetError(f'{metadata}:{number}: "text" must be a string, got {str(row["text"])[:40]!r}')
        if len(row.get("text", "")) > CAPTION_MAX_CHARS:
            raise DatasetError(
                f"{metadata}:{number}: the caption is {len(row['text']):,} characters; at most {CAPTION_MAX_CHARS:,} "
                "are allowed (the text encoder reads about the first 300); shorten it"
            )
        rows.append((number, row))
    return rows


def read_regular_file(path: Path, listed_in: Path, limit: int = IMAGE_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; a FIFO, device or folder is refused before it is
    opened (opening a FIFO would wait forever for a writer)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: listed in {listed_in} but missing") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror}); listed in {listed_in}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DatasetError(
            f"{path}: not a regular file (a folder, FIFO or device); listed in {listed_in}, which may name only "
            "image files"
        )
    if info.st_size > limit:
        raise DatasetError(f"{path}: {info.st_size:,} bytes, over the {limit:,}-byte limit for one image")
    with open(path, "rb") as f:
        return f.read(limit + 1)[:limit]


def _image_facts(path: Path, listed_in: Path) -> tuple[str, tuple[int, int]]:
    """(sha256 of the bytes read, (width, height)) of an image file, checked to decode."""
    data = read_regular_file(path, listed_in)
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(
            f"{path}: not a readable image ({err}); re-run `lorakit prepare` or remove it from {listed_in}"
        ) from None
    return hashlib.sha256(data).hexdigest(), size


def _dataset_path(folder: Path, name: str, where: str) -> Path:
    """`folder / name`, refused unless it stays inside `folder` (no absolute paths, no `..`, no link out)."""
    relative = Path(name)
    path = folder / relative
    try:
        outside = "\0" in name or relative.is_absolute() or ".." in relative.parts
        outside = outside or not path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a link loop or a name the file system refuses
        outside = True
    if outside:
        raise DatasetError(
            f"{where}: file_name {name[:80]!r} points outside the dataset folder {folder}; file names are paths "
            "relative to it, such as images/0001.png"
        )
    return path


def bucket_list(resolution: int, pixel_multiple: int) -> list[tuple[int, int]]:
    buckets = make_buckets(resolution, pixel_multiple)
    if not buckets:
        raise DatasetError(f"data.resolution: {resolution} is too small for this model; use at least {pixel_multiple}")
    return buckets


def load_folder(
    folder: Path, *, trigger: str, repeats: int, buckets: list[tuple[int, int]], separator: str = ""
) -> list[Item]:
    """The items of one dataset folder (its `metadata.jsonl`), with the trigger word put in place and the caption's
    fixed parts (`separator`, data.keep_tokens_separator) noted."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(
            f"data.folder: {folder} is not a folder; run `lorakit prepare PHOTOS --out {folder}` "
            "or set data.folder to your dataset"
        )
    items = []
    for number, row in _read_metadata(folder):
        path = _dataset_path(folder, row["file_name"], f"{folder / METADATA}:{number}")
        sha, size = _image_facts(path, folder / METADATA)  # the bytes read, never the sha256 a row claims
        caption, fixed = split_fixed_tags(with_trigger(row.get("text", ""), trigger), separator)
        bucket = nearest_bucket(*size, buckets)
        original, crop = _prepared_cut(row)
        mask, mask_sha = _mask_of(folder, row, number, size)
        items.append(
            Item(
                path,
                caption,
                sha,
                size,
                bucket,
                repeats * _row_repeats(row, f"{folder / METADATA}:{number}"),
                folder=str(folder),
                group=row.get("kohya_folder") if isinstance(row.get("kohya_folder"), str) else "",
                original_size=original,
                crop=crop,
                mask=mask,
                mask_sha256=mask_sha,
                fixed_tags=fixed,
            )
        )
    if not items:
        raise DatasetError(f"data.folder: {folder / METADATA} lists no images; add photos with `lorakit prepare`")
    return items


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def split_fixed_tags(caption: str, separator: str) -> tuple[str, tuple[int, int] | None]:
    """kohya's keep_tokens_separator: `head SEP middle [SEP tail]` becomes the plain tag list, with how many tags
    stay fixed at its front (head) and end (tail); None when the caption has no separator."""
    if not separator or separator not in caption:
        return caption, None
    head, rest = caption.split(separator, 1)
    middle, _, tail = rest.partition(separator)
    head_tags, middle_tags, tail_tags = _tags(head), _tags(middle), _tags(tail.replace(separator, ","))
    return ", ".join(head_tags + middle_tags + tail_tags), (len(head_tags), len(tail_tags))


ROW_REPEATS_MAX = 10_000


def _row_repeats(row: dict, where: str) -> int:
    """A row's own `repeats` (prepare --kohya-folders writes it), which multiplies data.num_repeats; 1 without."""
    value = row.get("repeats", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ROW_REPEATS_MAX:
        raise DatasetError(f'{where}: "repeats" must be a whole number from 1 to {ROW_REPEATS_MAX}, got {value!r}')
    return value


def _mask_of(folder: Path, row: dict, number: int, size: tuple[int, int]) -> tuple[Path | None, str]:
    """The row's `mask_file_name` (confined to the dataset like images, checked to decode at the image's size)."""
    name = row.get("mask_file_name")
    if name is None:
        return None, ""
    where = f"{folder / METADATA}:{number}"
    if not isinstance(name, str):
        raise DatasetError(f'{where}: "mask_file_name" must be a string, got {str(name)[:40]!r}')
    path = _dataset_path(folder, name, where)
    sha, mask_size = _image_facts(path, folder / METADATA)
    if mask_size != size:
        raise DatasetError(
            f"{path}: the mask is {mask_size[0]}x{mask_size[1]} but its image is {size[0]}x{size[1]}; a mask has "
            "its image's size"
        )
    return path, sha


def _prepared_cut(row: dict) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(original size, crop) a prepare-written metadata row records, or (None, None)."""
    keys = ("original_width", "original_height", "crop_left", "crop_top")
    if not all(isinstance(row.get(k), int) and not isinstance(row.get(k), bool) for k in keys):
        return None, None
    return (row["original_width"], row["original_height"]), (row["crop_left"], row["crop_top"])


def dataset_folders(section: DataSection) -> list[tuple[str, int]]:
    """(folder, num_repeats) pairs of the data section: one folder, or several with their own repeats."""
    folders = [section.folder] if isinstance(section.folder, str) else list(section.folder)
    repeats = section.num_repeats if isinstance(section.num_repeats, list) else [section.num_repeats] * len(folders)
    return list(zip(folders, repeats, strict=True))


def load_items(section: DataSection, pixel_multiple: int) -> list[Item]:
    """Read and check every dataset folder of `section`; assign each image its bucket.

    Raises DatasetError naming the folder, line or file for anything missing or unreadable.
    """
    buckets = bucket_list(section.resolution, pixel_multiple)
    items = []
    for (folder, repeats), strength in zip(dataset_folders(section), section.strengths, strict=True):
        read = load_folder(
            Path(folder),
            trigger=section.trigger,
            repeats=repeats,
            buckets=buckets,
            separator=section.keep_tokens_separator,
        )
        items += [dataclasses.replace(item, strength=strength) for item in read] if strength != 1 else read
    return items


def at_resolutions(items: list[Item], resolutions: list[int], pixel_multiple: int) -> list[Item]:
    """`items`, then the same images again at each of `resolutions` (data.extra_resolutions), each in that
    resolution's nearest bucket."""
    copies = list(items)
    for resolution in resolutions:
        buckets = bucket_list(resolution, pixel_multiple)
        copies += [dataclasses.replace(item, bucket=nearest_bucket(*item.size, buckets)) for item in items]
    return copies


def split_held_out(items: list[Item], share: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(training items, held-out items): `share` of the images (at least one) drawn by `seed`, so the same ones are
    held out on every run; refused when none would be left to train on."""
    count = max(1, round(share * len(items)))
    if count >= len(items):
        raise DatasetError(
            f"validation.split: {share:g} of {len(items)} images holds out {count}, leaving none to train on; "
            "lower it or add images"
        )
    chosen = set(random.Random(f"{seed}:validation-split").sample(range(len(items)), count))
    return [i for n, i in enumerate(items) if n not in chosen], [i for n, i in enumerate(items) if n in chosen]


def load_class_items(
    folder: Path,
    *,
    prompt: str | list[str],
    count: int,
    weight: float,
    buckets: list[tuple[int, int]],
    instance_samples: int,
) -> list[Item]:
    """Prior-preservation class images: the first `count` images of `folder`, captioned by their .txt or `prompt`.

    Their repeats are set so that an epoch holds about as many class samples as instance samples.
    """
    folder = Path(folder).expanduser()
    paths = (
        sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        if folder.is_dir()
        else []
    )
    if len(paths) < count:
        raise DatasetError(
            f"prior.class_dir: {folder} holds {len(paths)} images but prior.num_class_images is "
            f"{count}; add class images (photos of the class, e.g. other people for a person) "
            "or lower num_class_images"
        )
    repeats = max(1, round(instance_samples / count))
    items = []
    for path in paths[:count]:
        sha, size = _image_facts(path, folder)
        sidecar = path.with_suffix(".txt")
        if sidecar.exists():
            prompt_for_image = read_regular_file(sidecar, folder, limit=CAPTION_MAX_CHARS * 4).decode(
                "utf-8", errors="replace"
            )
            prompt_for_image = prompt_for_image.strip()[:CAPTION_MAX_CHARS]
        elif isinstance(prompt, str):
            prompt_for_image = prompt
        else:
            raise DatasetError(
                f"{path}: a class image without a .txt caption; with a list of class prompts each "
                "class image needs its own caption file"
            )
        items.append(
            Item(
                path,
                prompt_for_image,
                sha,
                size,
                nearest_bucket(*size, buckets),
                repeats,
                weight,
                str(folder),
            )
        )
    return items


def dataset_fingerprint(items: list[Item]) -> str:
    """A hash of everything about the items that training depends on: image bytes, captions, buckets, repeats
    and loss weights, in order. A checkpoint records it; a resume with another value is refused."""
    digest = hashlib.sha256()
    for item in items:
        facts = [item.sha256, item.caption, list(item.bucket), item.repeats, item.loss_weight, item.mask_sha256]
        facts += [item.strength] if item.strength != 1 else []  # as before for runs that do not set one
        digest.update(json.dumps(facts).encode() + b"\n")
    return digest.hexdigest()


def pair_items(items: list[Item], folders: list[str]) -> dict[int, int]:
    """`data.pairs`: the index of each image of the first folder's namesake in the second (by the photo names
    prepare kept), at the same resolution. Every image must have exactly one, in the same bucket."""
    first, second = (str(Path(folder).expanduser()) for folder in folders)
    found: dict[str, dict[tuple[str, int], int]] = {first: {}, second: {}}
    for index, item in enumerate(items):
        side = found[item.folder]
        key = (photo_stem(item.path), item.bucket[0] * item.bucket[1])  # extra resolutions: one copy per area
        if key in side:
            raise DatasetError(
                f"data.pairs: {items[side[key]].path.name} and {item.path.name} in {item.folder} come from photos of "
                "the same name, so neither has one namesake in the other folder; rename one"
            )
        side[key] = index
    partners = {}
    for key, index in found[first].items():
        other = found[second].pop(key, None)
        if other is None:
            raise DatasetError(
                f"data.pairs: {items[index].path.name} in {first} has no photo of the same name ({key[0]}) in "
                f"{second}; give every photo its namesake, or take it out"
            )
        if items[other].bucket != items[index].bucket:
            (w, h), (w2, h2) = items[index].bucket, items[other].bucket
            raise DatasetError(
                f"data.pairs: {items[index].path.name} trains at {w}x{h} and its namesake {items[other].path.name} "
                f"at {w2}x{h2}; the photos of a pair need the same aspect ratio"
            )
        partners[index] = other
    if found[second]:
        index = next(iter(found[second].values()))
        raise DatasetError(
            f"data.pairs: {items[index].path.name} in {second} has no photo of the same name "
            f"({photo_stem(items[index].path)}) in {first}; give every photo its namesake, or take it out"
        )
    return partners


def epoch_batches(
    items: list[Item], *, batch_size: int, seed: int, epoch: int, partners: dict[int, int] | None = None
) -> list[list[int]]:
    """The micro-batches of one epoch as lists of item indices: shuffled, each from a single bucket.

    Each item appears `item.repeats` times. A bucket's last batch may be smaller than `batch_size`. With `partners`
    (`data.pairs`: first image -> its namesake) the pairs are what is shuffled, batch_size / 2 of them to a batch,
    each as two neighbours: first, namesake.
    """
    rng = random.Random(f"{seed}:{epoch}")
    units = range(len(items)) if partners is None else sorted(partners)
    per_batch = batch_size if partners is None else batch_size // 2
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index in rng.sample(units, len(units)):
        by_bucket.setdefault(items[index].bucket, []).extend([index] * items[index].repeats)
    batches = []
    for indices in by_bucket.values():
        rng.shuffle(indices)
        chunks = [indices[i : i + per_batch] for i in range(0, len(indices), per_batch)]
        batches += chunks if partners is None else [[j for i in chunk for j in (i, partners[i])] for chunk in chunks]
    rng.shuffle(batches)
    return batches


def batches_per_epoch(copies_per_bucket: Iterable[int], *, batch_size: int, world: int = 1) -> int:
    """Micro-batches each process takes per epoch, from how many images (repeats counted) each bucket holds: what
    `epoch_batches` and `shard_batches` give, without building them."""
    return sum(-(-copies // batch_size) for copies in copies_per_bucket if copies) // world


def steps_for_epochs(epochs: int, batches: int, accumulation: int) -> int:
    """Optimizer steps that take `epochs` epochs of `batches` micro-batches each (the last step may reach into the
    next epoch)."""
    return max(1, -(-epochs * batches // accumulation))


def shard_batches(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This process's share of an epoch: every `world`-th batch from `rank`, equal counts on every process."""
    usable = len(batches) // world * world
    return batches[rank:usable:world]


class BatchStream:
    """An endless, resumable sequence of this process's micro-batches, epoch after epoch.

    Its position is `(epoch, offset)`: the epoch in progress and how many of its batches were taken.
    """

    def __init__(
        self,
        items: list[Item],
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        epoch: int = 0,
        offset: int = 0,
        partners: dict[int, int] | None = None,
    ):
        self.items, self.batch_size, self.seed, self.rank, self.world = items, batch_size, seed, rank, world
        self.epoch, self.offset, self.partners = epoch, offset, partners
        self._shard = self._epoch_shard(epoch)
        if not self._shard:
            raise DatasetError(
                f"the dataset gives fewer than {world} batches per epoch, one for each process; "
                "add images, raise num_repeats or lower batch_size"
            )

    def _epoch_shard(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(
            self.items, batch_size=self.batch_size, seed=self.seed, epoch=epoch, partners=self.partners
        )
        return shard_batches(batches, self.rank, self.world)

    def next(self) -> list[int]:
        if self.offset >= len(self._shard):
            self.epoch, self.offset = self.epoch + 1, 0
            self._shard = self._epoch_shard(self.epoch)
        self.offset += 1
        return self._shard[self.offset - 1]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._shard)

    @property
    def epochs_done(self) -> float:
        """Epochs completed, fractional."""
        return self.epoch + self.offset / len(self._shard)


def step_rng(seed: int, micro_step: int, purpose: str) -> random.Random:
    """A Python RNG for one micro-step and one purpose (captions, flips), independent of all others."""
    return random.Random(f"{seed}:{micro_step}:{purpose}")


def size_conditioning(item: Item, flip: bool) -> tuple[int, int, int, int, int, int]:
    """SDXL's micro-conditioning of one training image: (original height, width, crop top, crop left, target
    height, width), as diffusers' SDXL pipeline lays out `add_time_ids`.

    From `metadata.jsonl` (`original_*`, `crop_*`) when the stored image is prepare's cut; otherwise the
    image as stored, centre-cropped to its bucket, which is what training then does. A mirrored image mirrors
    its crop: the left edge becomes the distance from the right edge.
    """
    target_w, target_h = item.bucket
    if item.original_size is not None and item.crop is not None and item.size == item.bucket:
        original, (left, top) = item.original_size, item.crop
        resized, _ = fit_to_bucket(*original, item.bucket)
    else:  # cropped now, from the image as stored (prepare --keep-margin's, or a hand-made dataset's)
        resized, (left, top) = crop_origin(item, item.size)
        original = item.original_size or item.size
    if flip:
        left = resized[0] - left - target_w
    return (original[1], original[0], top, left, target_h, target_w)


WILDCARD = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")  # kohya's {a|b|c}; `{{` and `}}` are literal braces


def pick_wildcards(caption: str, rng: random.Random | None) -> str:
    """Each `{a|b|c}` of a caption replaced by one of its options, drawn with `rng` (the first without one), as
    kohya's wildcards: `{{` and `}}` are literal braces."""

    def pick(match: re.Match) -> str:
        if match[1] is None:  # an escaped brace
            return match[0][0]
        options = [o.strip() for o in match[1].split("|")]
        return rng.choice(options) if rng is not None else options[0]

    return WILDCARD.sub(pick, caption)


def join_secondary(caption: str, separator: str) -> str:
    """kohya's `secondary_separator`: once tags are shuffled and dropped, the tags it joined become ordinary tags."""
    return caption.replace(separator, ",") if separator else caption


def steady_caption(caption: str, section: DataSection) -> str:
    """A caption as a step that changes nothing encodes it (`val_loss`, the text-encoder cache): wildcards at their
    first option, the secondary separator a comma."""
    if section.wildcards:
        caption = pick_wildcards(caption, None)
    return join_secondary(caption, section.secondary_separator)


def has_wildcards(caption: str) -> bool:
    """Whether a caption has `{a|b}` choices (escaped braces are none)."""
    return any(match[1] is not None for match in WILDCARD.finditer(caption))


def warmup_steps(section: DataSection, max_steps: int) -> int:
    """The optimizer steps of `caption_warmup_steps` (a share of `max_steps` when below 1, as kohya's)."""
    steps = section.caption_warmup_steps
    return math.floor(steps * max_steps) if steps < 1 else int(steps)


def transform_caption(
    caption: str,
    section: DataSection,
    rng: random.Random,
    fixed: tuple[int, int] | None = None,
    progress: tuple[int, int] = (0, 0),
) -> str:
    """Apply caption dropout, wildcards, the caption warm-up, per-tag dropout and tag shuffling. The fixed tags stay
    in place and are never dropped, and neither is the trigger: `fixed` (front, end) counts from `split_fixed_tags`,
    else the first `keep_tokens` tags. Tags joined by `secondary_separator` move and drop as one. `progress` is
    (optimizer steps done, warm-up steps): while the first is below the second, the tags after the fixed ones are cut
    to `caption_warmup_min` plus their share of the rest, as kohya's token warm-up does (before shuffling)."""
    if section.caption_dropout and rng.random() < section.caption_dropout:
        return ""
    if section.wildcards:
        caption = pick_wildcards(caption, rng)
    step, warmup = progress
    warming = step < warmup
    if not (section.shuffle_tags or section.caption_dropout_tags or warming):
        return join_secondary(caption, section.secondary_separator)
    tags = _tags(caption)
    front, end = fixed if fixed is not None else (section.keep_tokens, 0)
    head, rest, tail = tags[:front], tags[front : len(tags) - end], tags[len(tags) - end :] if end else []
    if warming:
        minimum = section.caption_warmup_min
        kept = math.floor(step * (len(rest) - minimum) / warmup) + minimum
        rest = rest[:kept] + [t for t in rest[kept:] if contains_trigger(t, section.trigger)]
    if section.caption_dropout_tags:
        rest = [
            t for t in rest if contains_trigger(t, section.trigger) or rng.random() >= section.caption_dropout_tags
        ]
    if section.shuffle_tags:
        rng.shuffle(rest)
    return join_secondary(", ".join(head + rest + tail), section.secondary_separator)


HUE_SHIFT_DEGREES = 16.0  # data.color_aug: sd-scripts' 8 on OpenCV's 0-180 hue scale
GAMMA_RANGE = (0.95, 1.05)


@dataclass(frozen=True)
class ColourChange:
    """`data.color_aug`'s change of one image at one step: a hue rotation in degrees, or a gamma."""

    hue_degrees: float = 0.0
    gamma: float = 1.0


def draw_colour_change(rng: random.Random) -> ColourChange | None:
    """sd-scripts' color_aug draw: a third of the images change, half of those by a hue rotation of up to 16
    degrees either way and the other half by a gamma of 0.95 to 1.05; None leaves the image as it is."""
    if rng.random() >= 1 / 3:
        return None
    if rng.random() < 0.5:
        return ColourChange(hue_degrees=rng.uniform(-HUE_SHIFT_DEGREES, HUE_SHIFT_DEGREES))
    return ColourChange(gamma=rng.uniform(*GAMMA_RANGE))


def change_colour(image: Image.Image, change: ColourChange | None) -> Image.Image:
    """An RGB image with its hue rotated (in Pillow's 256 hue steps) or its gamma applied to the 0-1 scale."""
    if change is None:
        return image
    if change.gamma != 1.0:
        curve = [round(255 * (value / 255) ** change.gamma) for value in range(256)]
        return image.point(curve * 3)
    steps = round(change.hue_degrees / 360 * 256)
    if steps == 0:
        return image
    hue, saturation, value = image.convert("HSV").split()
    hue = hue.point([(h + steps) % 256 for h in range(256)])
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def load_pixels(item: Item, flip: bool, colour: ColourChange | None = None) -> torch.Tensor:
    """The item's image resized and cropped to its bucket (at the centre, or at `item.place`; mirrored when `flip`,
    its colours changed by `colour`), as a [3, H, W] tensor in [-1, 1].

    The bytes must still be those the run read at its start (their sha256): an image edited mid-run is refused
    rather than trained on under the old one's cache key.
    """
    image = change_colour(_fitted(item.path, item.sha256, item, flip, "RGB", Image.Resampling.LANCZOS), colour)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def crop_origin(item: Item, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How an image of `size` becomes the item's bucket: ((resized width, height), (crop left, top)), the crop at
    the centre, or at `item.place` of the margin (data.random_crop)."""
    (width, height), centre = fit_to_bucket(*size, item.bucket)
    if item.place is None:
        return (width, height), centre
    share_x, share_y = item.place
    return (width, height), (round(share_x * (width - item.bucket[0])), round(share_y * (height - item.bucket[1])))


def margin(item: Item) -> tuple[int, int]:
    """The pixels a crop of the item's image can move across (width, height), at the size it is fitted to."""
    (width, height), _ = fit_to_bucket(*item.size, item.bucket)
    return width - item.bucket[0], height - item.bucket[1]


def _fitted(path: Path, sha256: str, item: Item, flip: bool, mode: str, resample: Any) -> Image.Image:
    """The file at `path` (which must still hash to `sha256`) in `mode`, resized to cover the item's bucket,
    cropped to it (at the centre, or at `item.place`) and mirrored when `flip`: one fitting for an image and its
    mask, so they stay aligned."""
    data = read_regular_file(path, Path(item.folder) / METADATA)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DatasetError(f"{path}: changed since this run read the dataset; start the run again to use it")
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened).convert(mode)
    (width, height), (left, top) = crop_origin(item, image.size)
    if image.size != (width, height):
        image = image.resize((width, height), resample)
    image = image.crop((left, top, left + item.bucket[0], top + item.bucket[1]))
    return ImageOps.mirror(image) if flip else image


def load_mask(item: Item, flip: bool, scale: int) -> torch.Tensor:
    """The item's mask fitted to its bucket exactly as `load_pixels` fits the image, mirrored with it, and
    averaged down to the latent grid (`scale` pixels per latent): a [1, H/scale, W/scale] tensor in [0, 1]. An item
    without a mask gets ones."""
    width, height = item.bucket
    if item.mask is None:
        return torch.ones(1, height // scale, width // scale)
    image = _fitted(item.mask, item.mask_sha256, item, flip, "L", Image.Resampling.BILINEAR)
    mask = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
    return torch.nn.functional.avg_pool2d(mask, scale)[0]


def vae_fingerprint(vae: Any) -> str:
    """A short key for the VAE's identity: its config and a sample of its weights."""

    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    digest.update(str(vae.dtype).encode())
    with torch.no_grad():
        for param in list(vae.parameters())[:: max(1, len(list(vae.parameters())) // 8)]:
            digest.update(param.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentCache:
    """VAE latent distributions (mean, std) per image, bucket and flip, in `<dataset>/.cache/latents/`, with the
    image's mask (masked loss) averaged down to the latent grid beside them.

    A file's name is a hash of everything its tensors depend on: the sha256 of the image bytes the run read
    (never a hash the dataset claims) and of its mask's, the bucket (resolution and crop follow from it and the
    image), the flip, the VAE's fingerprint (config, weights and dtype), the latent grid (`scale` pixels per
    latent) and how pixels are made (`PIXELS`). An edited image or mask, or another VAE, never reuses a stale
    entry, and several runs share the work.
    """

    def __init__(self, folder: Path, fingerprint: str, scale: int = 8):
        self.folder = Path(folder) / ".cache" / "latents"
        self.fingerprint = fingerprint
        self.scale = scale
        self._memory: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[tuple[int, bool], torch.Tensor] = {}

    def _path(self, item: Item, flip: bool) -> Path:
        width, height = item.bucket
        key = f"{item.sha256}|{width}x{height}|{int(flip)}|{self.fingerprint}|{PIXELS}"
        if item.mask is not None:  # entries of unmasked images keep their names
            key += f"|mask:{item.mask_sha256}|{self.scale}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.safetensors"

    def fill(self, items: list[Item], flips: tuple[bool, ...], encode, progress=None) -> int:
        """Load or compute the latents of every item (and flip); returns how many were encoded anew."""

        self.folder.mkdir(parents=True, exist_ok=True)
        encoded = 0
        for index, item in enumerate(items):
            for flip in flips:
                path = self._path(item, flip)
                if path.is_file():  # its name covers the mask too: a masked image's entry holds its mask
                    tensors = load_file(path)
                else:
                    mean, std = encode(load_pixels(item, flip))
                    tensors = {"mean": mean.contiguous(), "std": std.contiguous()}
                    if item.mask is not None:
                        tensors["mask"] = load_mask(item, flip, self.scale).contiguous()
                    crash_point("cache")
                    atomic_write(path, lambda tmp, t=tensors: save_file(t, str(tmp)))
                    encoded += 1
                self._memory[(index, flip)] = (tensors["mean"], tensors["std"])
                if "mask" in tensors:
                    self._masks[(index, flip)] = tensors["mask"]
            if progress is not None:
                progress()
        return encoded

    def get(self, index: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self._memory[(index, flip)]

    def mask(self, index: int, flip: bool) -> torch.Tensor | None:
        """The cached mask on the latent grid ([1, h, w]), or None for an image without one."""
        return self._masks.get((index, flip))

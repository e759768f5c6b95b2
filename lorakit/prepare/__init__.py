"""`prepare(src, out)`: a messy photo folder -> the dataset folder `train` reads (see DESIGN.md).

The source folder is only read. Images are decoded and sized in parallel worker processes,
duplicates are found by content and perceptual hashes, captions come from sidecar files, a
captioning model, file names or the trigger word; everything kept or dropped is counted in
`report.json`. Re-running reuses unchanged images; the metadata is written last and atomically,
so an interrupted run leaves the previous dataset intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..buckets import make_buckets
from ..errors import DatasetError, LorakitError, OutputError
from ..files import (
    HEIF_SUFFIXES,
    IMAGE_SUFFIXES,
    atomic_write,
    atomic_write_text,
    file_sha256,
    is_regular_file,
    prepared_image_name,
    printable,
    read_heif,
)
from .captions import (
    caption_from_filename,
    kohya_folder,
    normalise_tags,
    place_trigger,
    read_kohya_metadata,
    read_sidecar,
)
from .images import MASK_SUFFIX, REASONS, RESIZE_FILTERS, Processed, SizingOptions, mask_sidecar, process_image

READ_FAILURES = ("read_error", "empty_file", "unreadable", "truncated", "decompression_bomb")
STATE = Path(".cache") / "prepare.json"


@dataclass(frozen=True)
class PrepareOptions:
    """How `prepare` treats a folder; the CLI's options, one to one."""

    trigger: str = ""
    caption_suffix: str = ""  # tags put at the end of every caption that lacks them (kohya's caption_suffix)
    resolution: int = 512
    bucket_step: int = 64  # bucket sides are multiples of this (64 for Stable Diffusion's U-Nets)
    max_upscale: float = 2.0
    max_aspect: float = 2.0
    background: tuple[int, int, int] = (255, 255, 255)
    keep_duplicates: bool = False
    near_threshold: int = 6  # of 64 dHash bits
    caption_extensions: tuple[str, ...] = (".txt", ".caption")
    caption_model: str | None = None
    caption_from_filename: bool = False
    class_tokens: str = ""  # the caption of images without a caption file (kohya's class_tokens)
    caption_lines: str = "join"  # a caption file of several lines: "join" its tags, "first" line, or "choices"
    tokenizer: str | None = None
    strict: bool = False
    workers: int | None = None
    alpha_mask: bool = False  # an image's transparency becomes its mask (masks/...; `.mask.png` files always do)
    mask_model: str | None = None  # a CLIPSeg model (hub id or folder) masks the images that have no other mask
    mask_prompt: str = ""  # what it looks for: the subject, e.g. "a dog"
    mask_threshold: float = 0.4  # the model's probability at which a pixel is the subject
    kohya_folders: bool = False  # `N_words` subfolders give their images N repeats and, uncaptioned, the words
    kohya_metadata: str | None = None  # kohya's fine-tuning metadata file: the images it lists, with its captions
    resize_filter: str = "lanczos"  # how photos are scaled to their buckets (kohya's resize_interpolation)
    keep_margin: bool = False  # scale each photo to cover its bucket without cropping it (for data.random_crop)


CAPTION_LINES = ("join", "first", "choices")


@dataclass
class PrepareResult:
    out: Path
    kept: int
    dropped: dict[str, list[dict[str, str]]]
    report: dict = field(default_factory=dict)


def _check_folders(src: Path, out: Path) -> None:
    if not src.exists():
        raise DatasetError(f"{src}: source folder not found")
    if not src.is_dir():
        raise DatasetError(f"{src}: not a folder; give the folder that holds your photos")
    if out == src or src in out.parents:
        raise OutputError(
            f"--out {out}: inside the source folder {src}; choose a folder outside it "
            "(the source folder is never modified)"
        )
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError(f"--out {out}: cannot write under {parent}; choose a folder you can write to")


HEIF_ADVICE = (
    "Pillow cannot read without the pillow-heif package: `pip install pillow-heif` and prepare again (or export them "
    "as JPEG: an iPhone shares JPEGs when asked for Most Compatible)"
)


def scan(src: Path, caption_extensions: tuple[str, ...]) -> tuple[list[Path], int, int]:
    """Image files under `src` (recursively, hidden folders skipped; HEIC/HEIF photos among them when pillow-heif
    reads them), how many HEIC/HEIF photos it holds that cannot be read, and how many other files were ignored."""
    images, heif, ignored, heif_readable = [], 0, 0, read_heif()
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.lower().endswith(MASK_SUFFIX):  # masks travel with their image
                continue
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_SUFFIXES or (suffix in HEIF_SUFFIXES and heif_readable):
                images.append(Path(root) / name)
            elif suffix in HEIF_SUFFIXES:
                heif += 1
            elif suffix not in caption_extensions:
                ignored += 1
    return images, heif, ignored


def _own_image_name(name: object) -> bool:
    """Whether a name from the state file is one `prepared_image_name` makes (`images/<plain name>.png`): a state
    file is never trusted to name a file elsewhere."""
    return (
        isinstance(name, str)
        and re.fullmatch(r"(images|masks)/[A-Za-z0-9._-]+\.png", name) is not None
        and ".." not in name
    )


def _settings_key(options: PrepareOptions, segmenter: Any = None) -> str:
    sizing = (
        options.resolution,
        options.bucket_step,
        options.max_upscale,
        options.max_aspect,
        list(options.background),
        options.alpha_mask,
    )
    if options.resize_filter != "lanczos":  # another filter scales every image again (the default keeps old keys)
        sizing += (options.resize_filter,)
    if options.keep_margin:  # uncropped images: every image is written again (the default keeps old keys)
        sizing += ("keep-margin",)
    if segmenter is not None:  # another model (or other weights), prompt or threshold masks every image again
        sizing += (options.mask_model, segmenter.fingerprint, options.mask_prompt, options.mask_threshold)
    return hashlib.sha256(json.dumps(sizing).encode()).hexdigest()[:16]


def _written_before(out: Path) -> set[str]:
    """The `images/...` files an earlier `prepare` into `out` wrote (its state names them, whatever its
    settings): the only images a re-run may delete."""
    try:
        entries = json.loads((out / STATE).read_text(encoding="utf-8")).get("entries", {})
    except (OSError, ValueError, AttributeError):
        return set()
    names = set()
    for entry in entries.values():
        if isinstance(entry, dict):
            names |= {entry.get(k) for k in ("file_name", "mask_file_name") if _own_image_name(entry.get(k))}
    return names


def _load_state(out: Path, key: str) -> dict:
    try:
        state = json.loads((out / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state.get("entries", {}) if state.get("settings") == key else {}


def _process_all(paths: list[Path], src: Path, sizing: SizingOptions, workers: int, quiet: bool) -> list[Processed]:
    from ..progress import progress_bar

    relatives = [str(p.relative_to(src)) for p in paths]
    with progress_bar("Reading images", len(paths), quiet=quiet) as bar:
        if workers == 1:
            results = []
            for path, relative in zip(paths, relatives, strict=True):
                results.append(process_image(path, relative, sizing))
                bar.advance()
            return results
        with ProcessPoolExecutor(max_workers=workers, initializer=_end_with_parent) as pool:
            results = []
            for result in pool.map(process_image, paths, relatives, [sizing] * len(paths), chunksize=4):
                results.append(result)
                bar.advance()
            return results


def _end_with_parent() -> None:
    """Worker start-up: on Linux, ask the kernel to kill this worker when `prepare` dies, even by SIGKILL (workers
    otherwise notice only when they next ask for work)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _reuse(paths: list[Path], src: Path, out: Path, previous: dict) -> tuple[list[Processed], list[Path]]:
    """Entries of unchanged images from the previous run, and the paths that need processing."""
    reused, todo = [], []
    for path in paths:
        relative = str(path.relative_to(src))
        entry = previous.get(relative)
        try:
            unchanged = (
                isinstance(entry, dict)
                and _own_image_name(entry.get("file_name"))
                and is_regular_file(path)
                and entry["sha256"] == file_sha256(path)
            )
        except (OSError, KeyError):  # unreadable now: processing it reports why
            unchanged = False
        sidecar = mask_sidecar(path)
        mask_sha = file_sha256(sidecar) if sidecar is not None else ""
        mask_name = entry.get("mask_file_name", "") if isinstance(entry, dict) else ""
        unchanged = unchanged and entry.get("mask_source_sha256", "") == mask_sha  # a new or edited .mask.png
        unchanged = unchanged and (not mask_name or (_own_image_name(mask_name) and is_regular_file(out / mask_name)))
        if unchanged and is_regular_file(out / entry["file_name"]):
            reused.append(
                Processed(
                    source=relative,
                    sha256=entry["sha256"],
                    original_size=tuple(entry["original_size"]),
                    bucket=tuple(entry["bucket"]),
                    crop=tuple(entry["crop"]),
                    dhash=entry["dhash"],
                    mask_source_sha256=mask_sha,
                    mask_file_name=mask_name,
                )
            )
        else:
            todo.append(path)
    return reused, todo


def _dedupe(results: list[Processed], threshold: int) -> tuple[list[Processed], list[Processed]]:
    """Mark exact and near duplicates (the first by path is the original); returns (unique, duplicates)."""
    by_sha: dict[str, str] = {}
    unique: list[Processed] = []
    duplicates: list[Processed] = []
    for result in sorted(results, key=lambda r: r.source):
        if result.reason:
            continue
        if result.sha256 in by_sha:
            result.reason, result.detail = "duplicate", f"same bytes as {by_sha[result.sha256]}"
        else:
            by_sha[result.sha256] = result.source
            near = [(bin(result.dhash ^ u.dhash).count("1"), u.source) for u in unique]
            close = min(near, default=(threshold + 1, ""))
            if close[0] <= threshold:
                result.reason = "near_duplicate"
                result.detail = f"like {close[1]} ({close[0]} of 64 hash bits differ; threshold {threshold})"
        (duplicates if result.reason else unique).append(result)
    return unique, duplicates


@dataclass
class _Caption:
    text: str
    source: str  # metadata, sidecar, model, folder, class_tokens, filename, trigger_only
    trigger: str  # added, moved, present, none
    non_utf8: str = ""
    model_text: str = ""  # the captioning model's own words, before tags and trigger (what a re-run reuses)


def _caption(
    path: Path,
    image_png: bytes | None,
    options: PrepareOptions,
    captioner,
    cached: str | None,
    folder_words: str = "",
    listed: str | None = None,
) -> _Caption:
    """An image's caption: the one --kohya-metadata lists for it (`listed`), else its caption file, else the
    captioning model's, else (--kohya-folders) its folder's class words, else --class-tokens, else
    (--caption-from-filename) its file name, else none; then tags tidied and the trigger placed."""
    if listed is not None:
        text, sidecar, utf8, source = listed, None, True, "metadata"
    else:
        text, sidecar, utf8 = read_sidecar(path, options.caption_extensions)
        source = "sidecar"
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(lines) > 1 and options.caption_lines == "first":  # kohya's reading without enable_wildcard
        text = lines[0]
    elif len(lines) > 1 and options.caption_lines == "choices":  # one line per step with data.wildcards
        placed = [place_trigger(normalise_tags(line), options.trigger) for line in lines]
        choices = "{" + "|".join(", ".join(_suffixed(tags, options.caption_suffix)) for tags, _ in placed) + "}"
        return _Caption(choices, source, placed[0][1], "" if utf8 else str(sidecar), "")
    if text is None or not text.strip():
        if captioner is not None:
            if cached is None:
                from PIL import Image

                with Image.open(io.BytesIO(image_png)) as image:
                    cached = captioner(image)
            text, source = cached, "model"
        elif folder_words:
            text, source = folder_words, "folder"
        elif options.class_tokens:
            text, source = options.class_tokens, "class_tokens"
        elif options.caption_from_filename:
            text, source = caption_from_filename(path), "filename"
        else:
            text, source = "", "trigger_only"
    tags, trigger = place_trigger(normalise_tags(text), options.trigger)
    tags = _suffixed(tags, options.caption_suffix)
    model_text = text if source == "model" else ""
    return _Caption(", ".join(tags), source, trigger, "" if utf8 else str(sidecar), model_text)


def _suffixed(tags: list[str], suffix: str) -> list[str]:
    """`tags`, then those of --caption-suffix that they lack."""
    have = {tag.lower() for tag in tags}
    return tags + [tag for tag in normalise_tags(suffix) if tag.lower() not in have]


def _length_counter(tokenizer: str | None):
    """(unit, function caption -> length): CLIP tokens with a tokenizer, words otherwise."""
    if tokenizer is None:
        return "words", lambda text: len(text.replace(",", " ").split())
    from transformers import CLIPTokenizer  # lazy: only with --tokenizer; prepare runs without the ML stack

    local = Path(tokenizer).expanduser()
    source = str(local) if local.exists() else tokenizer
    subfolder = "tokenizer" if (local / "tokenizer").is_dir() else ""
    try:
        tok = CLIPTokenizer.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise DatasetError(
            f"--tokenizer: cannot load {tokenizer!r} ({type(err).__name__}); give a CLIP tokenizer "
            "folder, a diffusers model folder or a hub id"
        ) from None
    return "tokens", lambda text: len(tok(text, truncation=False).input_ids) - 2


def _kohya_listed(paths: list[Path], src: Path, options: PrepareOptions) -> tuple[dict[str, str], set[Path], int]:
    """With --kohya-metadata: the caption it lists for each image under `src` (by the image's path relative to
    `src`), the images it does not list (kohya trains only those it lists) and how many of its entries have no image
    here."""
    if not options.kohya_metadata:
        return {}, set(), 0
    listed = read_kohya_metadata(Path(options.kohya_metadata).expanduser(), src)
    found = {str(path.with_suffix("").resolve()): path for path in paths}
    captions = {str(path.relative_to(src)): listed[key] for key, path in found.items() if key in listed}
    unlisted = {path for key, path in found.items() if key not in listed}
    return captions, unlisted, sum(key not in found for key in listed)


def _report(src, out, options, found, ignored, kept, dropped, duplicates_kept, captions, reused) -> dict:
    unit, length = _length_counter(options.tokenizer)
    lengths = {c_source: length(c.text) for c_source, c in captions.items()}
    tag_counts = Counter(tag for c in captions.values() for tag in c.text.split(", ") if tag)
    shared = sorted(
        tag
        for tag, count in tag_counts.items()
        if len(captions) > 1 and count == len(captions) and tag.lower() != options.trigger.lower()
    )
    return {
        "source": str(src),
        "out": str(out),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()},
        "counts": {
            "found": found,
            "kept": len(kept),
            "dropped": sum(len(v) for v in dropped.values()),
            "reused_from_previous_run": reused,
            "other_files_ignored": ignored,
        },
        "dropped": dropped,
        "duplicates_kept": duplicates_kept,
        "buckets": dict(sorted(Counter(f"{r.bucket[0]}x{r.bucket[1]}" for r in kept).items())),
        "captions": {
            "sources": dict(Counter(c.source for c in captions.values())),
            "non_utf8_read_as_cp1252": sorted(c.non_utf8 for c in captions.values() if c.non_utf8),
            "length_unit": unit,
            "length_min": min(lengths.values()),
            "length_max": max(lengths.values()),
            "length_mean": round(sum(lengths.values()) / len(lengths), 1),
            "over_75": sorted(s for s, n in lengths.items() if n > 75),
            "shared_by_every_caption": shared,
        },
        "tags": tag_counts.most_common(50),
        "trigger": {"word": options.trigger, **dict(Counter(c.trigger for c in captions.values()))},
    }


def _report_kohya_folders(report: dict, kept: list[Processed], options: PrepareOptions) -> None:
    """With --kohya-folders, each `N_words` folder's images and repeats, and how many images lie outside such
    folders (1 repeat); without it, a hint when every image lies in such a folder."""
    groups = Counter(group[:2] for r in kept if (group := kohya_folder(r.source)))
    outside = len(kept) - sum(groups.values())
    if options.kohya_folders:
        report["kohya_folders"] = {name: {"images": n, "repeats": repeats} for (name, repeats), n in groups.items()}
        report["counts"]["outside_kohya_folders"] = outside
    elif groups and not outside:
        report["kohya_folders_unused"] = sorted(name for name, _ in groups)


def _images(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def summary_lines(report: dict) -> list[str]:
    """The printed summary of a report."""
    counts, captions = report["counts"], report["captions"]
    lines = [
        f"Kept {counts['kept']} of {counts['found']} images ({counts['reused_from_previous_run']} unchanged "
        f"since the last run) -> {report['out']}"
    ]
    for reason, entries in report["dropped"].items():
        lines.append(
            f"  dropped {len(entries)} {reason} ({REASONS[reason]}): "
            + ", ".join(e["file"] for e in entries[:5])
            + (" ..." if len(entries) > 5 else "")
        )
    if report["duplicates_kept"]:
        lines.append(f"  kept {len(report['duplicates_kept'])} duplicates (--keep-duplicates)")
    if counts.get("foreign_images_left"):
        lines.append(
            f"  left {counts['foreign_images_left']} images in {report['out']}/images that lorakit did not write "
            "(never deleted; metadata.jsonl does not list them)"
        )
    if counts.get("metadata_entries_without_image"):
        lines.append(
            f"  {counts['metadata_entries_without_image']} entries of --kohya-metadata name no image under "
            f"{report['source']}"
        )
    if counts.get("heif_photos_not_read"):
        lines.append(f"  skipped {counts['heif_photos_not_read']} HEIC/HEIF photos, which {HEIF_ADVICE}")
    if counts["other_files_ignored"]:
        lines.append(f"  ignored {counts['other_files_ignored']} files that are neither images nor captions")
    lines.append("Buckets: " + ", ".join(f"{b} x{n}" for b, n in report["buckets"].items()))
    if "kohya_folders" in report:
        lines.append(
            "kohya folders: "
            + ", ".join(
                f"{name} ({_images(g['images'])} x{g['repeats']})" for name, g in report["kohya_folders"].items()
            )
            + (
                f"; {_images(counts['outside_kohya_folders'])} outside them train once per epoch"
                if counts.get("outside_kohya_folders")
                else ""
            )
        )
    if report.get("kohya_folders_unused"):
        names = report["kohya_folders_unused"]
        lines.append(
            f"  hint: the subfolders look like kohya's N_name layout ({', '.join(names[:3])}"
            f"{' ...' if len(names) > 3 else ''}); pass --kohya-folders to take their repeats and, for images "
            "without a caption file, their names as captions"
        )
    settings = report["settings"]
    if counts.get("with_mask") or settings.get("alpha_mask") or settings.get("mask_model"):
        sources = ["transparency"] if settings.get("alpha_mask") else []
        sources += [f"{settings['mask_model']} ('{settings['mask_prompt']}')"] if settings.get("mask_model") else []
        lines.append(
            f"Masks: {counts['with_mask']} of {counts['kept']} images (from .mask.png files"
            f"{''.join(' and ' + s for s in sources)}) -> masks/; train with data.masked_loss = true"
        )
    if counts.get("no_subject_found"):
        missed = counts["no_subject_found"]
        lines.append(
            f"  the mask model found no '{settings['mask_prompt']}' in {len(missed)} images (they train unmasked): "
            + ", ".join(missed[:5])
            + (" ..." if len(missed) > 5 else "")
        )
    lines.append("Captions: " + ", ".join(f"{n} from {s}" for s, n in captions["sources"].items()))
    if captions["non_utf8_read_as_cp1252"]:
        lines.append(
            f"  {len(captions['non_utf8_read_as_cp1252'])} caption files were not UTF-8 and were read "
            "as cp1252: " + ", ".join(captions["non_utf8_read_as_cp1252"][:5])
        )
    unit = captions["length_unit"]
    lines.append(
        f"Caption length ({unit}): min {captions['length_min']}, mean {captions['length_mean']}, "
        f"max {captions['length_max']}"
        + ("" if unit == "tokens" else " (no --tokenizer given: counted in words, not CLIP tokens)")
    )
    if captions["over_75"]:
        lines.append(
            f"  warning: {len(captions['over_75'])} captions are over 75 {unit}; SD truncates at 75 "
            "tokens unless data.max_token_length is raised"
        )
    if captions.get("shared_by_every_caption"):
        tags = ", ".join(f"'{t}'" for t in captions["shared_by_every_caption"][:5])
        lines.append(
            f"  warning: every caption has {tags}: training binds it to the subject (it comes back in every image); "
            "caption what differs between photos, or set data.caption_dropout_tags = 0.3 in the recipe"
        )
    trigger = report["trigger"]
    if trigger["word"]:
        lines.append(
            f"Trigger '{trigger['word']}': added to {trigger.get('added', 0)}, moved to the front in "
            f"{trigger.get('moved', 0)}, already present in {trigger.get('present', 0)}"
        )
    top = ", ".join(f"{tag} ({n})" for tag, n in report["tags"][:10])
    lines.append(f"Top tags: {top}")
    return [printable(line) for line in lines]  # file names and tags come from the user's files


def prepare(
    src: str | Path, out: str | Path, options: PrepareOptions = PrepareOptions(), *, quiet: bool = False, log=print
) -> PrepareResult:
    """Turn the photos under `src` into the dataset folder `out`; returns what was kept and dropped.

    Raises DatasetError / OutputError (nothing written) for a missing source, no images, no usable
    image, an output inside the source, or (with `options.strict`) any unreadable image.
    """
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if options.mask_model and not options.mask_prompt.strip():
        raise LorakitError(
            '--mask-model: also give --mask-prompt, the subject the model should find (e.g. --mask-prompt "a dog")'
        )
    if options.resize_filter not in RESIZE_FILTERS:
        raise LorakitError(
            f"--resize-filter: {options.resize_filter!r}; use {', '.join(RESIZE_FILTERS)} (lanczos is the default)"
        )
    if options.caption_lines not in CAPTION_LINES:
        raise LorakitError(
            f"--caption-lines: {options.caption_lines!r}; use {', '.join(CAPTION_LINES)} (what a caption file of "
            "several lines becomes)"
        )
    if options.class_tokens and (options.caption_model or options.caption_from_filename):
        other = "--caption-model" if options.caption_model else "--caption-from-filename"
        raise LorakitError(
            f"--class-tokens and {other} both caption the images without a caption file; pass one of them"
        )
    _check_folders(src, out)
    segmenter = None
    if options.mask_model:  # a model that will not load fails before any image is read
        from .masks import Segmenter

        segmenter = Segmenter(options.mask_model, options.mask_prompt, options.mask_threshold)
    paths, heif, ignored = scan(src, options.caption_extensions)
    listed, unlisted, missing = _kohya_listed(paths, src, options)
    if not paths:
        raise DatasetError(
            f"{src}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in it and its subfolders; "
            + (f"{heif} HEIC/HEIF photos, which {HEIF_ADVICE}; " if heif else "")
            + f"{ignored} other files)"
        )
    buckets = tuple(make_buckets(options.resolution, options.bucket_step, options.max_aspect))
    if not buckets:
        raise DatasetError(
            f"--resolution {options.resolution}: smaller than one --bucket-step "
            f"({options.bucket_step}); raise the resolution or lower the step"
        )
    sizing = SizingOptions(
        options.resolution,
        buckets,
        options.max_upscale,
        options.background,
        options.alpha_mask,
        options.resize_filter,
        options.keep_margin,
    )
    key = _settings_key(options, segmenter)
    previous = _load_state(out, key)
    reused, todo = _reuse([p for p in paths if p not in unlisted], src, out, previous)
    workers = options.workers or os.cpu_count() or 1
    processed = _process_all(todo, src, sizing, min(workers, max(1, len(todo))), quiet)
    results = reused + processed
    failures = [r for r in results if r.reason]
    if options.strict and any(r.reason in READ_FAILURES for r in failures):
        first = next(r for r in failures if r.reason in READ_FAILURES)
        raise DatasetError(
            f"{src / first.source}: {REASONS[first.reason]} (--strict); "
            f"{sum(r.reason in READ_FAILURES for r in failures)} such files in all"
        )
    unique, duplicates = _dedupe(results, options.near_threshold)
    kept = sorted(unique + (duplicates if options.keep_duplicates else []), key=lambda r: r.source)
    dropped: dict[str, list[dict[str, str]]] = {}
    for result in sorted(failures + ([] if options.keep_duplicates else duplicates), key=lambda r: r.source):
        dropped.setdefault(result.reason, []).append({"file": result.source, "detail": result.detail})
    if unlisted:
        dropped["not_in_metadata"] = [{"file": str(p.relative_to(src)), "detail": ""} for p in sorted(unlisted)]
    if not kept:
        why = "; ".join(f"{len(v)} {k} ({REASONS[k]})" for k, v in dropped.items())
        raise DatasetError(f"{src}: no usable images: {why}")

    captioner = None
    if options.caption_model:
        from .captions import Captioner

        captioner = Captioner(options.caption_model)
    png = {r.source: r.png for r in processed if r.png}
    captions = {}
    for result in kept:
        entry = previous.get(result.source, {})
        cached = entry.get("model_caption") if entry.get("caption_model") == options.caption_model else None
        image = png.get(result.source) or (out / entry.get("file_name", "")).read_bytes() if captioner else None
        group = kohya_folder(result.source) if options.kohya_folders else None
        captions[result.source] = _caption(
            src / result.source,
            image,
            options,
            captioner,
            cached,
            group[2] if group else "",
            listed.get(result.source),
        )
    report = _report(
        src,
        out,
        options,
        len(paths),
        ignored,
        kept,
        dropped,
        [{"file": d.source, "detail": d.detail} for d in duplicates] if options.keep_duplicates else [],
        captions,
        len(reused),
    )
    _report_kohya_folders(report, kept, options)
    if heif:
        report["counts"]["heif_photos_not_read"] = heif
    if missing:
        report["counts"]["metadata_entries_without_image"] = missing
    if segmenter is not None:
        report["counts"]["no_subject_found"] = _segment(kept, png, previous, out, segmenter, quiet)
    masked = sum(1 for r in kept if r.mask_png or r.mask_file_name)
    if masked or options.alpha_mask or options.mask_model:  # only datasets with masks (or asked for) carry counts
        report["counts"]["with_mask"] = masked
        report["counts"]["without_mask"] = len(kept) - masked
    try:
        _write(out, kept, png, previous, captions, report, options, key, buckets)
    except OSError as err:  # a full disk or a lost mount: the previous metadata.jsonl stays (written last)
        raise OutputError(
            f"--out {out}: could not write the dataset ({err.strerror or err}); the previous metadata.jsonl, if any, "
            "is unchanged: free space and run prepare again (unchanged images are reused)"
        ) from None
    for line in summary_lines(report):
        log(line)
    return PrepareResult(out, len(kept), dropped, report)


def _segment(
    kept: list[Processed], png: dict[str, bytes], previous: dict, out: Path, segmenter: Any, quiet: bool
) -> list[str]:
    """Mask, with the segmentation model, every kept image that has no mask of its own (a .mask.png file or, with
    --alpha-mask, transparency), on the image as fitted into its bucket. Returns the images the model found
    nothing in (they stay unmasked)."""
    from ..progress import progress_bar
    from .masks import mask_png

    todo = [r for r in kept if not r.mask_png and not r.mask_file_name]
    empty = []
    with progress_bar("Masking", len(todo), quiet=quiet) as bar:
        for result in todo:
            image = png.get(result.source) or (out / previous.get(result.source, {}).get("file_name", "")).read_bytes()
            result.mask_png = mask_png(segmenter, image) or b""
            if not result.mask_png:
                empty.append(result.source)
            bar.advance()
    return empty


def _write(
    out: Path,
    kept: list[Processed],
    png: dict[str, bytes],
    previous: dict,
    captions: dict,
    report: dict,
    options: PrepareOptions,
    key: str,
    buckets: tuple,
) -> None:
    """Write images, then metadata/state/report atomically; finally remove the images an earlier run wrote that no
    entry names now. Images lorakit did not write are never removed, only counted in the report."""
    from .. import __version__

    written_before = _written_before(out)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / ".cache").mkdir(exist_ok=True)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot create it ({err.strerror})") from None
    rows, state = [], {}
    for result in kept:
        if result.source in png:
            data = png[result.source]
            processed_sha = hashlib.sha256(data).hexdigest()
            file_name = prepared_image_name(result.source, result.sha256)
            if (out / file_name).is_file() and file_sha256(out / file_name) != processed_sha:
                # an earlier run's image of this photo at other settings (resolution, filter, ...): the new one goes
                # beside it, so the earlier metadata stays true until the new one lands; the cleanup then removes it
                file_name = prepared_image_name(result.source, processed_sha)
            if not (out / file_name).is_file():
                atomic_write(out / file_name, lambda tmp, d=data: tmp.write_bytes(d))
        else:
            file_name, processed_sha = previous[result.source]["file_name"], previous[result.source]["image_sha256"]
        mask_name = ""
        if result.mask_png:
            mask_name = "masks/" + file_name.split("/", 1)[1]
            (out / "masks").mkdir(exist_ok=True)
            atomic_write(out / mask_name, lambda tmp, d=result.mask_png: tmp.write_bytes(d))
        elif result.mask_file_name:
            mask_name = result.mask_file_name
        caption = captions[result.source]
        group = kohya_folder(result.source) if options.kohya_folders else None
        rows.append(
            {
                "file_name": file_name,
                "text": caption.text,
                "width": result.bucket[0],
                "height": result.bucket[1],
                "original_width": result.original_size[0],
                "original_height": result.original_size[1],
                "crop_left": result.crop[0],
                "crop_top": result.crop[1],
                "source": result.source,
                "sha256": processed_sha,
                **({"mask_file_name": mask_name} if mask_name else {}),
                # every row alike, so that `datasets` reads one schema
                **(
                    {"repeats": group[1] if group else 1, "kohya_folder": group[0] if group else ""}
                    if options.kohya_folders
                    else {}
                ),
            }
        )
        state[result.source] = {
            "sha256": result.sha256,
            "file_name": file_name,
            "image_sha256": processed_sha,
            "original_size": list(result.original_size),
            "bucket": list(result.bucket),
            "crop": list(result.crop),
            "dhash": result.dhash,
        }
        if mask_name:
            state[result.source].update(mask_file_name=mask_name, mask_source_sha256=result.mask_source_sha256)
        if caption.source == "model":
            state[result.source].update(caption_model=options.caption_model, model_caption=caption.model_text)
    dataset = {
        "version": 1,
        "resolution": options.resolution,
        "buckets": [list(b) for b in buckets],
        "trigger": options.trigger,
        "images": len(rows),
        "created_by": f"lorakit {__version__}",
    }
    named = {row["file_name"] for row in rows} | {row["mask_file_name"] for row in rows if "mask_file_name" in row}
    stale = {f"{d}/{p.name}" for d in ("images", "masks") for p in (out / d).glob("*.png")} - named
    report["counts"]["foreign_images_left"] = len(stale - written_before)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "dataset.json", json.dumps(dataset, indent=2) + "\n")
    atomic_write_text(out / STATE, json.dumps({"settings": key, "entries": state}) + "\n")
    atomic_write_text(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for file_name in stale & written_before:
        (out / file_name).unlink(missing_ok=True)

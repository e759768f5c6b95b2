"""Reading one photo as a clean RGB image, sizing it to its bucket, and hashing it (Pillow only).

Runs in worker processes: everything here is a plain function of its arguments.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..buckets import fit_to_bucket, nearest_bucket
from ..files import is_regular_file, open_heif_with

# Why an image was left out; the keys of the report's "dropped" table.
REASONS = {
    "read_error": "could not be read (permissions, an I/O error, a broken link or not a regular file)",
    "empty_file": "zero-byte file",
    "unreadable": "not an image Pillow can read",
    "truncated": "truncated or corrupt image data",
    "decompression_bomb": "larger than Pillow's decompression-bomb limit",
    "too_small": "would need more upscaling than --max-upscale",
    "duplicate": "byte-identical to another image",
    "near_duplicate": "perceptually near-identical to another image",
    "bad_mask": "its .mask.png is unreadable or not the photo's size",
    "not_in_metadata": "not listed in --kohya-metadata (kohya trains only the images its metadata lists)",
}
MASK_SUFFIX = ".mask.png"  # photo.jpg's mask is photo.mask.png, beside it
# `prepare --resize-filter`: Pillow's filter for each name kohya's resize_interpolation takes ("area", OpenCV's
# averaging filter, is Pillow's box filter)
RESIZE_FILTERS = {
    "lanczos": "LANCZOS",
    "bicubic": "BICUBIC",
    "cubic": "BICUBIC",
    "bilinear": "BILINEAR",
    "linear": "BILINEAR",
    "area": "BOX",
    "box": "BOX",
    "nearest": "NEAREST",
}


def mask_sidecar(path: Path) -> Path | None:
    """The `.mask.png` beside an image, when it is a regular file."""
    sidecar = path.with_name(path.stem + MASK_SUFFIX)
    return sidecar if is_regular_file(sidecar) else None


@dataclass(frozen=True)
class SizingOptions:
    resolution: int
    buckets: tuple[tuple[int, int], ...]
    max_upscale: float
    background: tuple[int, int, int]
    alpha_mask: bool = False  # an image's alpha channel becomes its mask (for masked loss)
    resize_filter: str = "lanczos"  # one of RESIZE_FILTERS: how a photo is scaled to its bucket
    keep_margin: bool = False  # scaled to cover the bucket but not cropped to it: data.random_crop moves in the rest


@dataclass
class Processed:
    """The outcome for one source image: `reason` set when it was dropped."""

    source: str  # path relative to the source folder
    sha256: str
    reason: str | None = None
    detail: str = ""
    original_size: tuple[int, int] = (0, 0)
    bucket: tuple[int, int] = (0, 0)
    crop: tuple[int, int] = (0, 0)
    dhash: int = 0
    png: bytes = b""
    mask_png: bytes = b""  # the mask fitted exactly as the image (masked loss), when there is one
    mask_source_sha256: str = ""  # of the `.mask.png` beside the source image ("" for none or an alpha mask)
    mask_file_name: str = ""  # a reused entry's mask in the dataset (masks/...)


def to_rgb(image, background: tuple[int, int, int]):
    """Any Pillow image as 8-bit RGB: alpha composited on `background`, 16-bit scaled (not clipped) to 8 bits."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: Pillow's convert("RGB") clips at 255 (a white image); scale to 8 bits instead.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, background)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def dhash(image, size: int = 8) -> int:
    """A 64-bit difference hash: neighbouring-pixel brightness comparisons on a (size+1) x size thumbnail."""
    from PIL import Image

    grey = image.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR)
    pixels = list(grey.getdata())
    bits = 0
    for row in range(size):
        for col in range(size):
            left, right = pixels[row * (size + 1) + col], pixels[row * (size + 1) + col + 1]
            bits = (bits << 1) | (left > right)
    return bits


def process_image(path: Path, relative: str, options: SizingOptions) -> Processed:
    """Read, normalise, bucket and encode one image; failures come back as a `reason`, never an exception."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not is_regular_file(path):  # a FIFO would block the worker forever
        return Processed(source=relative, sha256="", reason="read_error", detail="not a regular file")
    try:
        data = path.read_bytes()
    except OSError as err:
        return Processed(source=relative, sha256="", reason="read_error", detail=err.strerror or type(err).__name__)
    result = Processed(source=relative, sha256=hashlib.sha256(data).hexdigest())
    open_heif_with(path)
    if not data:
        result.reason = "empty_file"
        return result
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                opened.seek(0)  # first frame of animations
                original = _displayed_size(opened)
                _draft(opened, original, options)
                opened.load()
                upright = ImageOps.exif_transpose(opened)
                mask = _alpha(upright) if options.alpha_mask else None
                image = to_rgb(upright, options.background)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        result.reason, result.detail = "decompression_bomb", str(err).split(".")[0]
        return result
    except UnidentifiedImageError:
        result.reason = "unreadable"
        return result
    except (OSError, SyntaxError, ValueError) as err:
        result.reason, result.detail = "truncated", str(err)
        return result
    sidecar = mask_sidecar(path)
    if sidecar is not None:
        try:
            data = sidecar.read_bytes()
            with Image.open(io.BytesIO(data)) as opened:
                mask = ImageOps.exif_transpose(opened).convert("L")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            result.reason, result.detail = "bad_mask", f"{sidecar.name}: {err}"
            return result
        if mask.size != original:
            result.reason = "bad_mask"
            result.detail = f"{sidecar.name} is {mask.size[0]}x{mask.size[1]}, the photo {original[0]}x{original[1]}"
            return result
        result.mask_source_sha256 = hashlib.sha256(data).hexdigest()
    return _fit(image, original, result, options, mask)


def _alpha(image):
    """The alpha channel of an image that has one (as a greyscale mask), else None."""
    if "A" in image.getbands():
        return image.getchannel("A")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def _displayed_size(image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation is applied."""
    orientation = image.getexif().get(0x0112, 1)
    return image.size[::-1] if orientation in (5, 6, 7, 8) else image.size


def _draft(image, displayed: tuple[int, int], options: SizingOptions) -> None:
    """Let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while decoding (much faster), never below what the
    bucket needs."""
    if image.format != "JPEG":
        return
    bucket = nearest_bucket(*displayed, list(options.buckets))
    (width, height), _ = fit_to_bucket(*displayed, bucket)
    needed = (width, height) if displayed == image.size else (height, width)
    image.draft("RGB", needed)


def _fit(image, original: tuple[int, int], result: Processed, options: SizingOptions, mask=None) -> Processed:
    from PIL import Image

    result.original_size = original
    result.dhash = dhash(image)
    bucket = nearest_bucket(*original, list(options.buckets))
    (width, height), crop = fit_to_bucket(*original, bucket)
    upscale = width / original[0]
    if upscale > options.max_upscale:
        result.reason = "too_small"
        result.detail = f"{original[0]}x{original[1]} needs {upscale:.1f}x for bucket {bucket[0]}x{bucket[1]}"
        return result
    if (width, height) != image.size:
        image = image.resize((width, height), getattr(Image.Resampling, RESIZE_FILTERS[options.resize_filter]))
    cut = (crop[0], crop[1], crop[0] + bucket[0], crop[1] + bucket[1])
    cut = (0, 0, width, height) if options.keep_margin else cut
    image = image.crop(cut)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    result.bucket, result.crop, result.png = bucket, crop, buffer.getvalue()
    if mask is not None:  # the same resize and crop as the image, so pixel (x, y) of both is the same place
        mask = mask.resize((width, height), Image.Resampling.BILINEAR).crop(cut)
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG", compress_level=3)
        result.mask_png = buffer.getvalue()
    return result

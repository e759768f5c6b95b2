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

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Why an image was left out; the keys of the report's "dropped" table.
REASONS = {
    "empty_file": "zero-byte file",
    "unreadable": "not an image Pillow can read",
    "truncated": "truncated or corrupt image data",
    "decompression_bomb": "larger than Pillow's decompression-bomb limit",
    "too_small": "would need more upscaling than --max-upscale",
    "duplicate": "byte-identical to another image",
    "near_duplicate": "perceptually near-identical to another image",
}


@dataclass(frozen=True)
class SizingOptions:
    resolution: int
    buckets: tuple[tuple[int, int], ...]
    max_upscale: float
    background: tuple[int, int, int]


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

    data = path.read_bytes()
    result = Processed(source=relative, sha256=hashlib.sha256(data).hexdigest())
    if not data:
        result.reason = "empty_file"
        return result
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                opened.seek(0)  # first frame of animations
                opened.load()
                image = to_rgb(ImageOps.exif_transpose(opened), options.background)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        result.reason, result.detail = "decompression_bomb", str(err).split(".")[0]
        return result
    except UnidentifiedImageError:
        result.reason = "unreadable"
        return result
    except (OSError, SyntaxError, ValueError) as err:
        result.reason, result.detail = "truncated", str(err)
        return result
    return _fit(image, result, options)


def _fit(image, result: Processed, options: SizingOptions) -> Processed:
    from PIL import Image

    result.original_size = image.size
    result.dhash = dhash(image)
    bucket = nearest_bucket(*image.size, list(options.buckets))
    (width, height), crop = fit_to_bucket(*image.size, bucket)
    upscale = width / image.size[0]
    if upscale > options.max_upscale:
        result.reason = "too_small"
        result.detail = f"{image.size[0]}x{image.size[1]} needs {upscale:.1f}x for bucket {bucket[0]}x{bucket[1]}"
        return result
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    image = image.crop((crop[0], crop[1], crop[0] + bucket[0], crop[1] + bucket[1]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    result.bucket, result.crop, result.png = bucket, crop, buffer.getvalue()
    return result

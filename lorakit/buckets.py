"""Aspect-ratio buckets: sizes of about `resolution**2` pixels whose sides are multiples of `step`.

Training in buckets keeps portrait and landscape photos whole instead of square-cropping them;
every batch is drawn from a single bucket so its tensors stack.
"""

from __future__ import annotations

import math


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """All (width, height) with sides multiples of `step`, area <= resolution**2, aspect <= `max_aspect`.

    For each width the tallest height that fits the area is taken, so every bucket is as large as
    allowed; the result is sorted by aspect ratio (width / height).
    """
    area = resolution * resolution
    buckets = set()
    width = step
    while width * step <= area:
        height = (area // width) // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect:
            buckets.add((width, height))
        width += step
    return sorted(buckets, key=lambda wh: wh[0] / wh[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in aspect ratio (on a log scale) to a `width` x `height` image; larger wins ties."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def fit_to_bucket(width: int, height: int, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How to cover `bucket` with the image: ((resized width, height), (crop left, crop top)), centre crop."""
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    resized = (max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale)))
    return resized, ((resized[0] - bucket_w) // 2, (resized[1] - bucket_h) // 2)

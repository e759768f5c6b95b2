"""Images per second of `lorakit prepare` with one worker and with all cores.

Run by hand (not part of the test suite):

    python benchmarks/prepare_speed.py [--count 300] [--size 3000x2000] [--resolution 512]

Generates `--count` distinct photo-like JPEGs (quality 90) once, then prepares them from scratch
with 1 worker and with all cores (no reuse between the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def make_photos(folder: Path, count: int, width: int, height: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        small = rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 12, size=(height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        image.save(folder / f"photo{index:04d}.jpg", quality=90)


def main() -> None:
    from lorakit.prepare import PrepareOptions, prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", default="3000x2000")
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        start = time.perf_counter()
        make_photos(photos, args.count, width, height)
        print(f"generated {args.count} {width}x{height} JPEGs in {time.perf_counter() - start:.0f} s")
        results = {}
        for workers in sorted({1, cores}):
            out = Path(tmp) / f"dataset-{workers}"
            start = time.perf_counter()
            result = prepare(
                photos,
                out,
                PrepareOptions(resolution=args.resolution, workers=workers, keep_duplicates=True),
                quiet=True,
                log=lambda _: None,
            )
            seconds = time.perf_counter() - start
            results[workers] = {
                "seconds": round(seconds, 2),
                "images_per_s": round(args.count / seconds, 2),
                "kept": result.kept,
            }
            shutil.rmtree(out)
    print(f"{'workers':>8}{'seconds':>10}{'images/s':>10}")
    for workers, row in results.items():
        print(f"{workers:>8}{row['seconds']:>10.1f}{row['images_per_s']:>10.2f}")
    print(json.dumps({"count": args.count, "size": args.size, "resolution": args.resolution, "results": results}))


if __name__ == "__main__":
    main()

"""A messy photo folder with the real-world cases `prepare` must handle, generated in code."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def textured(width: int, height: int, seed: int) -> Image.Image:
    """A distinct photo-like image: smooth random colour blobs (distinct perceptual hashes per seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def build_messy_folder(root: Path) -> dict[str, str]:
    """Write the cases; returns {case: relative path} for the tests."""
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    cases = {}

    def save(name, image, **kwargs):
        image.save(root / name, **kwargs)
        cases[name.split(".")[0].split("/")[-1]] = name

    for index in range(4):
        save(f"photo{index}.png", textured(300, 200, index))
        (root / f"photo{index}.txt").write_text(f"ohwx person,  red shirt , photo{index},, red shirt", "utf-8")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    save("rotated.jpg", textured(300, 200, 10), exif=exif, quality=95)
    (root / "rotated.txt").write_text("rotated photo", "utf-8")
    save("cmyk.jpg", textured(260, 260, 11).convert("CMYK"), quality=95)
    rgba = textured(256, 256, 12).convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, 128, 256))  # left half transparent
    rgba.putalpha(alpha)
    save("rgba.png", rgba)
    grey16 = Image.fromarray(np.full((256, 256), 32768, dtype=np.uint16))
    grey16 = grey16.convert("I;16") if grey16.mode != "I;16" else grey16
    save("grey16.png", grey16)
    save("grey.png", textured(256, 256, 13).convert("L"))
    save("palette.gif", textured(256, 200, 14).convert("P"))
    data = io.BytesIO()
    textured(300, 300, 15).save(data, format="JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    cases["truncated"] = "truncated.jpg"
    (root / "empty.jpg").write_bytes(b"")
    cases["empty"] = "empty.jpg"
    (root / "notanimage.png").write_text("this is text, not a PNG")
    cases["notanimage"] = "notanimage.png"
    (root / "sub" / "copy_of_photo0.png").write_bytes((root / "photo0.png").read_bytes())
    cases["duplicate"] = "sub/copy_of_photo0.png"
    textured(300, 200, 1).save(root / "sub" / "photo1_small.jpg", quality=70)
    cases["near_duplicate"] = "sub/photo1_small.jpg"
    save("tiny.png", textured(16, 16, 16))
    save("no_caption_here.png", textured(256, 256, 17))
    save("latin1.png", textured(256, 256, 18))
    (root / "latin1.txt").write_bytes("caf\xe9 au lait, ohwx person".encode("cp1252"))
    save("other_ext.png", textured(256, 256, 19))
    (root / "other_ext.caption").write_text("a caption file", "utf-8")
    (root / "notes.md").write_text("not an image")
    return cases

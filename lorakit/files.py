"""File helpers at the bottom of the house: atomic writes, content hashes, image suffixes, output checks.

Nothing here knows about models; `prepare` (which never imports torch) and the training modules share it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place.

    A reader never sees a half-written `path`: it is either the old file or the complete new one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to overwrite an input, and an existing output unless `overwrite`."""
    resolved = out.expanduser().resolve()
    for path in inputs:
        if resolved == Path(path).expanduser().resolve():
            raise OutputError(f"--out {out}: is one of the inputs; write to a new file (inputs are never overwritten)")
    if out.exists() and not overwrite:
        raise OutputError(f"--out {out}: already exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise OutputError(f"--out {out}: folder {out.parent} does not exist")

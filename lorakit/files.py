"""File helpers at the bottom of the house: atomic writes, content hashes, image suffixes, output checks.

Nothing here knows about models; `prepare` (which never imports torch) and the training modules share it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
CAPTION_MAX_CHARS = 4096  # the text encoders read 77 tokens (225 with long-prompt chunking), ~1,000 characters


def is_regular_file(path: Path) -> bool:
    """Whether `path` (links followed) is a regular file: FIFOs, devices and sockets are not, and opening a FIFO
    would block until something writes to it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def printable(text: str) -> str:
    """`text` safe for a terminal: control characters (escape sequences from a file or caption) shown as \\xNN."""
    return "".join(c if c.isprintable() or c == "\t" else f"\\x{ord(c):02x}" for c in text)


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

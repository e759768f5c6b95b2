"""The run folder: creating it safely, and atomic writes of everything in it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError


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


def check_run_folder(run_dir: Path, overwrite: bool) -> None:
    """Refuse an existing run folder unless `overwrite`, and an output location that cannot be written."""
    if run_dir.exists() and not overwrite:
        raise OutputError(
            f"output: run folder {run_dir} already exists; pass --overwrite to replace it "
            "or set output.name to a new name"
        )
    parent = run_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError(f"output.folder: cannot write under {parent}; choose a folder you can write to")


def create_run_folder(run_dir: Path, overwrite: bool) -> None:
    """Create an empty run folder (removing an old one when `overwrite`)."""
    check_run_folder(run_dir, overwrite)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True)
    except OSError as err:
        raise OutputError(f"output.folder: cannot create {run_dir}: {err.strerror}") from None

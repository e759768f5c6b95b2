"""File helpers at the bottom of the house: atomic writes, content hashes, image suffixes, output checks.

Nothing here knows about models; `prepare` (which never imports torch) and the training modules share it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".avif", ".bmp", ".tif", ".tiff", ".gif")
HEIF_SUFFIXES = (".heic", ".heif")  # iPhone photos: read with the optional pillow-heif, else counted and named


def read_heif() -> bool:
    """Whether HEIC/HEIF photos can be read: with the optional pillow-heif package installed, whose opener this
    registers with Pillow (again: a no-op); without it Pillow cannot open them."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()  # it applies the photo's rotation and resets the EXIF orientation to 1
    return True


def open_heif_with(path: str | Path) -> None:
    """Before opening `path`: when it is a HEIC/HEIF photo, let Pillow read it through pillow-heif (when installed;
    a process started by spawn has not registered it yet)."""
    if Path(path).suffix.lower() in HEIF_SUFFIXES:
        read_heif()


def prepared_image_name(relative: str, sha256: str) -> str:
    """Where `lorakit prepare` writes a photo in a dataset: `images/<the photo's path, flattened>_<8 hex of the
    sha256 of what it wrote>.png`, so a changed photo gets a new name and its namesakes stay apart."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(Path(relative).with_suffix("")).replace(os.sep, "__"))
    return f"images/{stem}_{sha256[:8]}.png"


def photo_stem(path: Path) -> str:
    """The photo name a prepared image was made from (`prepared_image_name` without its hash): what `data.pairs`
    pairs images of two folders by. A file prepare did not name keeps its own stem."""
    match = re.fullmatch(r"(.+)_[0-9a-f]{8}", path.stem)
    return match[1] if match else path.stem


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


CRASH_AT = "LORAKIT_CRASH_AT"  # "site:n" kills the process at the n-th time it reaches `site` (tests, benchmarks)
FAIL_AT = "LORAKIT_FAIL_AT"  # "site:n" makes the n-th arrival at `site` raise an I/O error instead (EIO)
CRASH_TRACE = "LORAKIT_CRASH_TRACE"  # a file that gets one line per arrival at any crash point
_crash_counts: dict[str, int] = {}


def crash_point(site: str) -> None:
    """A place where a write can be cut off. With `LORAKIT_CRASH_AT=site:n` set, the n-th arrival here kills the
    process with SIGKILL (no clean-up, as a power cut or the OOM killer would); with `LORAKIT_CRASH_TRACE=file`
    each arrival is appended to that file; with `LORAKIT_FAIL_AT=site:n` the n-th arrival raises an I/O error
    (EIO), as a failing disk would; otherwise nothing happens."""
    trace = os.environ.get(CRASH_TRACE)
    if trace:  # every arrival, in order: how a harness enumerates the kill points of a run
        with open(trace, "a", encoding="utf-8") as f:
            f.write(site + "\n")
    for variable in (CRASH_AT, FAIL_AT):
        wanted = os.environ.get(variable)
        if not wanted or wanted.rpartition(":")[0] != site:
            continue
        key = f"{variable}:{site}"
        _crash_counts[key] = _crash_counts.get(key, 0) + 1
        if _crash_counts[key] == int(wanted.rpartition(":")[2]):
            if variable == CRASH_AT:
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.EIO, f"injected I/O error at {site}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file: mkstemp's 0600 is not the user's choice


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, make it durable, then rename it into place.

    A reader never sees a half-written `path`: it is either the old file or the complete new one, also after a
    power cut (the data is fsynced before the rename, the folder after it). The file gets the mode a plain
    `open()` would give under the user's umask.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        crash_point("write")
        write(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        crash_point("fsync")
        fsync_file(Path(tmp))
        crash_point("rename")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    crash_point("dir-fsync")
    fsync_dir(path.parent)


TEMP_SUFFIX = ".tmp"


def remove_stale_temp_files(folder: Path) -> int:
    """Delete the temporary files `atomic_write` leaves when the process is killed mid-write (`.<name>.*.tmp`);
    returns how many. Only names of that form are touched."""
    removed = 0
    for path in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if path.is_file() and path.name.count(".") >= 3:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


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

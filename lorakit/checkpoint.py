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


CHECKPOINTS = "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written `.tmp` folders are not checkpoints)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """The checkpoint folder named by `--resume`: `latest`, or a path to a `step-N` folder."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise OutputError(
                f"--resume latest: {run_dir} has no checkpoints; start without --resume "
                "(with --overwrite to replace the run)"
            )
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / "state.json").is_file():
        raise OutputError(
            f"--resume: {resume} is not a checkpoint folder (no state.json); give `latest` or a "
            f"{CHECKPOINTS}/step-NNNNNN folder of the run"
        )
    return path


def _split_state(state: dict, prefix: str, tensors: dict, plain: dict) -> None:
    """Put every tensor of a nested state dict into `tensors` (flat keys) and the rest into `plain`."""
    import torch

    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().clone()  # clone: safetensors refuses shared storage
        elif isinstance(value, dict):
            plain[str(key)] = {}
            _split_state(value, f"{name}/", tensors, plain[str(key)])
        else:
            plain[str(key)] = value


def _join_state(plain: dict, prefix: str, tensors: dict) -> dict:
    state: dict = {}
    for key, value in plain.items():
        state[key] = _join_state(value, f"{prefix}{key}/", tensors) if isinstance(value, dict) else value
    for name, tensor in tensors.items():
        if name.startswith(prefix) and "/" not in name[len(prefix) :]:
            state[name[len(prefix) :]] = tensor
    return state


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    adapter: dict,
    ema: dict | None,
    optimizer_state: dict,
    scheduler_state: dict,
    position: dict,
    rng: dict,
    recipe: dict,
    keep: int,
) -> Path:
    """Write `checkpoints/step-N/` (via `step-N.tmp/` and a rename) and prune all but the newest `keep`.

    Only trainable tensors and optimizer state are written, never the frozen base; no pickles.
    """
    import json

    from safetensors.torch import save_file

    folder = Path(run_dir) / CHECKPOINTS
    final, tmp = folder / checkpoint_name(step), folder / f"{checkpoint_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    tensors: dict = {}
    plain: dict = {}
    _split_state({"optimizer": optimizer_state, "rng": rng}, "", tensors, plain)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "position": position, "scheduler": scheduler_state, "recipe": recipe, **plain}
    (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint folder back: adapter, ema (or None), optimizer, scheduler, position, rng, recipe, step."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    tensors = load_file(path / "optimizer.safetensors")
    joined = _join_state({"optimizer": state.pop("optimizer"), "rng": state.pop("rng")}, "", tensors)
    ema = path / "ema.safetensors"
    return {
        **state,
        **joined,
        "adapter": load_file(path / "adapter.safetensors"),
        "ema": load_file(ema) if ema.is_file() else None,
    }

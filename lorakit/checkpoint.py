"""The run folder: its paths, creating it safely, checkpoints, and what a resume must find unchanged."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import OutputError
from .recipe import Recipe, recipe_to_dict


@dataclass(frozen=True)
class RunPaths:
    """Where everything of a run lives: `<output.folder>/<output.name>/` (the contract of train, generate, merge)."""

    folder: Path
    name: str

    @property
    def recipe(self) -> Path:
        return self.folder / "recipe.resolved.toml"

    @property
    def kohya_adapter(self) -> Path:
        return self.folder / f"{self.name}.safetensors"

    @property
    def diffusers_adapter(self) -> Path:
        return self.folder / f"{self.name}.diffusers.safetensors"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.folder / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.folder / CHECKPOINTS

    def adapter(self) -> Path:
        """The file to load: the kohya one, or the diffusers one for DoRA runs (which have no kohya file)."""
        kohya, diffusers = self.kohya_adapter, self.diffusers_adapter
        return diffusers if diffusers.is_file() and not kohya.is_file() else kohya


RUN_MARKER = ".lorakit-run"  # in every run folder lorakit creates: the proof that --overwrite may remove it


def is_run_folder(run_dir: Path) -> bool:
    """Whether lorakit made `run_dir` (its marker, or the resolved recipe every earlier run folder holds)."""
    return (run_dir / RUN_MARKER).is_file() or (run_dir / "recipe.resolved.toml").is_file()


def check_run_folder(run_dir: Path, overwrite: bool) -> None:
    """Refuse an existing run folder unless `overwrite`, a folder lorakit did not make even then, and an output
    location that cannot be written."""
    if run_dir.exists() and not overwrite:
        raise OutputError(
            f"output: run folder {run_dir} already exists; pass --overwrite to replace it "
            "or set output.name to a new name"
        )
    if run_dir.exists() and not (run_dir.is_dir() and is_run_folder(run_dir)):
        raise OutputError(
            f"output: {run_dir} exists and is not a lorakit run folder (no {RUN_MARKER}); lorakit deletes only "
            "what it wrote, so --overwrite will not remove it: set output.name to a new name"
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
        (run_dir / RUN_MARKER).write_text("a lorakit run folder: `lorakit train --overwrite` may replace it\n")
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
    own = (Path(run_dir) / CHECKPOINTS).expanduser().resolve()
    if path.resolve().parent != own:
        raise OutputError(
            f"--resume: {resume} belongs to the run {path.resolve().parent.parent}, not to {run_dir}; resume that "
            "run with its own recipe, or start this one from its adapter with lora.init_from"
        )
    return path


def _split_state(state: dict, prefix: str, tensors: dict, plain: dict) -> None:
    """Put every tensor of a nested state dict into `tensors` (flat keys) and the rest into `plain`."""

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


_MUST_MATCH = (
    "model.base",
    "model.vae",
    "lora",
    "data.folder",
    "data.num_repeats",
    "train.seed",
    "train.batch_size",
    "prior",
)


def check_resumable(saved: dict, recipe: Recipe, log: Callable[[str], None]) -> None:
    """Refuse a resume whose recipe changed what the checkpoint's tensors or data order depend on."""
    current = recipe_to_dict(recipe)
    changed = []
    for section in sorted(set(saved) | set(current)):
        for key in sorted(set(saved.get(section, {})) | set(current.get(section, {}))):
            before, after = saved.get(section, {}).get(key), current.get(section, {}).get(key)
            if before != after:
                changed.append((f"{section}.{key}", before, after))
    for key, before, after in changed:
        if key in _MUST_MATCH or key.split(".")[0] in _MUST_MATCH:
            raise OutputError(
                f"--resume: {key} changed from {before!r} to {after!r} since the checkpoint; "
                "resume with the same value, or start a new run"
            )
        log(f"--resume: {key} changed from {before!r} to {after!r}")


def rng_state() -> dict[str, Any]:

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the generators `rng_state` recorded (CUDA's only where CUDA is present)."""

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))

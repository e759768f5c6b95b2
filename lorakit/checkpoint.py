"""The run folder: its paths, creating it safely, checkpoints, and what a resume must find unchanged."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .embedding import EMBEDDINGS_FOLDER
from .errors import OutputError
from .files import FILE_MODE, crash_point, file_sha256, fsync_dir, fsync_file, remove_stale_temp_files
from .recipe import SECTIONS, Recipe, recipe_to_dict


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

    def embedding(self, token: str, suffix: str = "") -> Path:
        """The textual-inversion file of an [embedding] run (`suffix`: an intermediate save's, e.g. `-000004`)."""
        return self.folder / EMBEDDINGS_FOLDER / f"{token}{suffix}.safetensors"

    def intermediate_name(self, step: int, epoch: int | None = None) -> str:
        """The name (no suffix) of the adapter written with a checkpoint before the last: kohya's, by epoch or
        step."""
        return f"{self.name}-{epoch:06d}" if epoch is not None else f"{self.name}-step{step:08d}"

    def intermediate_adapters(self) -> list[Path]:
        """The adapter files written with checkpoints before the last (`intermediate_name`), in name order."""
        pattern = re.compile(rf"{re.escape(self.name)}-(step\d{{8}}|\d{{6}})(\.diffusers)?\.safetensors")
        return sorted(
            p for p in self.folder.glob(f"{glob.escape(self.name)}-*.safetensors") if pattern.fullmatch(p.name)
        )

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


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `<output.folder>/.<name>.lock` while a run uses its folder: a second `lorakit train` on the same run
    (a resume, an --overwrite) is refused with the holder's PID instead of both writing one folder. The lock is
    the operating system's (flock / msvcrt), so a killed run never leaves it held. The caller takes it in the main
    process only: the processes of one multi-process job share the folder by design."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f".{run_dir.name}.lock"
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
    try:
        if not _try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise OutputError(
                f"output: the run folder {run_dir} is in use by another lorakit train (PID {holder}); wait for it to "
                "finish or stop it, or set output.name to a new name"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def _try_lock(handle: Any) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def clean_interrupted_writes(run_dir: Path) -> int:
    """Remove what a killed run left half-written in its folder: `atomic_write` temp files and `step-N.tmp`
    checkpoint folders (names only lorakit makes). Returns how many."""
    removed = remove_stale_temp_files(run_dir)
    folder = Path(run_dir) / CHECKPOINTS
    if folder.is_dir():
        for path in folder.glob("step-*.tmp"):
            if path.is_dir():
                shutil.rmtree(path)
                removed += 1
    return removed


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


def find_checkpoint(run_dir: Path, resume: str, log: Callable[[str], None] = print) -> Path:
    """The checkpoint folder named by `--resume`: `latest` (the newest whose manifest verifies; each newer one
    skipped is said in the log, with why), or a path to a `step-N` folder (which must verify)."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        skipped = []
        for candidate in reversed(found):
            problem = checkpoint_problem(candidate)
            if problem is None:
                for name, why in skipped:
                    log(f"--resume latest: skipped {name}: {why}")
                return candidate
            skipped.append((candidate.name, problem))
        if skipped:
            raise OutputError(
                f"--resume latest: none of the {len(found)} checkpoints of {run_dir} verifies (the newest, "
                f"{skipped[0][0]}: {skipped[0][1]}); start again with --overwrite"
            )
        raise OutputError(
            f"--resume latest: {run_dir} has no checkpoints; start without --resume "
            "(with --overwrite to replace the run)"
        )
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
    problem = checkpoint_problem(path)
    if problem is not None:
        raise OutputError(f"--resume: {resume} cannot be trusted: {problem}; give another checkpoint or `latest`")
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
    dataset: str = "",
) -> Path:
    """Write `checkpoints/step-N/` crash- and power-safely and prune all but the newest `keep`.

    The files go into `step-N.tmp/`, each fsynced; `manifest.json` (every file's size and sha256) is written
    last; then the folder is renamed into place and `checkpoints/` fsynced. Resume trusts only a checkpoint
    whose manifest verifies. Only trainable tensors and optimizer state are written, never the frozen base;
    no pickles.
    """

    folder = Path(run_dir) / CHECKPOINTS
    final, tmp = folder / checkpoint_name(step), folder / f"{checkpoint_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict = {}
    plain: dict = {}
    _split_state({"optimizer": optimizer_state, "rng": rng}, "", tensors, plain)
    state = {
        "step": step,
        "position": position,
        "scheduler": scheduler_state,
        "recipe": recipe,
        "dataset": dataset,
        **plain,
    }
    files: dict[str, Callable[[Path], None]] = {
        "adapter.safetensors": lambda p: save_file(
            {k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(p)
        ),
        "optimizer.safetensors": lambda p: save_file(tensors, str(p)),
        "state.json": lambda p: p.write_text(json.dumps(state, indent=1), encoding="utf-8"),
    }
    if ema is not None:
        files["ema.safetensors"] = lambda p: save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(p))
    try:
        for name, write in files.items():
            crash_point("checkpoint-file")
            write(tmp / name)
            os.chmod(tmp / name, FILE_MODE)
            fsync_file(tmp / name)
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)} for name in files}
        crash_point("manifest")
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1), encoding="utf-8")
        fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)
        crash_point("checkpoint-rename")
        if final.exists():  # the same step saved again (a resumed run re-saving): the old one goes first
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:  # a failed write leaves no half checkpoint behind (a kill leaves step-N.tmp: resume cleans)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(folder)
    for old in list_checkpoints(run_dir)[:-keep]:
        crash_point("prune")
        shutil.rmtree(old)
    return final


MANIFEST = "manifest.json"


def write_failure(err: OSError, run_dir: Path, what: str, needed: int, recipe_source: str) -> OutputError:
    """The one-line error for a write that failed (a full disk, a quota, a lost mount): what was being written,
    what it needs, and that the newest complete checkpoint is intact (writes go to temp names first)."""
    found = list_checkpoints(run_dir)
    kept = f"the checkpoint {found[-1].name} is intact" if found else "no checkpoint was written yet"
    return OutputError(
        f"output: could not write {what} in {run_dir}: {err.strerror or err}; it needs about "
        f"{needed / 2**20:.1f} MiB free there; {kept}: free space, then `lorakit train {recipe_source} "
        "--resume latest`"
    )


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be trusted (a missing or failing manifest), or None when every file
    it lists has its recorded size and sha256."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        for name, facts in files.items():
            if "/" in name or "\\" in name or name.startswith("."):
                return f"its manifest names {name!r}, which is not a checkpoint file"
            file = Path(path) / name
            if not file.is_file() or file.stat().st_size != facts["bytes"]:
                return f"{name} is missing or has the wrong size"
            if file_sha256(file) != facts["sha256"]:
                return f"{name} does not match its recorded sha256"
        if "state.json" not in files or "adapter.safetensors" not in files:
            return "its manifest lists no state.json or adapter.safetensors"
    except FileNotFoundError:
        return f"no {MANIFEST} (the save was cut off)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its {MANIFEST} is damaged ({type(err).__name__})"
    return None


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
    "train.optimizer",  # another optimizer's state does not load into this one
    "model.base",
    "model.vae",
    "model.merged_adapters",  # the base the adapter learned on top of
    "lora",
    "embedding.token",  # the new token vectors are tensors of the checkpoint, and a parameter group
    "embedding.vectors",
    "data.folder",
    "data.num_repeats",
    "train.seed",
    "train.batch_size",
    "prior",
    # the optimizer's parameter groups (and what state loads into which) follow from these
    "train.loraplus_lr_ratio",
    "train.loraplus_unet_lr_ratio",
    "train.loraplus_text_encoder_lr_ratio",
    "train.down_lr_weight",
    "train.mid_lr_weight",
    "train.up_lr_weight",
    "train.block_lr_zero_threshold",
    "embedding.only",  # a run with a LoRA and one without have different tensors
    "train.full_bf16",  # the trained tensors' dtype, and AdamW's or Prodigy's state's
)


def check_resumable(saved: dict, recipe: Recipe, log: Callable[[str], None]) -> None:
    """Refuse a resume whose recipe changed what the checkpoint's tensors or data order depend on."""
    current = recipe_to_dict(recipe)
    changed = []
    for section in sorted(set(saved) | set(current)):
        for key in sorted(set(saved.get(section, {})) | set(current.get(section, {}))):
            before, after = saved.get(section, {}).get(key), current.get(section, {}).get(key)
            if section in saved and key not in saved[section]:  # a key newer than the checkpoint's lorakit,
                before = _field_default(section, key)  # which ran as the key's default does
            if before != after:
                changed.append((f"{section}.{key}", before, after))
    for key, before, after in changed:
        if key in _MUST_MATCH or key.split(".")[0] in _MUST_MATCH:
            raise OutputError(
                f"--resume: {key} changed from {before!r} to {after!r} since the checkpoint; "
                "resume with the same value, or start a new run"
            )
        log(f"--resume: {key} changed from {before!r} to {after!r}")


def _field_default(section: str, key: str) -> Any:
    """A recipe key's default (None for a required key or one unknown here)."""
    for entry in dataclasses.fields(SECTIONS[section]) if section in SECTIONS else ():
        if entry.name == key:
            if entry.default is not dataclasses.MISSING:
                return entry.default
            if entry.default_factory is not dataclasses.MISSING:
                return entry.default_factory()
    return None


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

"""Fault injection for training runs, shared by tests/test_reliability.py (reduced counts, in the default suite) and
benchmarks/reliability.py (the full counts).

Runs fork from a process that has already imported the ML stack, so each killed run costs its training steps, not
10 s of imports. A child is killed with SIGKILL at a chosen crash point (`LORAKIT_CRASH_AT`) or after a random
delay; the harness then does what a user would do (`--resume latest`, or start again when no checkpoint was
written) and compares the result with an uninterrupted run: the adapter's tensors bit for bit, every step logged
exactly once, no file left that cannot be read.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from lorakit.checkpoint import checkpoint_problem, list_checkpoints
from lorakit.errors import LorakitError
from lorakit.files import CRASH_AT, CRASH_TRACE, FAIL_AT


def _child(recipe: dict, env: dict[str, str], resume: str | None, overwrite: bool) -> None:
    """The forked run: train and leave with 0, 2 for a lorakit error, 3 for anything else (an escaped exception)."""
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    os.environ.update(env)
    code = 3
    try:
        train(recipe_from_dict(recipe), resume=resume, overwrite=overwrite, quiet=True, log=lambda _: None)
        code = 0
    except LorakitError:
        code = 2
    except BaseException:  # noqa: BLE001 - counted as an escaped exception by the parent
        traceback.print_exc()
    finally:
        os._exit(code)


def _fork_and_wait(recipe: dict, env: dict, resume: str | None, overwrite: bool, kill_after: float | None) -> int:
    pid = os.fork()
    if pid == 0:
        _child(recipe, env, resume, overwrite)
    if kill_after is not None:
        time.sleep(kill_after)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve() -> None:
    """The zygote: import the ML stack once, without running any of it (OpenMP's thread pool does not survive a
    fork once used), then fork one child per request read from stdin (a JSON line) and answer its exit code."""
    import lorakit.train  # noqa: F401 - the import is the point

    for line in sys.stdin:
        request = json.loads(line)
        code = _fork_and_wait(**request)
        print(json.dumps(code), flush=True)


class Zygote:
    """A helper process that forks training runs for this one (see `serve`)."""

    def __init__(self) -> None:
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("OMP_NUM_THREADS", "1")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from tests.reliability import serve; serve()"],
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(
        self,
        recipe: dict,
        *,
        env: dict[str, str] | None = None,
        resume: str | None = None,
        overwrite: bool = False,
        kill_after: float | None = None,
    ) -> int:
        """Run `train` in a forked child; returns its exit code, or -signal when it was killed."""
        request = {"recipe": recipe, "env": env or {}, "resume": resume, "overwrite": overwrite}
        self.process.stdin.write(json.dumps({**request, "kill_after": kill_after}) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError("the zygote process ended")
        return json.loads(answer)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def clear_latent_cache(recipe: dict) -> None:
    """So the next run writes its latent cache again (and passes the cache's kill points)."""
    shutil.rmtree(Path(recipe["data"]["folder"]) / ".cache" / "latents", ignore_errors=True)


def trace_kill_points(zygote: Zygote, recipe: dict, trace: Path) -> list[tuple[str, int]]:
    """Every (site, n) a complete run passes through, from one traced run."""
    trace.unlink(missing_ok=True)
    clear_latent_cache(recipe)
    code = zygote.run(recipe, env={CRASH_TRACE: str(trace)}, overwrite=True)
    assert code == 0, f"the traced run failed with {code}"
    seen: Counter[str] = Counter()
    points = []
    for site in trace.read_text().split():
        seen[site] += 1
        points.append((site, seen[site]))
    return points


@dataclass
class Outcome:
    """What one interrupted-then-finished run left, against the uninterrupted reference."""

    killed: bool
    resumed: bool
    identical: bool
    steps_logged_once: bool
    escaped: int
    problems: list[str] = field(default_factory=list)
    exit_code: int = 0  # of the interrupted run: -9 killed, 2 a lorakit error (an injected I/O fault), 3 escaped


def finish(zygote: Zygote, recipe: dict, max_restarts: int = 3) -> tuple[bool, int]:
    """After a kill: `--resume latest`, or (no checkpoint yet) start again with --overwrite, as a user would.
    Returns (resumed from a checkpoint, escaped exceptions)."""
    run_dir = Path(recipe["output"]["folder"]) / recipe["output"]["name"]
    escaped = 0
    for _ in range(max_restarts):
        resume = "latest" if list_checkpoints(run_dir) else None
        code = zygote.run(recipe, resume=resume, overwrite=resume is None)
        escaped += code == 3
        if code == 0:
            return resume is not None, escaped
    raise AssertionError(f"{run_dir}: the run did not finish after {max_restarts} restarts")


def compare(recipe: dict, reference: Path) -> tuple[bool, bool, list[str]]:
    """(adapter tensors equal to the reference's, every step logged once, unreadable files left in the run)."""
    run_dir = Path(recipe["output"]["folder"]) / recipe["output"]["name"]
    name = recipe["output"]["name"]
    ours, theirs = load_file(run_dir / f"{name}.safetensors"), load_file(reference / f"{name}.safetensors")
    identical = ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    once = steps == sorted(set(steps)) and steps[-1] == recipe["train"]["max_steps"]
    problems = [f"{p.name}: {why}" for p in list_checkpoints(run_dir) if (why := checkpoint_problem(p))]
    problems += [str(p) for p in run_dir.rglob("*.tmp")]
    for file in run_dir.glob("*.safetensors"):
        try:
            load_file(file)
        except Exception as err:  # noqa: BLE001 - any failure to read is a corrupt file
            problems.append(f"{file.name}: {err}")
    return identical, once, problems


def kill_and_finish(
    zygote: Zygote,
    recipe: dict,
    reference: Path,
    *,
    point: tuple[str, int] | None = None,
    delay: float | None = None,
    fail: bool = False,
) -> Outcome:
    """Kill a fresh run at `point` (site, n) or after `delay` seconds (or, with `fail`, make the write at `point`
    raise an I/O error), finish it, compare with `reference`."""
    run_dir = Path(recipe["output"]["folder"]) / recipe["output"]["name"]
    shutil.rmtree(run_dir, ignore_errors=True)
    clear_latent_cache(recipe)
    env = {(FAIL_AT if fail else CRASH_AT): f"{point[0]}:{point[1]}"} if point else {}
    code = zygote.run(recipe, env=env, overwrite=True, kill_after=delay)
    resumed, escaped = finish(zygote, recipe) if code != 0 else (False, 0)
    escaped += code == 3
    identical, once, problems = compare(recipe, reference)
    return Outcome(code == -signal.SIGKILL, resumed, identical, once, escaped, problems, code)


def random_delays(count: int, longest: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.05, longest) for _ in range(count)]


FIGURES: Counter[str] = Counter()  # what the reliability tests exercised; conftest prints it after the suite


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _record_save(run_dir: Path, monkeypatch, save) -> list[tuple]:
    """Run `save()` for real, recording the order of its durable operations: each file's bytes when it is
    fsynced, folder fsyncs, renames and tree removals (paths relative to `run_dir`)."""
    from lorakit import checkpoint as ckpt

    ops: list[tuple] = []
    rel = lambda p: str(Path(p).relative_to(run_dir))  # noqa: E731
    real_fsync_file, real_fsync_dir, real_replace, real_rmtree = (
        ckpt.fsync_file,
        ckpt.fsync_dir,
        os.replace,
        shutil.rmtree,
    )

    def fsync_file(path):
        ops.append(("file", rel(path), Path(path).read_bytes()))
        real_fsync_file(path)

    def fsync_dir(path):
        ops.append(("fsync-dir", rel(path)))
        real_fsync_dir(path)

    def replace(src, dst):
        ops.append(("rename", rel(src), rel(dst)))
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if Path(path).exists():
            files = sorted(str(p.relative_to(run_dir)) for p in Path(path).rglob("*") if p.is_file())
            ops.append(("rmtree", rel(path), files))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "fsync_file", fsync_file)
    monkeypatch.setattr(ckpt, "fsync_dir", fsync_dir)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    save()
    monkeypatch.undo()
    return ops


def _crash_states(before: dict[str, bytes], ops: list[tuple]) -> list[dict[str, bytes]]:
    """Every file state POSIX allows after a power cut during `ops`: for each cut point, the completed operations
    applied, except that a rename not yet made durable by an fsync of its target's folder may be undone, a file
    being written may be absent or torn, and a tree being removed may be partly removed."""
    states = []
    for cut in range(len(ops) + 1):
        done, current = ops[:cut], ops[cut] if cut < len(ops) else None
        renames = [i for i, op in enumerate(done) if op[0] == "rename"]
        undurable = [
            i
            for i in renames
            if not any(op[0] == "fsync-dir" and op[1] == str(Path(done[i][2]).parent) for op in done[i + 1 :])
        ]
        for undo in ([], *[[i] for i in undurable]):
            applied = [op for i, op in enumerate(done) if i not in undo]
            variants: list[list[tuple]] = [[]]
            if current and current[0] == "file":  # the write in progress: absent or torn
                variants = [[], [("file", current[1], current[2][: len(current[2]) // 2])]]
            if current and current[0] == "rmtree":  # part of the tree removed
                variants = [[("unlink", f) for f in current[2][:j]] for j in range(len(current[2]))]
            for extra in variants:
                states.append(_apply(before, applied + extra))
    return states


def _apply(before: dict[str, bytes], ops: list[tuple]) -> dict[str, bytes]:
    files = dict(before)
    for op in ops:
        if op[0] == "file":
            files[op[1]] = op[2]
        elif op[0] == "rename":
            src, dst = op[1] + os.sep, op[2] + os.sep
            for name in [n for n in files if n.startswith(dst)]:
                del files[name]
            for name in [n for n in files if n.startswith(src)]:
                files[dst + name[len(src) :]] = files.pop(name)
        elif op[0] == "rmtree":
            for name in [n for n in files if n.startswith(op[1] + os.sep)]:
                del files[name]
        elif op[0] == "unlink":
            files.pop(op[1], None)
    return files


def replay_power_loss(tmp_path: Path, monkeypatch) -> tuple[int, int, set[str]]:
    """Save step 2, then record the save of step 4 (which prunes step 2); materialise every crash state and check
    that `--resume latest` finds a checkpoint that verifies and loads, of step 2 or 4. Returns (crash states,
    recorded operations, the checkpoints resumed from)."""
    import torch

    from lorakit import checkpoint as ckpt

    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)

    def save(step: int) -> None:
        adapter = {f"layer{i}.lora_A.weight": torch.randn(8, 64, generator=generator) for i in range(3)}
        optimizer = {
            "state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(8, 64)}},
            "param_groups": [{"lr": 1e-4, "params": [0]}],
        }
        ckpt.save_checkpoint(
            run_dir,
            step,
            adapter=adapter,
            ema=None,
            optimizer_state=optimizer,
            scheduler_state={"last_epoch": step},
            position={"epoch": 0, "offset": step, "micro": step},
            rng={"torch": torch.get_rng_state()},
            recipe={},
            keep=1,
            dataset="d",
        )

    save(2)
    before = _snapshot(run_dir)
    ops = _record_save(run_dir, monkeypatch, lambda: save(4))
    states = _crash_states(before, ops)
    resumed = set()
    for number, files in enumerate(states):
        state_dir = tmp_path / f"state{number}"
        for name, data in files.items():
            (state_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (state_dir / name).write_bytes(data)
        state_dir.mkdir(exist_ok=True)
        found = ckpt.find_checkpoint(state_dir, "latest", log=lambda _: None)
        assert found.name in ("step-000002", "step-000004"), (number, found)
        loaded = ckpt.load_checkpoint(found)
        assert loaded["step"] == int(found.name[5:])
        resumed.add(found.name)
        shutil.rmtree(state_dir)
    return len(states), len(ops), resumed
